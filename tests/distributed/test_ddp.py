"""DDP under Sentinel: two ranks (gloo on 127.0.0.1) train the same model with and without
Sentinel; every rank's losses and parameters must be bit for bit the plain run's, and the
ranks must agree. The ranks are separate processes with a deadline: the test cannot hang."""

from __future__ import annotations

import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sentinel_hm as sh

WORLD = 2
STEPS = 9  # two warm-up steps, the profile, the trial, then steady steps
DEADLINE_S = 240


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(4))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return nn.functional.cross_entropy(self.head(x), y)


def _train(rank: int, budget: str | None, bucket_view: bool) -> tuple[list, list, dict]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(_Net(), gradient_as_bucket_view=bucket_view)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sentinel = sh.Sentinel(model, opt, fast_memory=budget, trials=0) if budget else None
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
    losses = []
    for i in range(STEPS):
        x, y = torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        if sentinel is not None and i == STEPS - 1:
            sentinel.audit()
        with sentinel.step() if sentinel else torch.enable_grad():
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())
    stats = sentinel.stats() if sentinel else {}
    if sentinel is not None:
        sentinel.close()
    return losses, [p.detach().clone() for p in model.parameters()], stats


def _rank(rank: int, port: int, out: str, bucket_view: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        plain_losses, plain_params, _ = _train(rank, None, bucket_view)
        losses, params, stats = _train(rank, "min", bucket_view)
        # the ranks agree: rank 0's parameters, broadcast, equal this rank's
        theirs = [p.clone() for p in params]
        for p in theirs:
            dist.broadcast(p, src=0)
        result = {
            "losses_equal": all(torch.equal(a, b) for a, b in zip(plain_losses, losses,
                                                                  strict=True)),
            "params_equal": all(torch.equal(a, b) for a, b in zip(plain_params, params,
                                                                  strict=True)),
            "ranks_agree": all(torch.equal(a, b) for a, b in zip(theirs, params, strict=True)),
            "phase": stats["phase"],
            "moved": stats["bytes_to_slow_per_step"],
            "audited": stats["audited_peak_fast_bytes"],
            "budget": stats["budget_bytes"],
        }
        dist.destroy_process_group()
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True], ids=["grads", "bucket-view-grads"])
def test_ddp_two_ranks_bitwise_under_sentinel(tmp_path, bucket_view):
    ctx = mp.start_processes(_rank, args=(_free_port(), str(tmp_path), bucket_view),
                             nprocs=WORLD, join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "error" not in result, result.get("error")
        assert result["losses_equal"] and result["params_equal"], result
        assert result["ranks_agree"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result
        assert result["audited"] <= result["budget"], result

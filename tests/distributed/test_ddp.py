"""DDP under Sentinel: two ranks (gloo on 127.0.0.1) train the same model with and without
Sentinel; every rank's losses and parameters must be bit for bit the plain run's, and the
ranks must agree. The ranks are separate processes with a deadline: the test cannot hang."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import sentinel_hm as sh

from .launch import Net, compare, run_ranks

STEPS = 9  # two warm-up steps, the profile, the trial, then steady steps


def _train(rank: int, budget: str | None, bucket_view: bool) -> tuple[list, list, dict]:
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DDP(Net(), gradient_as_bucket_view=bucket_view)
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


def _compare(rank: int, bucket_view: bool) -> dict:
    return compare(_train(rank, None, bucket_view), _train(rank, "min", bucket_view))


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True], ids=["grads", "bucket-view-grads"])
def test_ddp_two_ranks_bitwise_under_sentinel(tmp_path, bucket_view):
    for result in run_ranks(_compare, (bucket_view,), tmp_path):
        assert result["losses_equal"] and result["params_equal"], result
        assert result["ranks_agree"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result
        assert result["audited"] <= result["budget"], result

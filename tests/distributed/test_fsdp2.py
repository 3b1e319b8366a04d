"""FSDP2 (``fully_shard`` per block and at the root) under Sentinel: two ranks (gloo on
127.0.0.1) train with and without it; every rank's losses and parameters must be bit for bit
the plain run's and the ranks must agree. Sentinel moves the saved activations (NOTE [FSDP2]):
the audited peak of each rank stays within its budget and bytes move."""

from __future__ import annotations

import warnings

import pytest
import torch

import sentinel_hm as sh

from .launch import Net, agree, run_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")

STEPS = 9  # two warm-up steps, the profile, the trial, then steady steps
BATCH = 1024  # activations dominate: a budget below the sharded state's size can bind


def _train(rank: int, budget: str | None) -> tuple[list, list, dict]:
    torch.manual_seed(0)  # the same initial weights on every rank, sharded by FSDP2
    model = Net()
    for block in model.blocks:
        fsdp.fully_shard(block)
    fsdp.fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sentinel = None
    if budget:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sentinel = sh.Sentinel(model, opt, fast_memory=budget, trials=0)
        assert any("FSDP2" in str(w.message) for w in caught), "no word on what stays put"
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
    losses = []
    for i in range(STEPS):
        x = torch.randn(BATCH, 64, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
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
    # each rank's shards, gathered: the whole model as this rank sees it
    return losses, [p.full_tensor() for p in model.parameters()], stats


def _compare(rank: int, budget: str) -> dict:
    plain_losses, plain_params, _ = _train(rank, None)
    losses, params, stats = _train(rank, budget)
    return {
        "losses_equal": all(torch.equal(a, b) for a, b in zip(plain_losses, losses,
                                                              strict=True)),
        "params_equal": all(torch.equal(a, b) for a, b in zip(plain_params, params,
                                                              strict=True)),
        "ranks_agree": agree(params),
        "phase": stats["phase"],
        "moved": stats["bytes_to_slow_per_step"],
        "audited": stats["audited_peak_fast_bytes"],
        "budget": stats["budget_bytes"],
        "peak": stats["all_fast_peak_bytes"],
    }


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_fsdp2_two_ranks_bitwise_under_sentinel(tmp_path, budget):
    for result in run_ranks(_compare, (budget,), tmp_path):
        assert result["losses_equal"] and result["params_equal"], result
        assert result["ranks_agree"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result
        assert result["audited"] <= result["budget"] < result["peak"], result

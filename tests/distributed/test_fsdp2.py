"""FSDP2 (``fully_shard`` per block and at the root) under Sentinel: two ranks (gloo on
127.0.0.1) train with and without it; every rank's losses and parameters must be bit for bit
the plain run's and the ranks must agree. Sentinel moves the saved activations and the
optimizer state's local shards (NOTE [FSDP2]):
the audited peak of each rank stays within its budget and bytes move. A distributed
checkpoint taken under Sentinel resumes bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint
import torch.distributed.checkpoint.state_dict

import sentinel_hm as sh

from .launch import Net, compare, run_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")

STEPS = 9  # two warm-up steps, the profile, the trial, then steady steps
BATCH = 1024  # activations dominate: a budget below the sharded state's size can bind


def _sharded() -> tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank, sharded by FSDP2
    model = Net()
    for block in model.blocks:
        fsdp.fully_shard(block)
    fsdp.fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _sentinel(model: Net, opt: torch.optim.Optimizer, budget: str) -> sh.Sentinel:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sentinel = sh.Sentinel(model, opt, fast_memory=budget, trials=0)
    assert any("FSDP2" in str(w.message) for w in caught), "no word on what stays put"
    return sentinel


def _steps(rank: int, model: Net, opt: torch.optim.Optimizer, sentinel: sh.Sentinel | None,
           steps: range) -> list[torch.Tensor]:
    losses = []
    for i in steps:
        gen = torch.Generator().manual_seed(1000 * rank + i)  # each rank its own data
        x = torch.randn(BATCH, 64, generator=gen)
        y = torch.randint(0, 10, (BATCH,), generator=gen)
        if sentinel is not None and i == steps[-1]:
            sentinel.audit()
        with sentinel.step() if sentinel else torch.enable_grad():
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())
    return losses


def _train(rank: int, budget: str | None) -> tuple[list, list, dict]:
    model, opt = _sharded()
    sentinel = _sentinel(model, opt, budget) if budget else None
    losses = _steps(rank, model, opt, sentinel, range(STEPS))
    stats = sentinel.stats() if sentinel else {}
    if sentinel is not None:
        # the optimizer state's local shards that lie in the slow tier between steps
        stats["state_in_slow"] = sum(
            sentinel.tiers.is_slow(t.to_local().untyped_storage())
            for state in opt.state.values() for t in state.values() if t.dim())
        sentinel.close()
    # each rank's shards, gathered: the whole model as this rank sees it
    return losses, [p.full_tensor() for p in model.parameters()], stats


def _compare(rank: int, budget: str) -> dict:
    ours = _train(rank, budget)
    return compare(_train(rank, None), ours) | {"state_in_slow": ours[2]["state_in_slow"]}


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_fsdp2_two_ranks_bitwise_under_sentinel(tmp_path, budget):
    results = run_ranks(_compare, (budget,), tmp_path)
    for result in results:
        assert result["losses_equal"] and result["params_equal"], result
        assert result["ranks_agree"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result
        assert result["audited"] <= result["budget"] < result["peak"], result
    if budget == "min":  # the optimizer state's shards moved too
        assert all(result["state_in_slow"] > 0 for result in results), results


def _resume(rank: int, path: str) -> dict:
    """A distributed checkpoint (torch.distributed.checkpoint) taken between steady steps under
    Sentinel, loaded into a new model and optimizer under a new Sentinel: training goes on as
    if uninterrupted."""
    dcp = torch.distributed.checkpoint
    states = dcp.state_dict
    model, opt = _sharded()
    plain = _steps(rank, model, opt, None, range(2 * STEPS))
    expected = [p.full_tensor() for p in model.parameters()]

    model, opt = _sharded()
    sentinel = _sentinel(model, opt, "50%")
    losses = _steps(rank, model, opt, sentinel, range(STEPS))
    assert sentinel.stats()["phase"] == "steady"
    model_state, opt_state = states.get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": opt_state}, checkpoint_id=path)
    sentinel.close()

    model, opt = _sharded()
    model_state, opt_state = states.get_state_dict(model, opt)
    loaded = {"model": model_state, "optim": opt_state}
    dcp.load(loaded, checkpoint_id=path)
    states.set_state_dict(model, opt, model_state_dict=loaded["model"],
                          optim_state_dict=loaded["optim"])
    sentinel = _sentinel(model, opt, "50%")
    losses += _steps(rank, model, opt, sentinel, range(STEPS, 2 * STEPS))
    stats = sentinel.stats()
    sentinel.close()
    return {
        "losses_equal": all(torch.equal(a, b) for a, b in zip(plain, losses, strict=True)),
        "params_equal": all(torch.equal(a, b) for a, b in
                            zip(expected, [p.full_tensor() for p in model.parameters()],
                                strict=True)),
        "phase": stats["phase"], "moved": stats["bytes_to_slow_per_step"],
    }


@pytest.mark.slow
def test_fsdp2_distributed_checkpoint_resumes_bitwise(tmp_path):
    for result in run_ranks(_resume, (str(tmp_path / "checkpoint"),), tmp_path):
        assert result["losses_equal"] and result["params_equal"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result

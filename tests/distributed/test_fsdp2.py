"""FSDP2 (``fully_shard`` per block and at the root) under Sentinel: two ranks (gloo on
127.0.0.1) train with and without it; every rank's losses and parameters must be bit for bit
the plain run's and the ranks must agree. Sentinel moves the saved activations, the
parameter shards, the gradients and the optimizer state's local shards (NOTE [FSDP2]):
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
           steps: range, micro: int = 1, clip: bool = False) -> list[torch.Tensor]:
    losses = []
    for i in steps:
        gen = torch.Generator().manual_seed(1000 * rank + i)  # each rank its own data
        if sentinel is not None and i == steps[-1]:
            sentinel.audit()
        with sentinel.step() if sentinel else torch.enable_grad():
            for _ in range(micro):  # gradient accumulation: FSDP2 adds into the gradients
                x = torch.randn(BATCH, 64, generator=gen)
                y = torch.randint(0, 10, (BATCH,), generator=gen)
                loss = model(x, y)
                loss.backward()
                losses.append(loss.detach())
            if clip:  # reads every gradient between backward and the update
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    return losses


def _train(rank: int, budget: str | None, micro: int = 1, clip: bool = False
           ) -> tuple[list, list, dict]:
    model, opt = _sharded()
    sentinel = _sentinel(model, opt, budget) if budget else None
    losses = _steps(rank, model, opt, sentinel, range(STEPS), micro, clip)
    stats = sentinel.stats() if sentinel else {}
    if sentinel is not None:
        # the optimizer state's local shards that lie in the slow tier between steps
        stats["state_in_slow"] = sum(
            sentinel.tiers.is_slow(t.to_local().untyped_storage())
            for state in opt.state.values() for t in state.values() if t.dim())
        schedule = sentinel.schedule
        assert schedule is not None
        # the kinds the plan moves (parameter shards and gradients move in place)
        stats["shards_moved"], stats["grads_moved"] = len(schedule.params), len(schedule.grads)
        sentinel.close()
    # each rank's shards, gathered: the whole model as this rank sees it
    return losses, [p.full_tensor() for p in model.parameters()], stats


def _compare(rank: int, budget: str, micro: int = 1, clip: bool = False) -> dict:
    ours = _train(rank, budget, micro, clip)
    return compare(_train(rank, None, micro, clip), ours) | {
        key: ours[2][key] for key in ("state_in_slow", "shards_moved", "grads_moved")}


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_fsdp2_two_ranks_bitwise_under_sentinel(tmp_path, budget):
    results = run_ranks(_compare, (budget,), tmp_path)
    for result in results:
        assert result["losses_equal"] and result["params_equal"], result
        assert result["ranks_agree"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result
        assert result["audited"] <= result["budget"] < result["peak"], result
    if budget == "min":  # the optimizer state's shards, parameter shards and gradients too
        assert all(result["state_in_slow"] > 0 and result["shards_moved"] > 0
                   and result["grads_moved"] > 0 for result in results), results


@pytest.mark.slow
def test_fsdp2_accumulation_and_clipping_bitwise_under_sentinel(tmp_path):
    """Two micro-batches a step (FSDP2 adds the second reduce-scatter into the gradients it
    kept) and clip_grad_norm_ (it reads every gradient before the update), at "min"."""
    for result in run_ranks(_compare, ("min", 2, True), tmp_path):
        assert result["losses_equal"] and result["params_equal"], result
        assert result["ranks_agree"], result
        assert result["phase"] == "steady" and result["moved"] > 0, result
        assert result["audited"] <= result["budget"] < result["peak"], result
        assert result["shards_moved"] > 0 and result["grads_moved"] > 0, result


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


def _offloaded(rank: int) -> dict:
    model = Net()
    policy = fsdp.CPUOffloadPolicy(pin_memory=False)
    for block in model.blocks:
        fsdp.fully_shard(block, offload_policy=policy)
    fsdp.fully_shard(model, offload_policy=policy)
    try:
        sh.Sentinel(model, torch.optim.AdamW(model.parameters()))
    except sh.SentinelError as e:
        return {"refused": str(e)}
    return {"refused": None}


def test_fsdp2_cpu_offload_is_refused_at_construction(tmp_path):
    for result in run_ranks(_offloaded, (), tmp_path):
        assert result["refused"] and "CPUOffloadPolicy" in result["refused"], result

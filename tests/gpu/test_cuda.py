"""CUDA tiers (skipped without CUDA): bitwise training, the budget held by the allocator's own
peak in asynchronous steps, races with slowed copies and slowed compute, complete state
between steps, no memory growth.

Every Sentinel run here has a binding budget (below the all-fast peak), and must reach the
steady phase with bytes moving both ways: a run in which nothing moves proves nothing. The
workloads and settings are deterministic on CUDA (models.py, conftest.py), so any difference
from the plain twin is the runtime's. Run by scripts/gpu_check.sh wherever CUDA is available.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.runtime.manager import MAX_REPLANS, WARMUP_STEPS

from . import models

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TRIALS = 3  # test-and-trial steps (Sentinel's default)
MIN_STEADY = 2  # timed steady steps each run must reach
# warm-up, the profiled step, the trials, the audited trial and its re-plans, then steady
STEPS = WARMUP_STEPS + 1 + TRIALS + 1 + MAX_REPLANS + MIN_STEADY
SLEEP_CYCLES = 2_000_000  # torch.cuda._sleep: about 1 ms at an H100's or H200's ~2 GHz


def _sentinel(wl: Any, budget: str) -> sh.Sentinel:
    return sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, tiers="cuda",
                       trials=TRIALS)


def _train(name: str, budget: str | None, steps: int = STEPS, dropout: float = 0.1):
    """``steps`` steps of workload ``name``, plain (``budget=None``) or under Sentinel;
    returns the workload, every step's loss, the Sentinel and its phase after each step."""
    wl = models.make(name, dropout)
    sentinel = _sentinel(wl, budget) if budget else None
    losses, phases = [], []
    for _ in range(steps):
        if sentinel is None:
            losses.append(wl.step())
        else:
            with sentinel.step():
                losses.append(wl.step())
            phases.append(sentinel.stats()["phase"])
    torch.cuda.synchronize()
    return wl, losses, sentinel, phases


def _tensors(wl: Any) -> list[torch.Tensor]:
    """Parameters and buffers (batch norm statistics), copied to the CPU."""
    return [t.detach().cpu() for t in (*wl.model.parameters(), *wl.model.buffers())]


def _plain(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The plain twin's losses and final parameters and buffers, on the CPU; its GPU memory is
    released, so that the allocator's peaks in the Sentinel run are that run's own."""
    wl, losses, _, _ = _train(name, None)
    result = [loss.cpu() for loss in losses], _tensors(wl)
    del wl, losses
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _assert_equal(ours: list[torch.Tensor], plain: list[torch.Tensor], what: str) -> None:
    assert len(ours) == len(plain)
    differ = [i for i, (a, b) in enumerate(zip(ours, plain, strict=True))
              if not torch.equal(a.cpu(), b.cpu())]
    assert not differ, f"{what} differ from the plain twin's at positions {differ}"


def _assert_steady_and_moving(sentinel: sh.Sentinel, phases: list[str]) -> dict[str, Any]:
    stats = sentinel.stats()
    assert phases[-MIN_STEADY:] == ["steady"] * MIN_STEADY, f"phases {phases}; {stats}"
    assert len(sentinel.steady_step_times) >= MIN_STEADY, stats
    assert not stats["mismatches"], stats["mismatches"]
    assert stats["budget_bytes"] < stats["all_fast_peak_bytes"], (
        f"budget {stats['budget_bytes']} is not binding (all-fast peak "
        f"{stats['all_fast_peak_bytes']}): nothing has to move")
    assert stats["bytes_to_slow_per_step"] > 0 and stats["bytes_to_fast_per_step"] > 0, stats
    return stats


@pytest.fixture
def slow_copies(monkeypatch):
    """Every tier copy starts after ~1 ms of sleep on the stream it is enqueued on (a side
    stream in steady steps): a missing event wait or ``record_stream`` shows as wrong values.
    Returns the list of copies made, so a test can check that the hook was reached."""
    from sentinel_hm.tiers.cuda import CudaTiers

    copy = CudaTiers.copy
    calls: list[int] = []

    def slowed(self: Any, dst: torch.Tensor, src: torch.Tensor) -> None:
        torch.cuda._sleep(SLEEP_CYCLES)
        calls.append(dst.numel())
        copy(self, dst, src)

    monkeypatch.setattr(CudaTiers, "copy", slowed)
    return calls


@pytest.mark.parametrize("name", ["gpt", "cnn"])
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_budget_holds_in_an_asynchronous_steady_step(name, budget):
    """The allocator's peak of active bytes over a real (unaudited, asynchronous) steady step,
    everything the process holds on the GPU included, and blocks waiting for a side stream's
    copy (NOTE [Evictions in flight]), is within the budget."""
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    wl, _, sentinel, phases = _train(name, budget)
    stats = _assert_steady_and_moving(sentinel, phases)
    timed = len(sentinel.steady_step_times)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with sentinel.step():
        wl.step()
    torch.cuda.synchronize()
    peak = torch.cuda.memory_stats()["active_bytes.all.peak"]
    assert len(sentinel.steady_step_times) == timed + 1  # a steady step, not audited
    assert peak <= stats["budget_bytes"], (
        f"steady step peaked at {peak} bytes on the GPU, over the budget "
        f"{stats['budget_bytes']} (audited {stats['audited_peak_fast_bytes']}; "
        f"{before} bytes were allocated before the run)")
    sentinel.close()


@pytest.mark.parametrize("name", ["gpt", "cnn"])
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_bitwise_equal_on_cuda(name, budget):
    plain_losses, plain = _plain(name)
    wl, losses, sentinel, phases = _train(name, budget)
    stats = _assert_steady_and_moving(sentinel, phases)
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    _assert_equal(losses, plain_losses, "losses")
    _assert_equal(_tensors(wl), plain, "parameters and buffers (between steps)")
    sentinel.close()
    _assert_equal(_tensors(wl), plain, "parameters and buffers (after close)")


@pytest.mark.parametrize("slowed", ["copies", "compute"])
def test_races(slowed, request):
    """Copies: each waits ~1 ms on its side stream, so compute that does not wait for a
    prefetch reads an unfilled buffer, and memory freed without ``record_stream`` is reused
    before the eviction reads it. Compute: each module's kernels start ~1 ms late, so an
    eviction that does not wait for the compute stream copies bytes not yet written."""
    handles = []
    calls = request.getfixturevalue("slow_copies") if slowed == "copies" else None
    plain_losses, plain = _plain("gpt")
    wl = models.make("gpt")
    for module in wl.model.modules():
        if slowed == "compute":
            handles.append(module.register_forward_pre_hook(
                lambda *_: torch.cuda._sleep(SLEEP_CYCLES)))
    sentinel = _sentinel(wl, "min")
    losses, phases = [], []
    for _ in range(STEPS):
        with sentinel.step():
            losses.append(wl.step())
        phases.append(sentinel.stats()["phase"])
    torch.cuda.synchronize()
    for h in handles:
        h.remove()
    _assert_steady_and_moving(sentinel, phases)
    if calls is not None:
        assert calls, "CudaTiers.copy was never called: the slow-copy hook missed the copies"
    _assert_equal(losses, plain_losses, "losses")
    _assert_equal(_tensors(wl), plain, "parameters and buffers")
    sentinel.close()


def test_state_between_steps_is_complete(slow_copies):
    """Optimizer state and parameters read right after each step (no synchronize), as
    ``torch.save`` would, equal the plain twin's: the step's end waits for its own copies.
    Copies are slowed, so a step that ends with copies in flight is caught. The twins train
    side by side (the allocator's peaks include the plain twin's state: "min" is measured
    with it)."""
    plain = models.make("gpt", dropout=0.0)  # no dropout: the twins share the GPU's generator
    wl = models.make("gpt", dropout=0.0)
    sentinel = _sentinel(wl, "min")
    phases = []
    for step in range(STEPS):
        plain.step()
        with sentinel.step():
            wl.step()
        phases.append(sentinel.stats()["phase"])
        ours, theirs = wl.optimizer.state_dict()["state"], plain.optimizer.state_dict()["state"]
        assert ours.keys() == theirs.keys()
        for index, state in theirs.items():
            _assert_equal([ours[index][k] for k in state], list(state.values()),
                          f"step {step}: optimizer state of parameter {index}")
        _assert_equal([p.detach() for p in wl.model.parameters()],
                      [p.detach() for p in plain.model.parameters()], f"step {step}: parameters")
    _assert_steady_and_moving(sentinel, phases)
    assert slow_copies
    sentinel.close()


def test_no_growth_over_40_steady_steps():
    wl, _, sentinel, phases = _train("cnn", "min")
    _assert_steady_and_moving(sentinel, phases)
    device_bytes = torch.cuda.memory_allocated()
    arena = sentinel.tiers.arena()
    arena_bytes = arena.numel() if arena is not None else 0
    assert arena_bytes > 0
    for _ in range(40):
        with sentinel.step():
            wl.step()
        assert sentinel.stats()["phase"] == "steady"
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= device_bytes
    arena = sentinel.tiers.arena()
    assert (arena.numel() if arena is not None else 0) == arena_bytes
    sentinel.close()


def test_an_audit_leaves_the_users_peak_statistics_alone():
    """NOTE [Allocator peak]: the audit reads the allocator's history, it does not reset the
    process's peak; and it switches recording off again."""
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    del big
    users_peak = torch.cuda.max_memory_allocated()
    _, _, sentinel, phases = _train("gpt", "50%")
    _assert_steady_and_moving(sentinel, phases)
    assert sentinel.stats()["audited_peak_fast_bytes"] > 0
    assert torch.cuda.max_memory_allocated() >= users_peak >= 256 << 20
    assert not torch._C._cuda_isHistoryEnabled()
    sentinel.close()

"""CUDA tiers (skipped without CUDA): bitwise training, the budget held by the allocator's own
peak in asynchronous steps, races with slowed copies and slowed compute, complete state
between steps, no memory growth, and the Hugging Face Trainer's callback.

Every Sentinel run here has a binding budget (below the all-fast peak), and must reach the
steady phase with bytes moving both ways: a run in which nothing moves proves nothing. The
workloads (models.py) peak at more than 1 GiB in fast memory, so CUDA's fixed overheads do
not decide a budget, and are deterministic on CUDA (with conftest.py), so any difference
from the plain twin is the runtime's. Every Sentinel built here is closed when its test ends,
passed or failed (the ``sentinels`` fixture), and the GPU's memory is released between tests
(conftest.py), so one failure cannot cascade into the next test. Run by
scripts/gpu_check.sh wherever CUDA is available (about 1-2 minutes on an H100/H200).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
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
# warm-up, the profiled step (twice when it recomputes layers), the trials, the audited trial
# and its re-plans, then steady
STEPS = WARMUP_STEPS + 2 + TRIALS + 1 + MAX_REPLANS + MIN_STEADY
SLEEP_CYCLES = 2_000_000  # torch.cuda._sleep: about 1 ms at an H100's or H200's ~2 GHz


@pytest.fixture
def sentinels() -> Iterator[list[sh.Sentinel]]:
    """Every Sentinel a test builds goes in this list and is closed when the test ends, even
    if it failed (a Sentinel left open keeps tensors in pinned host memory and hooks on the
    model)."""
    made: list[sh.Sentinel] = []
    yield made
    for sentinel in made:
        try:
            sentinel.close()
        except Exception as e:  # the test's own failure is the one to report
            warnings.warn(f"closing a Sentinel after the test raised {e!r}", stacklevel=1)


@pytest.fixture(scope="module")
def plain_twins() -> dict[tuple[str, float], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The plain twins' losses and final parameters and buffers, on the CPU, by workload and
    dropout: each trains once per module."""
    return {}


def _sentinel(wl: Any, budget: str, made: list[sh.Sentinel]) -> sh.Sentinel:
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, tiers="cuda",
                           trials=TRIALS)
    made.append(sentinel)
    return sentinel


def _train(name: str, budget: str | None, made: list[sh.Sentinel], steps: int = STEPS,
           dropout: float = 0.1, measure_last: bool = False):
    """``steps`` steps of workload ``name``, plain (``budget=None``) or under Sentinel;
    returns the workload, every step's loss, the Sentinel, its phase after each step and
    (``measure_last``) the allocator's peak of active bytes over the last step alone."""
    wl = models.make(name, dropout)
    sentinel = _sentinel(wl, budget, made) if budget else None
    losses, phases = [], []
    peak = None
    for i in range(steps):
        if measure_last and i == steps - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if sentinel is None:
            losses.append(wl.step())
        else:
            with sentinel.step():
                losses.append(wl.step())
            phases.append(sentinel.stats()["phase"])
    torch.cuda.synchronize()
    if measure_last:
        peak = torch.cuda.memory_stats()["active_bytes.all.peak"]
    return wl, losses, sentinel, phases, peak


def _tensors(wl: Any) -> list[torch.Tensor]:
    """Parameters and buffers (batch norm statistics), copied to the CPU."""
    return [t.detach().cpu() for t in (*wl.model.parameters(), *wl.model.buffers())]


def _plain(name: str, twins: dict[Any, Any], dropout: float = 0.1
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The plain twin's losses and final parameters and buffers, on the CPU; its GPU memory is
    released, so that the allocator's peaks in the Sentinel run are that run's own."""
    if (name, dropout) not in twins:
        wl, losses, _, _, _ = _train(name, None, [], dropout=dropout)
        twins[name, dropout] = [loss.cpu() for loss in losses], _tensors(wl)
        del wl, losses
        gc.collect()
        torch.cuda.empty_cache()
    return twins[name, dropout]


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
    assert stats["all_fast_peak_bytes"] >= 1 << 30, (
        f"all-fast peak {stats['all_fast_peak_bytes']} bytes: the test workloads are meant to "
        "peak at 1 GiB or more (models.py)")
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
def test_bitwise_and_within_budget_on_cuda(name, budget, sentinels, plain_twins):
    """Bitwise equal to the plain twin (every loss, the parameters and buffers between steps
    and after ``close()``); the audited peak within the budget; and the allocator's peak of
    active bytes over a real (unaudited, asynchronous) steady step, everything the process
    holds on the GPU included, and blocks waiting for a side stream's copy (NOTE [Evictions
    in flight]), within the budget."""
    plain_losses, plain = _plain(name, plain_twins)
    before = torch.cuda.memory_allocated()
    wl, losses, sentinel, phases, peak = _train(name, budget, sentinels, measure_last=True)
    stats = _assert_steady_and_moving(sentinel, phases)
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"], stats
    assert peak is not None and peak <= stats["budget_bytes"], (
        f"steady step peaked at {peak} bytes on the GPU, over the budget "
        f"{stats['budget_bytes']} (audited {stats['audited_peak_fast_bytes']}; "
        f"{before} bytes were allocated before the run)")
    _assert_equal(losses, plain_losses, "losses")
    _assert_equal(_tensors(wl), plain, "parameters and buffers (between steps)")
    sentinel.close()
    _assert_equal(_tensors(wl), plain, "parameters and buffers (after close)")


@pytest.mark.parametrize("slowed", ["copies", "compute"])
def test_races(slowed, request, sentinels, plain_twins):
    """Copies: each waits ~1 ms on its side stream, so compute that does not wait for a
    prefetch reads an unfilled buffer, and memory freed without ``record_stream`` is reused
    before the eviction reads it. Compute: each module's kernels start ~1 ms late, so an
    eviction that does not wait for the compute stream copies bytes not yet written."""
    calls = request.getfixturevalue("slow_copies") if slowed == "copies" else None
    plain_losses, plain = _plain("gpt", plain_twins)
    wl = models.make("gpt")
    handles = []
    try:
        if slowed == "compute":
            handles = [module.register_forward_pre_hook(
                lambda *_: torch.cuda._sleep(SLEEP_CYCLES)) for module in wl.model.modules()]
        sentinel = _sentinel(wl, "min", sentinels)
        losses, phases = [], []
        for _ in range(STEPS):
            with sentinel.step():
                losses.append(wl.step())
            phases.append(sentinel.stats()["phase"])
        torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    _assert_steady_and_moving(sentinel, phases)
    if calls is not None:
        assert calls, "CudaTiers.copy was never called: the slow-copy hook missed the copies"
    _assert_equal(losses, plain_losses, "losses")
    _assert_equal(_tensors(wl), plain, "parameters and buffers")


def test_state_between_steps_is_complete(slow_copies, sentinels):
    """Optimizer state and parameters read right after each step (no synchronize), as
    ``torch.save`` would, equal the plain twin's: the step's end waits for its own copies.
    Copies are slowed, so a step that ends with copies in flight is caught. The twins train
    side by side (the allocator's peaks include the plain twin's state: "min" is measured
    with it)."""
    plain = models.make("gpt", dropout=0.0)  # no dropout: the twins share the GPU's generator
    wl = models.make("gpt", dropout=0.0)
    sentinel = _sentinel(wl, "min", sentinels)
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


def test_no_growth_over_40_steady_steps(sentinels):
    wl, _, sentinel, phases, _ = _train("cnn", "min", sentinels)
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


def test_an_audit_leaves_the_users_peak_statistics_alone(sentinels):
    """NOTE [Allocator peak]: the audit reads the allocator's history, it does not reset the
    process's peak; and it switches recording off again."""
    big = torch.empty(3 << 30, dtype=torch.uint8, device="cuda")  # above the run's own peak
    del big
    users_peak = torch.cuda.max_memory_allocated()
    _, _, sentinel, phases, _ = _train("gpt", "50%", sentinels)
    _assert_steady_and_moving(sentinel, phases)
    assert sentinel.stats()["audited_peak_fast_bytes"] > 0
    assert torch.cuda.max_memory_allocated() >= users_peak >= 3 << 30
    assert not torch._C._cuda_isHistoryEnabled()


def test_hf_trainer_callback_on_cuda(tmp_path):
    """`SentinelCallback` in a ``transformers.Trainer`` on the GPU, a GPT-2 from a small config
    with its defaults (``use_cache`` on, dropout, eager or sdpa as the library picks) and the
    Trainer's default optimizer: trains every step without an error, reaches the steady
    phase at a binding budget with bytes moving both ways, its audited peak within budget."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    from sentinel_hm.integrations.hf import SentinelCallback

    tf.logging.set_verbosity_error()
    seq, batch, steps = 512, 8, STEPS

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 4096, (steps * batch, seq),
                                     generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Phases(tf.TrainerCallback):
        """Listed after the Sentinel's callback: sees the phase each step ended in."""

        def __init__(self, callback: Any) -> None:
            self.callback, self.phases, self.stats = callback, [], None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.callback.sentinel is not None:
                self.stats = self.callback.sentinel.stats()
                self.phases.append(self.stats["phase"])

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=4096, n_positions=seq, n_embd=256, n_layer=4, n_head=4)
    model = tf.GPT2LMHeadModel(config)
    assert model.config.use_cache  # left at its default
    callback = SentinelCallback(fast_memory="50%")  # tiers "auto": cuda for a model on a GPU
    phases = Phases(callback)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch,
        learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0, dataloader_drop_last=True)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(),
                         callbacks=[callback, phases])
    try:
        trainer.train()
    finally:
        callback.close()  # the Trainer has no hook for an exception (NOTE [Open steps])
    assert next(model.parameters()).is_cuda
    assert trainer.state.global_step == steps
    stats = phases.stats
    assert stats is not None and stats["tiers"].startswith("cuda"), stats
    assert phases.phases[-MIN_STEADY:] == ["steady"] * MIN_STEADY, (phases.phases, stats)
    assert not stats["mismatches"], stats["mismatches"]
    assert stats["budget_bytes"] < stats["all_fast_peak_bytes"], stats
    assert stats["bytes_to_slow_per_step"] > 0 and stats["bytes_to_fast_per_step"] > 0, stats
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"], stats

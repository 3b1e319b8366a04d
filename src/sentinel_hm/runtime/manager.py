"""`Sentinel`: profile the first step, plan, then run the plan in every later step.

Phases: ``warmup`` (a plain step: the optimizer creates its state, and the
step's time calibrates the cost model), ``profile`` (one step under the
tracer), ``tune`` (test-and-trial: a few interval lengths, one step each),
``trial`` (the chosen plan runs in an audited step), ``steady`` (the plan
runs). A step that does not match the profile runs without
migrations and the next step is profiled again.

NOTE [Measured budget]
The plan's fast-memory peak is a prediction; the trial step measures the real
one. If it is over the budget (the program may hold a tensor a little longer
than the trace suggested, an event may come a little after the planned op),
the plan is made again for a budget lowered by the excess, and measured again,
up to ``MAX_REPLANS`` times; after that the step raises `SentinelError`. With
``fast_memory="min"`` the budget is the measured peak of the smallest plan.

Known limitations: parameters move only under direct access (ops read them in
the slow tier); optimizer state and gradients come back as a whole before
``optimizer.step()``, not per parameter; the host tiers' copies share the CPU
with compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.hardware import Access, Hardware
from sentinel_hm.planning.model import Plan, Tier
from sentinel_hm.planning.planner import context, make_plan, min_budget
from sentinel_hm.planning.policies.sentinel import parse_interval_label
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.residency import HeldEntry
from sentinel_hm.runtime.schedule import SavedEvents, Schedule
from sentinel_hm.runtime.steady import SteadyStep
from sentinel_hm.sim.replay import SimResult, simulate
from sentinel_hm.tiers import open_tiers
from sentinel_hm.trace.model import Kind, Trace
from sentinel_hm.trace.tracer import Tracer
from sentinel_hm.units import format_bytes, parse_budget

ARENA_NAME = "sentinel: slow arena"
MAX_REPLANS = 4
_MOVABLE = frozenset({Kind.SAVED_ACTIVATION, Kind.OPTIMIZER_STATE, Kind.GRADIENT})


@dataclass
class Stats:
    """Measured figures (``predicted_*`` come from the simulator, for comparison)."""

    phase: str
    tiers: str
    policy: str
    budget_bytes: int | None = None
    planned_for_bytes: int | None = None  # below the budget after a measured excess
    all_fast_peak_bytes: int | None = None
    steps: int = 0
    step_s: list[float] = field(default_factory=list)  # steady steps (host time: on a GPU a
    # step's kernels may still run when it returns; benchmarks synchronise themselves)
    stall_s: list[float] = field(default_factory=list)
    bytes_to_slow: list[int] = field(default_factory=list)
    bytes_to_fast: list[int] = field(default_factory=list)
    audited_peak_fast_bytes: int | None = None
    predicted_step_s: float | None = None
    predicted_peak_fast_bytes: int | None = None
    profiles: int = 0
    mismatches: list[str] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)  # test-and-trial steps
    chosen_interval: str | None = None

    def summary(self) -> dict[str, Any]:
        def median(xs: list[Any]) -> Any:
            return statistics.median(xs) if xs else None

        return {
            "phase": self.phase, "tiers": self.tiers, "policy": self.policy,
            "budget_bytes": self.budget_bytes, "planned_for_bytes": self.planned_for_bytes,
            "all_fast_peak_bytes": self.all_fast_peak_bytes,
            "steps": self.steps, "median_step_s": median(self.step_s),
            "median_stall_s": median(self.stall_s),
            "bytes_to_slow_per_step": median(self.bytes_to_slow),
            "bytes_to_fast_per_step": median(self.bytes_to_fast),
            "audited_peak_fast_bytes": self.audited_peak_fast_bytes,
            "predicted_step_s": self.predicted_step_s,
            "predicted_peak_fast_bytes": self.predicted_peak_fast_bytes,
            "profiles": self.profiles, "mismatches": list(self.mismatches),
            "trials": list(self.trials), "chosen_interval": self.chosen_interval,
        }


class Sentinel:
    """Run a training loop with ``fast_memory`` of fast memory (bytes, "4GiB", "20%" of the
    profiled all-fast peak, or "min": the smallest budget the policy can honour)::

        sentinel = sh.Sentinel(model, optimizer, fast_memory="20%")
        for batch in loader:
            with sentinel.step():
                loss = model(batch); loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        fast_memory: str | int = "20%",
        tiers: str = "auto",
        policy: str = "sentinel",
        trials: int = 3,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.fast_memory = fast_memory
        self.policy = policy
        if trials < 0:
            raise SentinelError(f"trials={trials} is negative: give 0 (no trials) or more")
        self.trials = trials
        self._tune: list[tuple[str, float]] = []  # interval lengths still to try: (label, predicted)
        if tiers == "auto" and any(p.is_cuda for p in model.parameters()):
            tiers = "cuda"  # the model lives on a GPU: GPU memory is the fast tier
        self.tiers = open_tiers(tiers)
        # device tiers (CUDA) enqueue copies on their own streams instead of mover threads
        self.mover = Mover(device=self.tiers if hasattr(self.tiers, "submit") else None)
        self.trace: Trace | None = None
        self.plan: Plan | None = None
        self.schedule: Schedule | None = None
        self.prediction: SimResult | None = None
        self._held: dict[int, HeldEntry] = {}
        # storages of parameters and buffers: address -> the storage (weakly: an address is
        # reused once a storage dies)
        self._never_copied: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        # A plain warm-up step: the optimizer creates its state (the profiled step must look
        # like the steady ones), and its wall time calibrates the per-op overhead.
        self._phase = "warmup"
        self._plain_step_s: float | None = None
        self._audit_next = False
        self._audit_trace: Trace | None = None
        self._events = SavedEvents()
        self._ctx: Any = None
        self._budget = 0
        self._replans = 0
        self._stats = Stats(self._phase, self.tiers.name, policy)
        self._audit_trace_fresh = False  # the step just run was audited (slow: not timed)
        self._warned = False

    # -- public --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step (forward, backward, optimizer step; several forward/backward
        passes for gradient accumulation)."""
        start = time.perf_counter()
        phase = self._phase
        if phase == "warmup":
            yield
            device = getattr(self.tiers, "device", None)
            if device is not None:  # GPU work is asynchronous: time it to its end
                torch.cuda.synchronize(device)
            self._plain_step_s = time.perf_counter() - start
            self._phase = "profile"
        elif phase == "profile":
            yield from self._profile_step()
        else:
            if phase == "trial":
                self._audit_next = True
            yield from self._steady_step()
            if phase == "tune" and self._phase == "tune":
                self._next_trial(time.perf_counter() - start)
            elif phase == "trial" and self._phase == "trial":
                self._check_measured_peak()
        self._stats.steps += 1
        if phase == "steady" and not self._audit_trace_fresh:
            self._stats.step_s.append(time.perf_counter() - start)
        self._audit_trace_fresh = False
        self._stats.phase = self._phase

    def audit(self) -> None:
        """Trace the next steady step and measure its true peak of fast-tier bytes (every
        storage not in the slow tier); `stats()` reports it as ``audited_peak_fast_bytes``.
        Copies run synchronously during that step so that the tracer sees each of them."""
        self._audit_next = True

    def stats(self) -> dict[str, Any]:
        return self._stats.summary()

    @property
    def steady_step_times(self) -> list[float]:
        """Wall time of each steady step so far (audited steps excluded), in seconds."""
        return list(self._stats.step_s)

    @property
    def audit_trace(self) -> Trace | None:
        """The trace of the last audited step (fast-tier bytes: `fast_bytes_curve`)."""
        return self._audit_trace

    def close(self) -> None:
        """Bring everything back to fast memory and stop the mover: training can go on
        without Sentinel."""
        self._restore()
        self.mover.close()
        self.tiers.close()

    # -- phases --------------------------------------------------------------------------------

    def _profile_step(self) -> Iterator[None]:
        self._restore()
        events = SavedEvents()
        tracer = Tracer(self.model, self.optimizer, on_saved=events)
        tracer.start()
        try:
            yield
        finally:
            trace = tracer.stop()
        self._stats.profiles += 1
        self._events = events
        hw = self._calibrated(trace)
        movable = _MOVABLE if self.tiers.moves_gradients else _MOVABLE - {Kind.GRADIENT}
        if self.tiers.access is Access.DIRECT:  # ops can read parameters in the slow tier
            movable = movable | {Kind.PARAMETER}
        self._ctx = context(trace, hw, movable=movable, stream_optimizer=False)
        if self.fast_memory == "min":
            self._budget = min_budget(self._ctx, self.policy)
        else:
            self._budget = parse_budget(self.fast_memory, trace.peak_bytes)
        self._replans = 0
        self._make_plan(trace, self._budget)
        self._start_trials()

    def _start_trials(self) -> None:
        """Test-and-trial (the seed's method): time a few interval lengths in real steps.

        The candidates are the sentinel policy's feasible interval lengths with the best
        predicted times, the planner's choice first; each runs one step, the fastest
        measured is kept, and its plan then goes through the measured-budget trial.
        """
        assert self.plan is not None
        search = self.plan.info.get("search")
        chosen = self.plan.info.get("layers_per_interval")
        self._tune = []
        self._stats.trials = []
        if self.trials and self.policy == "sentinel" and isinstance(search, dict) and chosen:
            feasible = sorted((v, k) for k, v in search.items()
                              if isinstance(v, float) and parse_interval_label(k))
            self._tune = [(label, predicted) for predicted, label in feasible[: self.trials]]
        if len(self._tune) > 1:
            self._use_interval(self._tune[0][0])
            self._phase = "tune"
        else:
            self._tune = []
            self._phase = "trial"

    def _use_interval(self, label: str) -> None:
        assert self.trace is not None
        length = parse_interval_label(label)
        self._ctx = dataclasses.replace(self._ctx, interval_lengths=(length,), min_budgets={})
        self._make_plan(self.trace, self._budget)

    def _next_trial(self, measured_s: float) -> None:
        label, predicted = self._tune.pop(0)
        self._stats.trials.append({"interval": label, "predicted_s": predicted,
                                   "measured_s": measured_s})
        for next_label, _ in list(self._tune):
            try:
                self._use_interval(next_label)
                return
            except SentinelError:  # this length does not fit the budget after all
                self._tune.pop(0)
        best = min(self._stats.trials, key=lambda t: t["measured_s"])
        self._stats.chosen_interval = str(best["interval"])
        self._use_interval(str(best["interval"]))
        self._phase = "trial"

    def _check_measured_peak(self) -> None:
        """NOTE [Measured budget]."""
        measured = self._stats.audited_peak_fast_bytes
        assert measured is not None and self.trace is not None and self.plan is not None
        if measured <= self._budget:
            self._phase = "steady"
            return
        if self.fast_memory == "min" and self._replans == 0:
            self._budget = measured
            self._stats.budget_bytes = measured
            self._phase = "steady"
            return
        self._replans += 1
        if self._replans > MAX_REPLANS:
            raise SentinelError(
                f"the measured fast-memory peak, {format_bytes(measured)}, stays above the "
                f"budget of {format_bytes(self._budget)} after {MAX_REPLANS} re-plans: raise "
                "fast_memory"
            )
        target = self.plan.budget_bytes - (measured - self._budget)
        self._make_plan(self.trace, target)

    def _calibrated(self, trace: Trace) -> Hardware:
        """The tiers' hardware model, with the per-op framework overhead measured: the plain
        warm-up step's wall time minus the profiled step's op times, per op (the optimizer
        creating its state in the warm-up makes this an upper bound)."""
        hw = self.tiers.hardware()
        if self._plain_step_s is None or not trace.ops or not hw.measured_op_times:
            return hw
        ops_s = sum(op.duration_s for op in trace.ops)
        overhead = max(0.0, (self._plain_step_s - ops_s) / len(trace.ops))
        return dataclasses.replace(hw, op_overhead_s=overhead)

    def _make_plan(self, trace: Trace, target: int) -> None:
        """Plan for ``target`` bytes (the budget, or less after a measured excess)."""
        ctx, budget = self._ctx, self._budget
        hw = ctx.hardware
        self._restore()
        try:
            plan = make_plan(trace, hw, target, self.policy, ctx=ctx)
        except SentinelError:
            if target == budget:
                raise
            raise SentinelError(
                f"the plan for {format_bytes(budget)} measured above it, and no plan fits the "
                f"{format_bytes(target)} that would correct for that: raise fast_memory"
            ) from None
        schedule = Schedule.build(trace, plan, self._events)
        self.trace, self.plan, self.schedule = trace, plan, schedule
        self.prediction = simulate(trace, plan, hw, cost=ctx.cost)
        self._stats.budget_bytes = budget
        self._stats.planned_for_bytes = target
        self._stats.all_fast_peak_bytes = trace.peak_bytes
        self._stats.predicted_step_s = self.prediction.step_s
        self._stats.predicted_peak_fast_bytes = self.prediction.peak_fast_bytes
        self.tiers.reserve(schedule.arena_bytes)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        named = dict(self.model.named_parameters())
        self._held = {}
        for sid, (index, key) in schedule.states.items():
            state = self.optimizer.state[params[index]]
            self._held[sid] = HeldEntry(sid, partial(state.get, key),
                                        partial(state.__setitem__, key), self._slot(sid))
        for sid, name in schedule.grads.items():
            param = named[name]
            self._held[sid] = HeldEntry(sid, partial(getattr, param, "grad"),
                                        partial(setattr, param, "grad"), self._slot(sid))
        for sid, name in schedule.params.items():  # direct access: ops read them in place
            param = named[name]
            self._held[sid] = HeldEntry(sid, partial(_same, param),
                                        partial(self._swap_param, param), self._slot(sid))
        for sid in schedule.start_slow & set(self._held):
            self._held[sid].evict(self.mover, self.tiers)
            self._held[sid].commit(self.mover)
        self.mover.drain()

    def _swap_param(self, param: torch.Tensor, data: torch.Tensor) -> None:
        """Move a parameter (direct access): its new storage is still a parameter's, which
        saved-tensor hooks must recognise and never copy."""
        param.data = data
        _remember(self._never_copied, data)

    def _slot(self, sid: int) -> torch.Tensor:
        assert self.schedule is not None and self.trace is not None
        return self.tiers.slot(self.schedule.slots[sid], self.trace.storages[sid].nbytes)

    def _steady_step(self) -> Iterator[None]:
        assert self.schedule is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        never_copied = self._never_copied
        never_copied.clear()
        for t in (*self.model.parameters(), *self.model.buffers(), *params):
            _remember(never_copied, t)
        arena = self.tiers.arena()
        if arena is not None:  # parameters (direct access) may live there
            _remember(never_copied, arena)
        run = SteadyStep(self.schedule, self.tiers, self.mover, self._held, never_copied)
        self.mover.reset_counters()
        audit = self._audit_next
        self._audit_next = False
        tracer = None
        device = getattr(self.tiers, "device", None)
        if audit:
            self.mover.drain()
            self.mover.synchronous = True
            if device is not None:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            tracer = Tracer(self.model, self.optimizer, track_saved=False)
            arena = self.tiers.arena()
            tracer.start()
            if arena is not None:
                tracer.tag_external(arena, ARENA_NAME)
        handles = [
            self.optimizer.register_step_pre_hook(lambda *_: run.before_optimizer()),
            self.optimizer.register_step_post_hook(lambda *_: run.after_optimizer()),
        ]
        # Nothing saved to manage (a budget that fits the step): no hooks, no cost, and
        # autograd keeps its own checks.
        hooked = bool(self.schedule.managed_saved)
        hooks = (torch.autograd.graph.saved_tensors_hooks(run.pack, run.unpack)
                 if hooked else contextlib.nullcontext())
        try:
            with hooks:
                yield
            run.finish(hooked)
        except BaseException:
            for h in handles:
                h.remove()
            if tracer is not None:
                tracer.stop()
            self.mover.synchronous = False
            self._restore()
            self._phase = "profile"  # start afresh if the loop goes on
            raise
        for h in handles:
            h.remove()
        if tracer is not None:
            self.mover.synchronous = False
            self._audit_trace = tracer.stop()
            self._audit_trace_fresh = True
            measured = max(fast_bytes_curve(self._audit_trace), default=0)
            if device is not None:  # on a GPU the allocator's own peak is the measure
                torch.cuda.synchronize(device)
                measured = max(measured, torch.cuda.max_memory_allocated(device))
            self._stats.audited_peak_fast_bytes = measured
        self._stats.stall_s.append(self.mover.stall_s)
        self._stats.bytes_to_slow.append(self.mover.bytes_moved[Tier.SLOW])
        self._stats.bytes_to_fast.append(self.mover.bytes_moved[Tier.FAST])
        if run.mismatch is not None:
            self._stats.mismatches.append(run.mismatch)
            if not self._warned:
                warnings.warn(
                    f"sentinel: this step does not match the profiled one ({run.mismatch}); "
                    "it ran without migrations, and the next step is profiled again",
                    stacklevel=3,
                )
                self._warned = True
            self._restore()
            self._phase = "profile"

    def _restore(self) -> None:
        """Every managed tensor back in fast memory; nothing left in flight."""
        try:
            self.mover.drain()
        finally:  # even if a copy failed: nothing may stay in the arena
            held, self._held = self._held, {}
            for entry in held.values():
                entry.restore(self.mover, self.tiers)
            self.mover.drain()


def _remember(table: dict[int, weakref.ref[torch.UntypedStorage]], t: torch.Tensor) -> None:
    storage = t.untyped_storage()
    table[storage._cdata] = weakref.ref(storage)


def _same(t: torch.Tensor) -> torch.Tensor:
    """The parameter itself: its identity and version survive ``.data`` swaps."""
    return t


def fast_bytes_curve(trace: Trace) -> tuple[int, ...]:
    """Bytes in the fast tier at each op of an audited step: every live storage but the arena."""
    return trace.live_bytes_of(s for s in trace.storages if s.name != ARENA_NAME)

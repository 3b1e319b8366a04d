"""`Sentinel`: profile the first step, plan, then run the plan in every later step.

Phases: ``warmup`` (``WARMUP_STEPS`` plain steps: the optimizer creates its
state, and the fastest one's time calibrates the cost model), ``profile``
(one step under the tracer), ``tune`` (test-and-trial: a few interval lengths, one step each),
``trial`` (the chosen plan runs in an audited step), ``steady`` (the plan
runs). A step that does not match the profile runs without
migrations and the next step is profiled again.

NOTE [Measured budget]
The plan's fast-memory peak is a prediction; the trial step measures the real
one. If it is over the budget (the program may hold a tensor a little longer
than the trace suggested, an event may come a little after the planned op),
the plan is made again for a budget lowered by the excess, and measured again,
up to ``MAX_REPLANS`` times, the last time as the smallest plan; after that the
step raises `SentinelError`. With
``fast_memory="min"`` the budget is the measured peak of the smallest plan,
rounded up to 1/256 of the all-fast peak. Saved tensors the program itself
holds (its input batch, say) free nothing when evicted; a trial step finds
them, and they are planned as staying fast.

If no plan fits a measured excess, the step raises `SentinelError` naming the
smallest budget measured to work; every tensor is back in fast memory and later
steps run plain (phase ``off``).

What moves: saved activations, parameters (NOTE [Parameter saves]),
gradients (as soon as they are complete) and optimizer state, streamed chunk
by chunk through the update (NOTE [Chunked optimizer step]).

Known limitations: an optimizer that cannot be streamed brings its gradients
and state back whole before ``optimizer.step()``; gradients stay in fast
memory on CUDA; the host tiers' copies share the CPU with compute.

NOTE [One instrument]
The all-fast peak that budgets are shares of, the budget, and the audits that hold a plan to
it are read with one instrument: the tiers' `Meter` (``tiers/base.py``). On CUDA that is the
caching allocator's peak of active bytes, which also holds what no trace sees: the cuBLAS
workspace, kernel scratch, the allocator's rounding, and whatever was resident before the
step (NOTE [Allocator peak]); on the host tiers it is the traced storages. The first
profiled step is metered; what the meter reads beyond the traced peak is the step's
``overhead_bytes``, which no plan can move: the planner plans the traced storages against the
budget less that overhead, and an audit's reading less that overhead is what the plan is held
to. (Before, the all-fast peak came from the trace and the audit from the allocator, and on
small models "50%" was refused as "112% of the all-fast peak".)

NOTE [Parameter saves]
Autograd saves parameters (``weight.t()`` for the input's gradient), which
would keep their fast bytes alive from forward to backward. A save of a
parameter the plan moves is kept as the parameter plus the view's geometry,
and rebuilt over the parameter's current storage when backward unpacks it, so
the parameter can leave fast memory in between. A parameter moves by copying
its bytes and swapping ``param.data``; identity, version counter and the
optimizer's state keys survive the swap.

NOTE [Held by the program]
The trace sees autograd's references, not the program's: a ResNet block's
input stays referenced by the Python frame that called the block (and by the
call's argument tuple, up to the enclosing ``nn.Sequential``) until the block
returns. Evicting such an activation early frees its fast bytes only when the
program lets go. The first plan does not assume it (an eviction issued at the
first save frees the bytes the moment the program lets go; delaying every
eviction past the last forward use, as a rule for all activations, left them in
fast memory until the runtime's next event and raised the small CNN's "min"
from 15.0% to 18.7% of its peak). An audited step watches each evicted storage
(``weakref.finalize``) and notes the runtime clock at which it really died. If
the step was over budget, the plan is made again with those storages held
until then, and at least until their last forward use (``Context.held_until``,
`Context.held_in_forward`), and measured again, before the budget is lowered
by the excess. On a host tier's direct access this turned the small CNN's 50%
trial from a budget lowered by the excess (and given up on at random, as plans
vary with the timings) into one re-plan at the budget asked. The planner cannot
evict a held storage before the program lets go, so the smallest plan with them
held can be far above the one without: a correction that reaches that floor (or
is stuck, or is the last) goes on without the held knowledge, for good in this
profile (tiny HF Llama: 20% was given up on at 509 KiB while "min", planned
without it, trained at 446 KiB).

NOTE [Recomputed layers]
With ``recompute=True`` (the default) the planner may choose, at the profiled
step's budget, to recompute layers instead of keeping or moving their saved
activations (NOTE [Recompute as a trace]). Those layers' forwards are then
wrapped in non-reentrant ``torch.utils.checkpoint`` (which restores the RNG
state, so dropout draws the same) and the next step is profiled again: the
plan of moves is made on the step as it now runs, against the same budget
(shares of the all-fast peak of the program as written). A rerun gives back
the buffers it changed, so batch norm's running statistics are updated once a
step, as without recomputation. When the step as it then runs cannot be held
to the budget (a checkpoint rebuilds all of a layer's saved tensors at once,
on the runtime's clock), the layers get their own forwards back and the step
is profiled again, not recomputing: when planning fails, and when an audited
step's excess fits no correction (the step as written may fit). A rerun must be safe
(NOTE [Safe reruns] in recompute.py): it gets no cache argument and ``use_cache=False``,
it makes the layer's own parameters fast as the forward's pre-hook does
(`_own_params_fast`), and on the recomputing profile step it is checked to rebuild what
the forward saved; a layer whose rerun does not gets its own forward back with a
warning, and the step is profiled again without it (that step itself trains as without
recomputation). Predictions for a recomputing step are
calibrated on the plain warm-up step scaled by the two profiles' op times
(`Sentinel._calibrated`): the reruns cost time.
``close()``, and a budget given up on, restore the layers' own forwards.

NOTE [Checkpoints]
Between steps, parameters and optimizer state in the slow tier are views of
the slow arena, and ``torch.save`` writes a view's whole storage (the arena).
Post-hooks on ``model.state_dict()`` and ``optimizer.state_dict()`` replace
those views with copies that own their bytes (in host memory), so a checkpoint
has the size and contents it has without Sentinel and loads anywhere.
``state_dict(keep_vars=True)`` returns the parameters themselves, unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

import torch
from torch import nn

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Plan, Tier
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.planner import context, explain_min_budget, make_plan, min_budget
from sentinel_hm.planning.policies.sentinel import parse_interval_label
from sentinel_hm.runtime import fsdp
from sentinel_hm.runtime.audit import StepAudit
from sentinel_hm.runtime.calibrate import calibrated
from sentinel_hm.runtime.chunked_optimizer import (
    ChunkedStep,
    chunk_extras,
    merge_chunks,
    param_chunks,
    warn_unstreamed,
    why_not_streamable,
)
from sentinel_hm.runtime.failures import machinery_frame
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.options import check_model_and_optimizer, check_options
from sentinel_hm.runtime.recompute import CheckpointedLayers
from sentinel_hm.runtime.residency import HeldEntry, ResizedEntry
from sentinel_hm.runtime.schedule import Schedule, StepEvents
from sentinel_hm.runtime.steady import SteadyStep, eviction_headroom
from sentinel_hm.sim.replay import SimResult, simulate
from sentinel_hm.tiers import open_tiers
from sentinel_hm.trace.allocation_tracer import AllocationTracer, opaque_to_dynamo
from sentinel_hm.trace.model import Kind, Phase, Trace
from sentinel_hm.trace.sharded import (
    GATHERED,
    has_sharded_parameters,
    is_sharded,
    local_tensor,
)
from sentinel_hm.trace.tracer import Tracer
from sentinel_hm.units import format_bytes, parse_budget

MAX_REPLANS = 4
# plain steps before the profiled one; the first pays one-off costs (optimizer state, fresh
# memory), so the fastest is the one whose time calibrates the simulator
WARMUP_STEPS = 2
_MOVABLE = frozenset({Kind.SAVED_ACTIVATION, Kind.OPTIMIZER_STATE, Kind.GRADIENT,
                      Kind.PARAMETER})


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
    # what the tiers' meter reads beyond the traced storages: never moved (NOTE [One
    # instrument]); budgets, peaks and audits above all include it
    overhead_bytes: int = 0
    # ops of the last audited step that read the slow tier under migrate access (NOTE
    # [Residency guard]): none is the only right number
    residency_violations: list[str] = field(default_factory=list)
    predicted_step_s: float | None = None
    predicted_peak_fast_bytes: int | None = None
    # the fastest plain warm-up step, which predictions are calibrated on: a predicted
    # slowdown is predicted_step_s over it
    plain_step_s: float | None = None
    profiles: int = 0
    mismatches: list[str] = field(default_factory=list)
    trials: list[dict[str, Any]] = field(default_factory=list)  # test-and-trial steps
    chosen_interval: str | None = None
    recomputed_layers: list[str] = field(default_factory=list)  # NOTE [Recomputed layers]
    # saved activations an audited step found the program held after the runtime evicted
    # them, later into the forward pass than the trace saw (NOTE [Held by the program])
    held_by_program_bytes: int = 0
    note: str | None = None  # e.g. why nothing moves

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
            "overhead_bytes": self.overhead_bytes,
            "residency_violations": list(self.residency_violations),
            "predicted_step_s": self.predicted_step_s,
            "predicted_peak_fast_bytes": self.predicted_peak_fast_bytes,
            "plain_step_s": self.plain_step_s,
            "profiles": self.profiles, "mismatches": list(self.mismatches),
            "trials": list(self.trials), "chosen_interval": self.chosen_interval,
            "recomputed_layers": list(self.recomputed_layers),
            "held_by_program_bytes": self.held_by_program_bytes,
            "note": self.note,
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
        recompute: bool = True,
    ) -> None:
        check_model_and_optimizer(model, optimizer)
        check_options(fast_memory, tiers, policy, trials, recompute)
        self.model = model
        self.optimizer = optimizer
        self.fast_memory = fast_memory
        self.policy = policy
        self._sharded = has_sharded_parameters(model)
        # NOTE [Tracing compiled code]: a compiled model is profiled as it runs, compiled
        self._compiled = _compiled_modules(model)
        if self._compiled and self._sharded:
            raise SentinelError(
                f"{self._compiled[0]} is compiled with torch.compile and its parameters are "
                "sharded by FSDP2 (fully_shard): Sentinel does not run the two together yet; "
                "give it the uncompiled model (compiled._orig_mod), or train without Sentinel")
        if self._sharded:
            fsdp.refuse_offload(model)
        self.trials = trials
        self.recompute = recompute
        self._checkpointed = CheckpointedLayers()  # NOTE [Recomputed layers]
        self._peak: int | None = None  # the all-fast peak of the program as the user wrote it
        self._overhead = 0  # NOTE [One instrument]: metered beyond the traced storages
        self._tune: list[tuple[str, float]] = []  # interval lengths still to try: (label, predicted)
        # the fast tier is where the model lives (GPU memory for a model on a GPU)
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if tiers == "auto" and self._device.type == "cuda":
            tiers = "cuda"
        self.tiers = open_tiers(tiers, self._device)
        self.mover = Mover(self.tiers)  # copies run on the tiers' engine (NOTE [Copy engine])
        self.trace: Trace | None = None
        self.plan: Plan | None = None
        self.schedule: Schedule | None = None
        self.prediction: SimResult | None = None
        self._held: dict[int, HeldEntry | ResizedEntry] = {}
        # storages of parameters and buffers: address -> the storage (weakly: an address is
        # reused once a storage dies)
        self._never_copied: dict[int, weakref.ref[torch.UntypedStorage]] = {}
        # parameters the plan moves, by their current fast storage (NOTE [Parameter saves])
        self._moving_params: dict[int, tuple[weakref.ref[torch.UntypedStorage], int,
                                             torch.Tensor]] = {}
        self._param_sid: dict[int, int] = {}  # id(parameter) -> its trace storage, if moved
        self._param_key: dict[int, int] = {}  # its trace storage -> its key in _moving_params
        # a moving parameter's slot address -> (trace storage, the parameter): a save of it as
        # it leaves during the op that read it (NOTE [Parameter saves])
        self._param_slots: dict[int, tuple[int, torch.Tensor]] = {}
        self._shard_sid: dict[int, int] = {}  # NOTE [FSDP2]: the same, for a moving shard
        self._chunk_sids: list[list[int]] = []
        self._named = dict(model.named_parameters())  # the names the tracer gives them
        # NOTE [Chunked optimizer step]: the update streams chunk by chunk when it can
        reason = why_not_streamable(optimizer)
        if self._sharded:  # NOTE [FSDP2]
            warnings.warn(
                "sentinel: the parameters are sharded DTensors (FSDP2's fully_shard): Sentinel "
                "moves saved activations and the local shards of parameters, gradients and "
                "optimizer state; the parameters FSDP2 gathers for a running module stay "
                "where FSDP2 keeps them", stacklevel=2)
        elif reason is not None:
            warn_unstreamed(reason)
        self._chunks = param_chunks(model, optimizer) if reason is None \
            else None
        self._run_chunks = self._chunks  # the plan's, merged from those (_merge_chunks)
        self._closure_seen = False
        self._audited_peaks: list[int] = []  # a plan measured at m fits a budget of m
        self._program_held: set[int] = set()  # saved storages the program itself kept
        # saved storage -> forward op until which the program held it (NOTE [Held by the
        # program])
        self._held_late: dict[int, int] = {}
        self._held_tried: set[frozenset[tuple[int, int]]] = set()
        self._held_dropped = False  # a correction planned without them (_check_measured_peak)
        self._refused: int | None = None  # a budget below the floor, being measured
        self._recompute_undone = False  # recomputing made this budget infeasible
        # Plain warm-up steps: in the first the optimizer creates its state (the profiled step
        # must look like the steady ones) and the allocator touches fresh memory; the wall
        # time of the last calibrates the per-op overhead.
        self._phase = "warmup"
        self._plain_step_s: list[float] = []
        self._program_ops_s = 0.0  # profiled op time of the program as written
        self._audit_next = False
        self._audit_trace: Trace | None = None
        self._headroom: dict[int, int] = {}  # NOTE [Evictions in flight], from the last audit
        self._events = StepEvents()
        self._ctx: Any = None
        self._budget = 0
        self._replans = 0
        self._stats = Stats(self._phase, self.tiers.name, policy)
        self._audit_trace_fresh = False  # the step just run was audited (slow: not timed)
        self._program_ran = False  # the open step's program block returned (NOTE [Failures])
        self._warned = False
        # NOTE [Checkpoints]: a tensor in the slow tier is a view of the arena, and torch.save
        # writes a view's whole storage; state dicts get compact copies of those instead
        self._state_dict_hooks = [
            model.register_state_dict_post_hook(
                lambda _m, state, _prefix, _meta: self._compact(state)),
            optimizer.register_state_dict_post_hook(
                lambda _o, state: self._compact(state["state"])),
        ]

    # -- public --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step (forward, backward, optimizer step; several forward/backward
        passes for gradient accumulation)."""
        start = time.perf_counter()
        phase = self._phase
        if self._compiled and (phase in ("profile", "trial") or self._audit_next) \
                and torch._C._autograd._profiler_enabled():
            raise SentinelError(
                "torch.profiler is running, and this step is one Sentinel must profile or audit: "
                "for a compiled model it reads those steps from torch.profiler itself, and two "
                "profilers do not nest (yours would lose its events). This step did not run: "
                "run it without your profiler, and profile steady steps (once "
                "sentinel.stats()['phase'] == 'steady', with no audit() pending)")
        if phase == "off":  # a budget that could not be held: plain steps (see close())
            yield
        else:
            self._program_ran = False  # set once the program's block has returned
            try:
                yield from self._run_phase(phase, start)
            except SentinelError:
                raise  # the runtime's own verdicts (refusals, misuse): already restored
            except Exception as error:  # NOTE [Failures]
                where = machinery_frame(error, _STEP_CODES)
                if where is None:
                    raise  # the program's own error: Sentinel stays usable
                self._fail(error, where, phase)
        self._stats.steps += 1
        if phase == "steady" and not self._audit_trace_fresh:
            self._stats.step_s.append(time.perf_counter() - start)
        self._audit_trace_fresh = False
        self._stats.phase = self._phase

    def _run_phase(self, phase: str, start: float) -> Iterator[None]:
        """One step of ``phase`` (not ``off``)."""
        if phase == "warmup":
            yield
            self._program_ran = True
            self._synchronize()
            self._plain_step_s.append(time.perf_counter() - start)
            if len(self._plain_step_s) == WARMUP_STEPS:
                self._phase = "profile"
        elif phase == "profile":
            yield from self._profile_step()
        else:
            if phase == "trial":
                self._audit_next = True
            yield from self._steady_step()
            self._synchronize()  # trials and steady steps are timed to their end
            if phase == "tune" and self._phase == "tune":
                self._next_trial(time.perf_counter() - start)
            elif phase == "trial" and self._phase == "trial":
                self._check_measured_peak()

    def _fail(self, error: Exception, where: str, phase: str) -> NoReturn:
        """NOTE [Failures]: the machinery failed; everything is restored, later steps run
        plain, and the user is told what failed and what to do."""
        self._phase = self._stats.phase = "off"
        stuck = []
        for undo in (self._restore, self._checkpointed.restore, self._release):
            try:
                undo()
            except Exception as e:  # each undo runs, whatever the one before did
                stuck.append(f"{type(e).__name__}: {e}")
        done = ("the step itself completed (its update is done)" if self._program_ran else
                "the step did not complete (its gradients are partial): zero them and run "
                "this batch again")
        state = ("everything is back in fast memory, recomputed layers run their own "
                 "forwards and Sentinel's hooks and memory are released" if not stuck else
                 f"restoring failed too ({'; '.join(stuck)}): some tensors may still be in the "
                 "slow tier; save what you can and restart without Sentinel")
        raise SentinelError(
            f"Sentinel failed in its own machinery during a {phase} step, at {where} "
            f"({type(error).__name__}: {error}); {state}; {done}. Training can go on: later "
            "steps run without Sentinel. Please report this, with its traceback") from error

    def _release(self) -> None:
        """The slow arena back to the system (a later plan reserves it again)."""
        self.tiers.close()

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
        with contextlib.ExitStack() as undo:  # every part runs, even if one before raised
            for h in self._state_dict_hooks:
                undo.callback(h.remove)
            self._state_dict_hooks = []
            undo.callback(self.tiers.close)
            undo.callback(self.mover.close)
            undo.callback(self._checkpointed.restore)
            self._restore()

    def _synchronize(self) -> None:
        """GPU work is asynchronous: a step's time runs to the end of its kernels."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _compact(self, state: dict[Any, Any]) -> None:
        """NOTE [Checkpoints]: arena views in a state dict (nested one level, as the
        optimizer's per-parameter state is) become copies that own their bytes. A nested dict
        is the optimizer's own (``optimizer.state[p]``: ``state_dict()`` does not copy it), so
        it is replaced by a new one, never changed: the optimizer keeps its tensors."""
        for key, value in state.items():
            if isinstance(value, dict):
                if any(self._is_slow_state(v) for v in value.values()):
                    state[key] = {k: v.clone() if self._is_slow_state(v) else v
                                  for k, v in value.items()}
            elif self._is_slow_state(value):
                state[key] = value.clone()

    def _is_slow_state(self, value: Any) -> bool:
        return (isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
                and self.tiers.is_slow(local_tensor(value).untyped_storage()))

    # -- phases --------------------------------------------------------------------------------

    def _profile_step(self) -> Iterator[None]:
        self._restore()
        events = StepEvents()
        tracer = self._tracer(on_saved=events)
        handles = self._grad_hooks(
            lambda name: tracer.at_next_op(partial(events.grad_ready, name)))
        chunked = None
        if self._chunks is not None:  # the profile sees the update as it will run
            chunked = ChunkedStep(self.optimizer, self._chunks,
                                  lambda c: tracer.mark_optimizer_chunk(), self._saw_closure)
            chunked.install()
        meter = self.tiers.meter()  # NOTE [One instrument]
        meter.start()
        self._checkpointed.verifying = True  # NOTE [Safe reruns]: reruns repeat their forwards
        tracer.start()
        try:
            yield
            self._program_ran = True
        finally:
            self._checkpointed.verifying = False
            trace = tracer.stop()
            metered = meter.stop(trace.peak_bytes)
            for h in handles:
                h.remove()
            if chunked is not None:
                chunked.remove()
        self._stats.profiles += 1
        if self._checkpointed.diverged:  # NOTE [Safe reruns]: a rerun did not repeat its forward
            self._give_up_unsafe_reruns()
            return
        self._events = events
        self._program_held = set()  # storage ids are the new trace's
        self._held_late, self._held_tried, self._held_dropped = {}, set(), False
        if not self._checkpointed:
            self._program_ops_s = sum(op.duration_s for op in trace.ops)
        trace, hw = self._calibrated(trace)
        movable = _MOVABLE if self.tiers.moves_gradients else _MOVABLE - {Kind.GRADIENT}
        fixed: frozenset[int] = frozenset()
        if self._sharded:  # NOTE [FSDP2]: the parameters FSDP2 gathers are its own
            fixed = frozenset(s.id for s in trace.storages if s.kind is Kind.PARAMETER
                              and (s.name or "").endswith(GATHERED))
        if self._compiled:  # NOTE [Tracing compiled code]: a graph's reads are not seen
            movable -= {Kind.PARAMETER}
        streamed = "optimizer_chunks" in trace.meta
        self._ctx = dataclasses.replace(
            context(trace, hw, movable=movable, stream_optimizer=streamed,
                    clock=events.clock(trace), device=str(self._device)), fixed=fixed)
        if not self._checkpointed:  # the program as written: budgets are shares of its peak
            self._peak = trace.peak_bytes
            self._overhead = self._stats.overhead_bytes = max(0, metered - trace.peak_bytes)
        peak = self._program_peak
        if self.fast_memory == "min":
            self._budget = min(min_budget(self._ctx, self.policy), peak)
        else:  # NOTE [One instrument]: the plan holds the traced storages to what is left
            self._budget = parse_budget(self.fast_memory, self._metered_peak) - self._overhead
        if self._recompute_layers(trace):
            self._phase = "profile"  # NOTE [Recomputed layers]: profiled again, recomputing
            return
        if self.fast_memory == "min" and self._budget >= peak:
            self._stats.note = (
                f"no plan makes this step's fast-memory peak smaller than its all-fast "
                f"peak, {format_bytes(self._metered_peak)}: nothing moves"
            )
            warnings.warn(f"sentinel: {self._stats.note}", stacklevel=4)
        self._replans = 0
        self._refused = None
        try:
            self._make_plan(trace, self._budget)
        except SentinelError:
            floor = min_budget(self._ctx, self.policy)  # remembered from the refusal
            if self._budget >= floor:
                raise
            if self._checkpointed and self.fast_memory != "min":
                # NOTE [Recomputed layers]: the step as it runs recomputing does not fit a
                # budget the step as written does (a checkpoint rebuilds a layer's saved
                # tensors at once, before its backward): profile again without recomputing
                self._checkpointed.restore()
                self._stats.recomputed_layers = []
                self._recompute_undone = True
                self._phase = "profile"
                return
            # NOTE [Measured budget]: the refusal quotes the smallest plan's measured peak, so
            # the figure it names is one that holds; the trial step measures it
            self._refused, self._budget = self._budget, floor
            self._make_plan(trace, floor)
            self._phase = "trial"
            return
        self._start_trials()

    def _tracer(self, **kwargs: Any) -> Tracer | AllocationTracer:
        """The tracer that sees this model's steps as they run (NOTE [Tracing compiled code])."""
        if self._compiled:
            return AllocationTracer(self.model, self.optimizer, **kwargs)
        return Tracer(self.model, self.optimizer, **kwargs)

    def _note_held_late(self, freed_late: dict[int, int]) -> None:
        """NOTE [Held by the program]: evictions whose bytes died later in the forward pass
        (those that died in backward were held to the end: ``_program_held``)."""
        assert self.trace is not None
        backward = next((op.index for op in self.trace.ops if op.phase is Phase.BACKWARD), None)
        self._held_late.update((sid, op) for sid, op in freed_late.items()
                               if backward is None or op < backward)
        self._stats.held_by_program_bytes = sum(self.trace.storages[sid].nbytes
                                                for sid in self._held_late)

    @property
    def _metered_peak(self) -> int:
        """The all-fast peak as the tiers' meter reads it (NOTE [One instrument]): the one
        budgets are shares of, and the one stats report."""
        return self._program_peak + self._overhead

    @property
    def _program_peak(self) -> int:
        """The all-fast peak of the program as written (before any layer was recomputed),
        which budgets are shares of; known from the first profile on."""
        assert self._peak is not None
        return self._peak

    def _recompute_layers(self, trace: Trace) -> bool:
        """NOTE [Recomputed layers]: whether the planner recomputes layers at this budget; if
        so, they are wrapped in checkpoints and the step must be profiled again."""
        if (not self.recompute or self._checkpointed or self.policy != "sentinel"
                or self._compiled  # inductor chooses what a compiled region recomputes
                or self._recompute_undone):
            return False
        modules = dict(self.model.named_modules())
        allowed = frozenset(layer.index for layer in trace.layers  # NOTE [Safe reruns]
                            if layer.name and layer.name in modules
                            and layer.name not in self._checkpointed.unsafe)
        if not allowed:
            return False
        # the choice is the planner's (on the profiled step, before the runtime's clock:
        # the clock's op indices are the profiled step's, and a recomputing step has more ops)
        ctx = dataclasses.replace(self._ctx, clock=None, recompute=allowed, min_budgets={})
        budget = self._budget if self.fast_memory != "min" else min_budget(ctx, self.policy)
        if budget >= trace.peak_bytes:
            return False
        try:
            plan = make_plan(trace, ctx.hardware, budget, self.policy, ctx=ctx)
        except SentinelError:
            return False
        if not plan.recompute:
            return False
        for index in plan.recompute:
            name = trace.layers[index].name
            self._checkpointed.wrap(name, modules[name])
        self._stats.recomputed_layers = self._checkpointed.names
        return True

    def _own_params_fast(self, run: SteadyStep) -> Callable[[nn.Module], None] | None:
        """NOTE [Safe reruns]: what a recomputed layer calls before its forward and its rerun:
        its own moving parameters fast, as its forward pre-hook makes them (`_fetch_hooks`)."""
        if self.tiers.access is not Access.MIGRATE or not self._param_sid:
            return None
        param_sid = self._param_sid

        def own_params_fast(module: nn.Module) -> None:
            run.module_pre_forward([param_sid[id(p)] for p in module._parameters.values()
                                    if p is not None and id(p) in param_sid])

        return own_params_fast

    def _give_up_unsafe_reruns(self) -> None:
        """NOTE [Safe reruns]: layers whose reruns did not repeat their forwards on the step
        just profiled (which trained as without recomputation) get their own forwards back,
        for good; the next step is profiled without them."""
        for name, why in self._checkpointed.give_up_diverged().items():
            warnings.warn(
                f"sentinel: layer {name!r} is not recomputed: {why}. A rerun must repeat "
                "the layer's forward, and this one did not (it replays a side effect, such as "
                "appending to a cache it was given, or reads state that changed). This step "
                "trained as without recomputing it, and the next is profiled again without "
                "it; nothing to do, unless you want it recomputed: then its forward must "
                "depend on its arguments only (a cache passed as `cache` or `past_key_values` "
                "is withheld from reruns, as Hugging Face's checkpointing does)", stacklevel=5)
        self._stats.recomputed_layers = self._checkpointed.names
        self._phase = "profile"

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
        metered = self._stats.audited_peak_fast_bytes
        assert metered is not None and self.trace is not None and self.plan is not None
        measured = metered - self._overhead  # what the plan's storages held (One instrument)
        held = self._program_held - self._ctx.fixed
        if measured > self._budget and held:
            # evictions that freed nothing (the program holds those tensors): plan them as
            # staying in fast memory, and measure again
            self._ctx = dataclasses.replace(self._ctx, fixed=self._ctx.fixed | held,
                                            min_budgets={})
            if self.fast_memory == "min" or self._refused is not None:
                self._budget = min(min_budget(self._ctx, self.policy), self._program_peak)
            try:
                self._make_plan(self.trace, self._budget)
                return
            except SentinelError:
                pass  # this budget cannot be met with them in fast memory: say so below
        if self._refused is not None:
            self._refuse(measured)
        known = dict(self._ctx.held_until)
        late = {sid: op for sid, op in self._held_late.items() if op > known.get(sid, -1)}
        # not for "min", whose budget is what the smallest plan measures: the planner's view
        # of held storages is cautious (it cannot issue their eviction before the program
        # lets go), so its floor with them would be above that
        if (measured > self._budget and late and self.fast_memory != "min"
                and not self._held_dropped
                and (tried := frozenset(late.items())) not in self._held_tried):
            self._held_tried.add(tried)
            # evictions that freed their bytes only later in the forward pass: plan them as
            # the program holds them (NOTE [Held by the program]), and measure again
            # (if no plan fits with them held, correct as below)
            before = self._ctx
            self._ctx = dataclasses.replace(
                before, held_until=tuple(sorted((known | late).items())), min_budgets={})
            target = self.plan.budget_bytes  # after a correction, lower than the budget
            try:
                self._make_plan(self.trace, target)
                return
            except SentinelError:
                self._ctx = before
                self._make_plan(self.trace, target)  # the plan measured (_make_plan restored)
        if measured <= self._budget:
            self._phase = "steady"
            return
        if self.fast_memory == "min" and self._replans == 0:
            self._budget = self._rounded(measured)
            self._stats.budget_bytes = self._budget + self._overhead
            self._phase = "steady"
            return
        self._replans += 1
        if self._ctx.interval_lengths is not None:
            # the tuned interval length measured over its prediction: correct from the
            # planner's choice among every length (another may fit where this one cannot)
            self._ctx = dataclasses.replace(self._ctx, interval_lengths=None, min_budgets={})
        # lowered by the excess, but never below the smallest plan (measured next); when a
        # correction did not lower the measured peak, or on the last try, the smallest plan
        # itself (a refusal's quoted figure was measured on it)
        floor = min_budget(self._ctx, self.policy)
        target = self.plan.budget_bytes - (measured - self._budget)
        stuck = self._replans > 1 and measured >= self._audited_peaks[-2]
        if self._ctx.held_until and (target <= floor or stuck or self._replans == MAX_REPLANS):
            # NOTE [Held by the program]: the planner's view of held storages is cautious (no
            # eviction before the program lets go), so its smallest plan with them can be far
            # above the smallest plan without them, which "min" measures: when the correction
            # reaches the first, correct without them (for good: they did not fit)
            base = dataclasses.replace(self._ctx, held_until=(), min_budgets={})
            if (base_floor := min_budget(base, self.policy)) < floor:
                self._ctx, floor, self._held_dropped = base, base_floor, True
        target = max(target, floor)
        if stuck or self._replans == MAX_REPLANS:
            target = floor
        if self._replans <= MAX_REPLANS and target < self.plan.budget_bytes:
            try:
                self._make_plan(self.trace, target)
                return
            except SentinelError:
                pass  # no plan fits the corrected target
        if self._checkpointed and self.fast_memory != "min":
            # NOTE [Recomputed layers]: the step as it runs recomputing could not be held to
            # the budget it measured against, which the step as written may be (its smallest
            # plan is the one a refusal quotes): profile again without recomputing
            self._restore()
            self._checkpointed.restore()
            self._stats.recomputed_layers = []
            self._recompute_undone = True
            self._phase = "profile"
            return
        self._give_up(
            f"the plan for fast_memory={self.fast_memory!r} ({format_bytes(self._budget)}) "
            f"measured {format_bytes(measured)} in fast memory, and no plan fits the "
            f"{format_bytes(target)} that would correct for that"
        )

    def _rounded(self, measured: int) -> int:
        """A measured peak rounded up to the planner's resolution (1/256 of the peak): a later
        step may allocate a few bytes more (a loss the loop keeps, say)."""
        assert self.trace is not None
        grain = max(1, self._program_peak // 256)
        return -(-measured // grain) * grain

    def _refuse(self, measured: int) -> None:
        """The budget asked for is below the smallest plan, which measured ``measured``."""
        assert self.trace is not None and self._refused is not None
        peak = self._metered_peak
        asked, self._refused = self._refused + self._overhead, None
        quote = max(self._rounded(measured), min_budget(self._ctx, self.policy)) + self._overhead
        where = explain_min_budget(self._ctx, self.policy).describe("the smallest plan")
        self._restore()
        self._release()
        self._phase = self._stats.phase = "profile"  # a new fast_memory is tried afresh
        raise SentinelError(
            f"fast_memory={self.fast_memory!r} ({format_bytes(asked)}, {asked / peak:.0%} of "
            f"the all-fast peak) is below what this step can be held to: the smallest it can "
            f"honour is {format_bytes(quote)} ({quote} bytes, {quote / peak:.0%}), the "
            f"measured peak of its smallest plan: raise fast_memory; {where}. This step "
            "trained normally"
        )

    def _give_up(self, why: str) -> None:
        """NOTE [Measured budget]: everything back in fast memory, later steps run plain."""
        works = min(self._audited_peaks, default=None)
        works = self._rounded(works) + self._overhead if works is not None else None
        peak = self._metered_peak if self._peak is not None else 0
        advice = (
            f"the smallest budget measured to work is {format_bytes(works)}"
            f" ({works / peak:.0%} of the all-fast peak): use fast_memory={works} or more"
            if works is not None and peak else "raise fast_memory"
        )
        self._restore()
        self._checkpointed.restore()
        self._release()
        self._phase = self._stats.phase = "off"
        raise SentinelError(f"{why}; {advice}. Training can go on: later steps run without "
                            "Sentinel (everything is back in fast memory)")

    def _calibrated(self, trace: Trace) -> tuple[Trace, Hardware]:
        """The trace and the tiers' hardware model, calibrated on the fastest plain warm-up
        step (the first pays one-off costs; on a shared machine either may be slowed).

        A step that recomputes layers (NOTE [Recomputed layers]) does more than the plain
        warm-up steps did: its reference is the plain step scaled by its profiled op time
        over the program's, so the reruns are predicted to cost time, not absorbed into the
        per-op overhead."""
        hw = self.tiers.hardware()
        if not self._plain_step_s or not hw.measured_op_times:
            return trace, hw
        plain_s = min(self._plain_step_s)
        self._stats.plain_step_s = plain_s
        if self._checkpointed and self._program_ops_s:
            plain_s *= sum(op.duration_s for op in trace.ops) / self._program_ops_s
        return calibrated(trace, hw, plain_s)

    def _make_plan(self, trace: Trace, target: int) -> None:
        """Plan for ``target`` bytes (the budget, or less after a measured excess)."""
        ctx, budget = self._ctx, self._budget
        hw = ctx.hardware
        self._restore()
        self._headroom = {}  # measured again by this plan's trial
        # nothing moves for nothing: a budget that holds the whole step gets the all-fast plan
        policy = "all-fast" if target >= trace.peak_bytes else self.policy
        plan = make_plan(trace, hw, target, policy, ctx=ctx)
        schedule = Schedule.build(trace, plan, self._events)
        self.trace, self.plan, self.schedule = trace, plan, schedule
        self.prediction = simulate(trace, plan, hw, cost=ctx.cost)
        self._stats.budget_bytes = budget + self._overhead  # NOTE [One instrument]
        self._stats.planned_for_bytes = target + self._overhead
        self._stats.all_fast_peak_bytes = self._metered_peak
        self._stats.predicted_step_s = self.prediction.step_s
        self._stats.predicted_peak_fast_bytes = self.prediction.peak_fast_bytes
        self.tiers.reserve(schedule.arena_bytes)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        named = self._named
        self._held = {}
        self._moving_params = {}
        self._param_key = {}
        self._param_slots = {}
        self._param_sid = {}
        self._shard_sid = {}
        owners: dict[int, set[int]] = {}  # held trace storage -> id() of its parameters
        groups = fsdp.groups(self.model) if self._sharded else {}
        for sid, (index, key) in schedule.states.items():
            state = self.optimizer.state[params[index]]
            get, put = ((partial(fsdp.local_of, state, key), partial(fsdp.put_local, state, key))
                        if is_sharded(state.get(key)) else
                        (partial(state.get, key), partial(state.__setitem__, key)))
            self._held[sid] = HeldEntry(sid, get, put, self._slot(sid))
            owners[sid] = {id(params[index])}
        for sid, name in schedule.grads.items():
            param = named[name]
            owners[sid] = {id(param)}
            if self._sharded:  # NOTE [FSDP2]: a group's gradients share one storage
                self._held[sid] = ResizedEntry(sid, partial(fsdp.local_grad, param),
                                               self._slot(sid))
                owners[sid] = groups.get(id(param), owners[sid])
            else:
                self._held[sid] = HeldEntry(sid, partial(getattr, param, "grad"),
                                            partial(setattr, param, "grad"), self._slot(sid))
        for sid, name in schedule.params.items():  # NOTE [Parameter saves]
            param = named[name]
            owners[sid] = {id(param)}
            if self._sharded:  # NOTE [FSDP2]: a shard moves in place
                self._held[sid] = ResizedEntry(sid, partial(local_tensor, param),
                                               self._slot(sid))
                self._shard_sid[id(param)] = sid
                continue
            slot = self._slot(sid)
            self._held[sid] = HeldEntry(sid, partial(_same, param),
                                        partial(self._swap_param, param, sid), slot)
            self._param_slots[slot.data_ptr()] = (sid, param)  # NOTE [Parameter saves]
            self._param_sid[id(param)] = sid
            self._track_param(param, sid)
        self._chunk_sids = [
            [sid for sid, ps in owners.items() if ps & members]
            for members in ({id(p) for p in chunk} for chunk in self._chunks or ())
        ]
        self._merge_chunks(trace, target)
        for sid in schedule.start_slow & set(self._held):
            if isinstance(self._held[sid], ResizedEntry):
                continue  # back at every step's end, out at the next one's start
            self._held[sid].evict(self.mover, self.tiers)
            self._held[sid].commit(self.mover)
        self.mover.drain()

    def _merge_chunks(self, trace: Trace, target: int) -> None:
        """NOTE [Chunked optimizer step]: the chunks this plan runs, merged from the profiled
        ones (one parameter each) where the plan does not act between them."""
        schedule, chunks = self.schedule, self._chunks
        assert schedule is not None and self.prediction is not None
        self._run_chunks = chunks
        if chunks is None or len(schedule.chunk_ops) != len(chunks):
            return
        end = schedule.optimizer_end if schedule.optimizer_end is not None else schedule.n_ops
        extras, headroom = chunk_extras(trace, schedule.chunk_ops, end,
                                        self.prediction.fast_bytes, target)
        groups = merge_chunks(schedule.chunk_ops, self._chunk_sids, schedule.moves,
                              schedule.start_slow, extras, headroom)
        self._run_chunks = [[p for k in group for p in chunks[k]] for group in groups]
        self._chunk_sids = [[sid for k in group for sid in self._chunk_sids[k]]
                            for group in groups]
        self.schedule = schedule.merged_chunks(groups)

    def _swap_param(self, param: torch.Tensor, sid: int, data: torch.Tensor) -> None:
        """Move a parameter: ``param.data`` is swapped; its new storage is still a
        parameter's, which saved-tensor hooks must recognise (NOTE [Parameter saves])."""
        param.data = data
        _remember(self._never_copied, data)
        self._track_param(param, sid)

    def _track_param(self, param: torch.Tensor, sid: int) -> None:
        # The storage it leaves is no longer the parameter's: a view the program took before
        # the move (MultiheadAttention splits in_proj_weight, then saves each part in turn)
        # is saved as it is (its storage is one of ``_never_copied``), not rebuilt over the
        # parameter's new storage at an offset that is not its own.
        # (in place: the running step holds this table)
        left = self._param_key.pop(sid, None)
        if left is not None and self._moving_params.get(left, (None, -1))[1] == sid:
            del self._moving_params[left]  # (unless its address is another's storage now)
        storage = param.untyped_storage()
        if not self.tiers.is_slow(storage):  # the arena is every slow parameter's storage
            self._moving_params[storage._cdata] = (weakref.ref(storage), sid, param)
            self._param_key[sid] = storage._cdata

    def _slot(self, sid: int) -> torch.Tensor:
        assert self.schedule is not None and self.trace is not None
        return self.tiers.slot(self.schedule.slots[sid], self.trace.storages[sid].nbytes)

    def _saw_closure(self) -> None:
        if not self._closure_seen:
            self._closure_seen = True
            warn_unstreamed("optimizer.step() was given a closure")

    def _grad_hooks(self, ready: Callable[[str], None]) -> list[Any]:
        """Post-accumulate-grad hooks: a gradient is complete (a clock event)."""
        return [p.register_post_accumulate_grad_hook(lambda _, name=name: ready(name))
                for name, p in self._named.items() if p.requires_grad]

    def _fetch_hooks(self, run: SteadyStep) -> list[Any]:
        """Migrate access: a module's own moving parameters are fast before it runs (the plan
        prefetched them; if not, they come back now, as a stall)."""
        if self.tiers.access is not Access.MIGRATE or not self._param_sid:
            return []
        handles = []
        for module in self.model.modules():
            sids = [self._param_sid[id(p)] for p in module._parameters.values()
                    if p is not None and id(p) in self._param_sid]
            if sids:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, _a, sids=sids: run.module_pre_forward(sids)))
        return handles

    def _fsdp_hooks(self, run: SteadyStep,
                    never_copied: dict[int, weakref.ref[torch.UntypedStorage]]) -> list[Any]:
        """NOTE [FSDP2] (``runtime/fsdp.py``): gathered parameters are never copied, and the
        shards and gradients FSDP2 reads are fast first."""
        if not self._sharded:
            return []
        assert self.schedule is not None
        grad_sid = {id(self._named[name]): sid for sid, name in self.schedule.grads.items()}
        return [*fsdp.gathered_hooks(self.model, partial(_remember, never_copied)),
                *fsdp.guards(self.model, run, self._shard_sid, grad_sid)]

    def _steady_step(self) -> Iterator[None]:
        assert self.schedule is not None
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        never_copied = self._never_copied
        never_copied.clear()
        for t in (*self.model.parameters(), *self.model.buffers(), *params):
            _remember(never_copied, t)
        arena = self.tiers.arena()
        if arena is not None:  # parameters in the slow tier live there
            _remember(never_copied, arena)
        run = SteadyStep(self.schedule, self.tiers, self.mover, self._held, never_copied,
                         self._moving_params, self._chunk_sids)
        run.headroom = self._headroom
        run.param_slots = self._param_slots
        self.mover.reset_counters()
        audit = self._audit_next
        self._audit_next = False
        run.watch_frees = audit
        auditing = (StepAudit(self._tracer(track_saved=False), self.tiers.meter(), self.mover,
                              self.tiers, self.model, guard=not self._compiled)
                    if audit else None)
        if auditing is not None:
            auditing.start(run)
        handles = [*self._grad_hooks(run.grad_ready), *self._fetch_hooks(run),
                   *self._fsdp_hooks(run, never_copied)]
        chunked = None
        if self._run_chunks is not None and self.schedule.chunk_ops:
            chunked = ChunkedStep(self.optimizer, self._run_chunks, run.before_chunk,
                                  run.before_optimizer)
            chunked.install()
        else:
            handles.append(self.optimizer.register_step_pre_hook(
                lambda *_: run.before_optimizer()))
        handles.append(self.optimizer.register_step_post_hook(lambda *_: run.after_optimizer()))
        # Nothing saved to manage (a budget that fits the step): no hooks, no cost, and
        # autograd keeps its own checks.
        hooked = bool(self.schedule.managed_saved or self.schedule.params)
        # a compiled region calls the hooks: they run eagerly (opaque_to_dynamo); an eager
        # model's pack and unpack are not wrapped (a wrapper costs on every save)
        pack_unpack = (opaque_to_dynamo(run.pack, run.unpack) if self._compiled
                       else (run.pack, run.unpack))
        hooks = (torch.autograd.graph.saved_tensors_hooks(*pack_unpack)
                 if hooked else contextlib.nullcontext())

        if self._checkpointed:  # NOTE [Safe reruns]: a rerun runs no forward pre-hooks
            self._checkpointed.before_forward = self._own_params_fast(run)

        def unhook() -> None:
            self._checkpointed.before_forward = None
            for h in handles:
                h.remove()
            if chunked is not None:
                chunked.remove()

        run.start()
        try:
            with hooks:
                yield
            self._program_ran = True
            run.finish(hooked)
        except BaseException:
            unhook()
            if auditing is not None:
                auditing.abort()
            self._restore()
            self._phase = "profile"  # start afresh if the loop goes on
            raise
        unhook()
        if auditing is not None:
            result = auditing.finish()
            self._audit_trace = result.trace
            self._audit_trace_fresh = True
            self._stats.audited_peak_fast_bytes = result.metered_peak
            self._stats.residency_violations = list(result.violations)
            if result.violations:  # NOTE [Residency guard]: a device mismatch on a GPU
                warnings.warn(
                    f"sentinel: an audited step read the slow tier {len(result.violations)} "
                    f"time(s) under migrate access, which on a GPU fails or runs on the host; "
                    f"first: {result.violations[0]}. Please report it "
                    "(stats()['residency_violations'] lists them)", stacklevel=3)
            # the plan's storages (NOTE [One instrument])
            measured = result.metered_peak - self._overhead
            self._audited_peaks.append(measured)
            if run.mismatch is None:
                self._headroom = eviction_headroom(run.ticks, result.curve, self._budget,
                                                   max(0, measured - result.traced_peak))
        self._program_held |= run.program_held
        if run.freed_late:  # found by audited steps only
            self._note_held_late(run.freed_late)
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
            self._moving_params = {}
            self._param_key = {}
            self._param_slots = {}
            self._param_sid = {}


def _compiled_modules(model: nn.Module) -> list[str]:
    """Names of the modules compiled with ``torch.compile(module)`` or ``module.compile()``."""
    return [name or "the model" for name, m in model.named_modules()
            if getattr(m, "_compiled_call_impl", None) is not None
            or "_orig_mod" in m._modules]


def _remember(table: dict[int, weakref.ref[torch.UntypedStorage]], t: torch.Tensor) -> None:
    storage = local_tensor(t).untyped_storage()
    table[storage._cdata] = weakref.ref(storage)


def _same(t: torch.Tensor) -> torch.Tensor:
    """The parameter itself: its identity and version survive ``.data`` swaps."""
    return t


# the step's own context managers: the program's error is thrown into them (NOTE [Failures])
_STEP_CODES = frozenset({Sentinel.step.__wrapped__.__code__,  # type: ignore[attr-defined]
                         Sentinel._run_phase.__code__, Sentinel._steady_step.__code__,
                         Sentinel._profile_step.__code__})

"""Audited steps: the fast tier's true peak in a steady step, measured, not modeled.

An audited step runs its copies synchronously, so that the tracer sees each of them, under
the tracer, the tiers' meter (NOTE [One instrument] in ``manager.py``) and the residency
guard (NOTE [Residency guard]: under migrate access no op may read the slow tier). What it
yields: the audit trace (fast-tier bytes at each op: `fast_bytes_curve`), the traced peak,
the meter's peak and the guard's violations.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.residency_guard import ResidencyGuard
from sentinel_hm.runtime.steady import SteadyStep
from sentinel_hm.tiers.base import Meter, Tiers
from sentinel_hm.trace.allocation_tracer import AllocationTracer
from sentinel_hm.trace.model import Trace
from sentinel_hm.trace.tracer import Tracer

ARENA_NAME = "sentinel: slow arena"


def fast_bytes_curve(trace: Trace) -> tuple[int, ...]:
    """Bytes in the fast tier at each op of an audited step: every live storage but the arena."""
    return trace.live_bytes_of(s for s in trace.storages if s.name != ARENA_NAME)


@dataclass(frozen=True)
class AuditResult:
    trace: Trace
    curve: tuple[int, ...]  # fast-tier bytes at each op of the audit trace
    traced_peak: int
    metered_peak: int  # the tiers' meter, never below the traced peak
    violations: tuple[str, ...] = ()  # ops that read the slow tier (NOTE [Residency guard])


class StepAudit:
    """One audited steady step: `start` before the program runs, then `finish` (or `abort`
    if the step raised)."""

    def __init__(self, tracer: Tracer | AllocationTracer, meter: Meter, mover: Mover,
                 tiers: Tiers, model: nn.Module, guard: bool = True) -> None:
        """``guard=False`` for a compiled model: a dispatch mode on the stack makes dynamo
        recompile its regions (or run them eagerly), so only eager steps are guarded."""
        self.tracer = tracer
        self.meter = meter
        self.mover = mover
        self.tiers = tiers
        self.guard = ResidencyGuard(tiers, model, collect=True) if guard else None

    def start(self, run: SteadyStep) -> None:
        self.mover.drain()
        self.mover.synchronous = True
        self.meter.start()
        self.tracer.start()
        run.audit_at = self.tracer.at_next_op
        arena = self.tiers.arena()
        if arena is not None:
            self.tracer.tag_external(arena, ARENA_NAME)
        if self.guard is not None:  # innermost: it sees the program's ops as issued
            self.guard.__enter__()

    def abort(self) -> None:
        """The step raised: tracer and meter off (the allocator's history recording too)."""
        try:
            if self.guard is not None:
                self.guard.__exit__(None, None, None)
            self.tracer.stop()
        finally:
            self.mover.synchronous = False
            self.meter.stop(0)

    def finish(self) -> AuditResult:
        self.mover.synchronous = False
        if self.guard is not None:
            self.guard.__exit__(None, None, None)
        trace = self.tracer.stop()
        curve = fast_bytes_curve(trace)
        traced = max(curve, default=0)
        return AuditResult(trace, curve, traced, max(self.meter.stop(traced), traced),
                           tuple(str(v) for v in self.guard.violations) if self.guard else ())

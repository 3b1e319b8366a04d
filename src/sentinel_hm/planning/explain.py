"""`explain_peak`: where a plan's fast-memory occupancy peaks and what is live there.

A refused budget is only useful if the user learns what to change: when the
floor is set by activations, a smaller batch or a chunked loss lowers it; when
it is set by model state, only more fast memory (or keeping fewer parameters in
it) does. The figures come from replaying the plan (`simulate` with
``snapshot_at``), so they add up to the simulator's occupancy at that op.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from dataclasses import dataclass

from sentinel_hm.core.plan import Plan, Tier
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.policies import Context, recomputing
from sentinel_hm.sim.replay import SimResult, simulate
from sentinel_hm.trace.model import Kind, Phase, StorageRecord
from sentinel_hm.units import format_bytes

_LABELS = {
    Kind.PARAMETER: "parameters",
    Kind.BUFFER: "buffers",
    Kind.GRADIENT: "gradients",
    Kind.OPTIMIZER_STATE: "optimizer state",
    Kind.SAVED_ACTIVATION: "saved activations",
    Kind.TEMPORARY: "temporaries",
    Kind.INPUT: "inputs",
}
# kinds that scale with the batch (and the loss's working set); the others are model state
_ACTIVATION_KINDS = frozenset({Kind.SAVED_ACTIVATION, Kind.TEMPORARY, Kind.INPUT})


@dataclass(frozen=True)
class PeakExplanation:
    """The op where a plan's simulated fast-memory occupancy peaks, and what fills it.

    Limitation: it names the first op at the peak only; a plan may reach the same
    occupancy at other ops, where different storages may be live.
    """

    op: int
    op_name: str
    phase: Phase
    layer: str  # the layer's name, or "no layer"
    fast_bytes: int  # the simulator's occupancy during the op
    fast_bytes_by_kind: dict[Kind, int]  # every kind, summing to ``fast_bytes``
    # fast bytes there that a rule of the context keeps from moving, by rule (a runtime's
    # reach, tensors the program holds); empty when every long-lived storage may move
    unmovable_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def activation_bytes(self) -> int:
        """Fast bytes that scale with the batch: saved activations, temporaries, inputs."""
        return sum(self.fast_bytes_by_kind[k] for k in _ACTIVATION_KINDS)

    @property
    def hint(self) -> str:
        """What lowers this peak, chosen by whether activations or model state fill it."""
        if not self.fast_bytes:
            return "nothing is in fast memory"
        act = self.activation_bytes
        if act * 2 >= self.fast_bytes:
            by = self.fast_bytes_by_kind
            fix = ("a chunked loss or a smaller batch"
                   if by[Kind.TEMPORARY] > by[Kind.SAVED_ACTIVATION]
                   else "a smaller batch or a chunked loss")
            return f"{act / self.fast_bytes:.0%} is activations: {fix} lowers it"
        state = self.fast_bytes - act
        return (f"{state / self.fast_bytes:.0%} is model state: it needs more fast memory, or "
                "fewer parameters kept in fast memory")

    def summary(self) -> str:
        """``op 812 (aten::mm, backward, layer blocks.3): 97.4 MiB fast = saved activations
        60.1 MiB, ...``, kinds largest first, those with no bytes left out."""
        kinds = sorted((k for k in Kind if self.fast_bytes_by_kind[k]),
                       key=lambda k: -self.fast_bytes_by_kind[k])
        parts = ", ".join(f"{_LABELS[k]} {format_bytes(self.fast_bytes_by_kind[k])}"
                          for k in kinds)
        layer = self.layer if self.layer == "no layer" else f"layer {self.layer}"
        rules = ", ".join(f"{format_bytes(n)} {why}" for why, n in
                          sorted(self.unmovable_bytes.items(), key=lambda kv: -kv[1]))
        return (f"op {self.op} ({self.op_name}, {self.phase.value}, {layer}): "
                f"{format_bytes(self.fast_bytes)} fast = {parts or 'nothing'}"
                + (f" (cannot move: {rules})" if rules else ""))

    def describe(self, subject: str = "the plan") -> str:
        """One line: ``<subject> peaks at <summary>; <hint>``."""
        return f"{subject} peaks at {self.summary()}; {self.hint}"


def explain_peak(ctx: Context, plan: Plan, result: SimResult | None = None) -> PeakExplanation:
    """Replay ``plan`` and explain the first op at its peak fast-memory occupancy.

    ``result``: the plan's replay on ``ctx`` if the caller has it (saves one replay).
    """
    # NOTE [Recompute as a trace]: the plan's step
    ctx = recomputing(ctx, plan.recompute, plan.recompute_keeps)
    trace = ctx.trace
    if not trace.ops:
        raise SentinelError("the trace has no ops: there is no peak to explain")
    if result is None:
        result = simulate(trace, plan, ctx.hardware, cost=ctx.cost)
    occupancy = result.fast_bytes
    op = occupancy.index(max(occupancy))
    snap = simulate(trace, plan, ctx.hardware, cost=ctx.cost, snapshot_at=op)
    assert snap.fast_at_snapshot is not None
    by_kind = dict.fromkeys(Kind, 0)
    unmovable: dict[str, int] = {}
    storages = trace.storages
    long_lived = {s.id for s in ctx.long_lived}
    waiting = _waiting_for_the_clock(ctx, plan, op)
    for sid, nbytes in snap.fast_at_snapshot.items():
        s = storages[sid]
        by_kind[s.kind] += nbytes
        why = None
        if sid in long_lived and not ctx.may_move(s):
            why = _unmovable_because(ctx, s)
        elif sid in waiting:
            why = ("waiting for the runtime's next event (autograd releases what a node "
                   "unpacked when the node ends)")
        if why is not None:
            unmovable[why] = unmovable.get(why, 0) + nbytes
    record = trace.ops[op]
    layer = "no layer" if record.layer is None else trace.layers[record.layer].name
    return PeakExplanation(op, record.name, record.phase, layer, snap.fast_bytes[op], by_kind,
                           unmovable)


def _waiting_for_the_clock(ctx: Context, plan: Plan, op: int) -> set[int]:
    """Storages used before ``op``, not by it, whose eviction the runtime's clock puts after
    it: the plan could not move them earlier (see `Context.clock`)."""
    clock = ctx.clock
    if clock is None:
        return set()
    i = bisect_right(clock, op)
    tick = clock[i] if i < len(clock) else len(ctx.trace.ops)
    return {m.storage for m in plan.moves
            if m.to is Tier.SLOW and m.issue_at == tick and op not in ctx.uses[m.storage]
            and min(ctx.uses[m.storage], default=op) < op}


def _unmovable_because(ctx: Context, s: StorageRecord) -> str:
    """The rule that keeps a long-lived storage from moving under ``ctx``."""
    if s.id in ctx.fixed or (s.kind is Kind.SAVED_ACTIVATION and s.saved):
        return "held by the program (moving it would free nothing)"
    order = (Kind.SAVED_ACTIVATION, Kind.PARAMETER, Kind.GRADIENT, Kind.OPTIMIZER_STATE)
    moves = [k for k in order if ctx.movable is None or k in ctx.movable]
    names = [_LABELS[k] if k is not Kind.SAVED_ACTIVATION else "saved tensors" for k in moves]
    what = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    return f"{_LABELS[s.kind]} out of the runtime's reach (it moves {what})"

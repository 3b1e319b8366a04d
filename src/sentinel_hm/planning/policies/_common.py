"""What the policies share: a registry, intervals of layers, per-storage uses, move helpers."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

from sentinel_hm.core.cost import CostModel
from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.errors import SentinelError
from sentinel_hm.trace.model import Kind, Phase, StorageRecord, Trace
from sentinel_hm.trace.recompute import (
    RecomputableLayer,
    recomputable_layers,
    recomputed_as,
    with_recomputed_layers,
)

MIN_MANAGED_BYTES = 4096  # smaller storages stay fast: a copy would cost more than it frees


class Infeasible(SentinelError):
    """The policy cannot keep the step within the budget."""


@dataclass(frozen=True)
class Context:
    """Everything a policy needs; built once per (trace, hardware) and shared by policies."""

    trace: Trace
    hardware: Hardware
    cost: CostModel
    # What a runtime can move: None = any storage; else only these kinds (a saved activation
    # only if autograd saved it, since the runtime reaches activations through saved-tensor
    # hooks). stream_optimizer=False: the optimizer phase is one interval (a runtime without
    # hooks inside optimizer.step() moves optimizer state before and after it, not during).
    movable: frozenset[Kind] | None = None
    stream_optimizer: bool = True
    # storages a runtime found it cannot free by moving them (the program holds them)
    fixed: frozenset[int] = frozenset()
    # (saved activation, op): a runtime found the program holds it at least until that op
    # of the forward pass (NOTE [Held by the program])
    held_until: tuple[tuple[int, int], ...] = ()
    # interval lengths the sentinel policy may try, as (layers per interval, intervals per
    # layer); None: all of its candidates (a runtime's trials restrict it to one)
    interval_lengths: tuple[tuple[int, int], ...] | None = None
    # ops before which a runtime can act (the events it sees: saves, unpacks, completed
    # gradients, optimizer chunks), sorted; None: before any op. See NOTE [Runtime clock].
    clock: tuple[int, ...] | None = None
    # the device of the fast tier ("cuda:0"): a runtime moves only storages there (a CUDA
    # tier never moves the CPU scalars Adam counts its steps in); None: any storage
    device: str | None = None
    # whether the sentinel policy may recompute layers instead of keeping or moving their
    # saved activations (NOTE [Recompute as a trace]), or only these layers (those a runtime
    # can find as modules)
    recompute: bool | frozenset[int] = False
    min_budgets: dict[str, int] = field(default_factory=dict, compare=False)  # planner's cache

    @cached_property
    def recomputable(self) -> dict[int, RecomputableLayer]:
        """The layers a recomputation can drop saved bytes from, by index."""
        return recomputable_layers(self.trace)

    @cached_property
    def recomputed(self) -> dict[tuple[tuple[int, ...], tuple[str, ...]], Context]:
        """`recomputing`'s contexts, by layer set and kept ops (an attribute of this instance only:
        ``dataclasses.replace`` starts a new one, whose other fields may differ)."""
        return {}

    @cached_property
    def uses(self) -> dict[int, tuple[int, ...]]:
        """storage id -> ops that read or write it, in order."""
        return {
            sid: tuple(sorted(set(reads) | set(writes)))
            for sid, (reads, writes) in self.trace.accesses.items()
        }

    @cached_property
    def long_lived(self) -> tuple[StorageRecord, ...]:
        """Storages that outlive their layer instance and are used in the step."""
        short = self.trace.short_lived_ids
        return tuple(s for s in self.trace.storages if s.id not in short and self.uses[s.id])

    @cached_property
    def managed_candidates(self) -> tuple[StorageRecord, ...]:
        """Long-lived storages worth moving (at least ``MIN_MANAGED_BYTES``) that may move."""
        return tuple(
            s for s in self.long_lived if s.nbytes >= MIN_MANAGED_BYTES and self.may_move(s)
        )

    def may_move(self, s: StorageRecord) -> bool:
        if s.id in self.fixed or (self.device is not None and s.device != self.device):
            return False
        if self.movable is None:
            return True
        if s.kind is Kind.SAVED_ACTIVATION:
            # one that outlives backward is held by the program too (its input batch, say):
            # a runtime's eviction would free nothing
            held = s.freed_at is None or (self.backward_end is not None
                                          and s.freed_at > self.backward_end)
            return s.saved and s.kind in self.movable and not held
        return s.kind in self.movable

    @cached_property
    def held_in_forward(self) -> dict[int, int]:
        """Saved activation a runtime found the program holds (``held_until``) -> its last use
        before backward, or the op it was found held until if later: until then an eviction
        frees nothing and an op cannot read it in the slow tier (NOTE [Held by the
        program])."""
        if self.movable is None:
            return {}
        backward = {op.index for op in self.trace.ops if op.phase is Phase.BACKWARD}
        held = {}
        for s in self.managed_candidates:
            if s.kind is not Kind.SAVED_ACTIVATION:
                continue
            uses = self.uses[s.id]
            first_bw = next((op for op in uses if op in backward), None)
            forward = [op for op in uses if first_bw is None or op < first_bw]
            if forward:
                held[s.id] = forward[-1]
        found = dict(self.held_until)
        return {sid: max(op, found[sid]) for sid, op in held.items() if sid in found}

    @cached_property
    def backward_end(self) -> int | None:
        """The last op of the last backward pass."""
        ops = [op.index for op in self.trace.ops if op.phase is Phase.BACKWARD]
        return ops[-1] if ops else None

    def live_range(self, s: StorageRecord) -> tuple[int, int]:
        last = len(self.trace.ops) - 1
        return (0 if s.created_at is None else s.created_at,
                last if s.freed_at is None else s.freed_at)

    @cached_property
    def optimizer_ops(self) -> tuple[int, int] | None:
        """First and last op of the optimizer phase."""
        ops = [op.index for op in self.trace.ops if op.phase is Phase.OPTIMIZER]
        return (ops[0], ops[-1]) if ops else None

    def interval_starts(self, layers_per_interval: int, splits_per_layer: int = 1) -> tuple[int, ...]:
        """First op of each interval: runs of ``layers_per_interval`` layer instances.

        With ``splits_per_layer`` > 1 each layer instance is instead cut into that
        many intervals of equal op counts (finer than a layer, for big blocks).
        Segments outside every layer join the interval they fall in, except the
        optimizer phase: it is cut into as many intervals as a forward pass has,
        so that optimizer state can stream through fast memory in chunks.
        """
        k = layers_per_interval
        n_layers = len({seg.layer for seg in self.trace.segments if seg.layer is not None})
        starts = [0]

        def cut(op: int) -> None:
            if op > starts[-1]:
                starts.append(op)

        def chunks(first: int, last: int, count: int) -> None:
            n = last - first + 1
            count = max(1, min(count, n))
            for c in range(count):
                cut(first + c * n // count)

        # a runtime that streams the optimizer recorded where each chunk starts (one
        # parameter each): cut there, as many chunks to an interval as k layers have
        marked = self.trace.meta.get("optimizer_chunks")
        chunk_ops = [int(op) for op in marked] if isinstance(marked, list) else []
        count = 0
        for seg in self.trace.segments:
            if seg.phase is Phase.OPTIMIZER:
                inside = [op for op in chunk_ops if seg.first_op <= op <= seg.last_op]
                if not self.stream_optimizer:
                    cut(seg.first_op)
                elif inside:
                    cut(seg.first_op)
                    per_layer = len(inside) / max(1, n_layers)
                    every = max(1, round(per_layer * k / splits_per_layer))
                    for c, op in enumerate(inside):
                        if c % every == 0:
                            cut(op)
                else:
                    chunks(seg.first_op, seg.last_op, -(-n_layers * splits_per_layer // k))
                count = k  # what follows the optimizer starts a new interval
            elif seg.layer is not None:
                if splits_per_layer > 1:
                    chunks(seg.first_op, seg.last_op, splits_per_layer)
                    continue
                if count == k:
                    cut(seg.first_op)
                    count = 0
                count += 1
            elif count == k and seg.phase is not Phase.FORWARD:
                cut(seg.first_op)
                count = 0
        return tuple(starts)


def interval_of(starts: tuple[int, ...], op: int) -> int:
    return bisect_right(starts, op) - 1


def empty_plan(
    ctx: Context,
    policy: str,
    budget: int,
    *,
    placement: dict[int, int] | None = None,
    moves: list[Move] | None = None,
    info: dict[str, object] | None = None,
) -> Plan:
    """A plan for this context; moves are sorted by issue point (stable).

    Under a runtime's clock a move happens at the first event at or after its issue
    point, so that is where the plan puts it: replaying the plan then holds memory as
    long as the runtime will (an eviction planned inside an autograd node happens
    when the node is done with its saved tensors).
    """
    ordered = sorted(moves or (), key=lambda m: m.issue_at)
    if ctx.clock is not None:  # moving to the clock keeps the order; repeats merge
        ordered = list(dict.fromkeys(_on_clock(ctx, m) for m in ordered))
    recomputed, keeps = recomputed_as(ctx.trace)
    return Plan(policy, ctx.hardware.name, budget, len(ctx.trace.ops), len(ctx.trace.storages),
                placement=dict(placement or {}), moves=tuple(ordered), info=dict(info or {}),
                recompute=recomputed, recompute_keeps=keeps)


def _on_clock(ctx: Context, move: Move) -> Move:
    clock = ctx.clock
    assert clock is not None
    i = bisect_left(clock, move.issue_at)
    at = clock[i] if i < len(clock) else len(ctx.trace.ops)
    return move if at == move.issue_at else replace(move, issue_at=at)


def slow_homed(ctx: Context, s: StorageRecord) -> tuple[int, list[Move]]:
    """Placement and moves for a storage whose home is the slow tier.

    Direct access: it lives in slow memory and ops use it in place. Migrate
    access: it is fetched on demand at each use (by the simulator or runtime)
    and evicted right after; the op that creates it writes it in fast memory.
    """
    if ctx.hardware.access is Access.DIRECT:
        return 0, []
    _, end = ctx.live_range(s)
    placement = 0 if s.created_at is None else s.nbytes
    if s.kind is Kind.OPTIMIZER_STATE and not ctx.stream_optimizer and ctx.optimizer_ops:
        # a runtime without hooks inside optimizer.step() brings all of it in before
        first, last = ctx.optimizer_ops
        return placement, [Move(s.id, Tier.FAST, first, s.nbytes),
                           Move(s.id, Tier.SLOW, last + 1, s.nbytes)]
    held = ctx.held_in_forward.get(s.id, -1)
    moves = [Move(s.id, Tier.SLOW, op + 1, s.nbytes) for op in ctx.uses[s.id]
             if held <= op and op + 1 <= end]
    return placement, moves


PolicyFn = Callable[[Context, int], Plan]
REGISTRY: dict[str, PolicyFn] = {}
DIRECT_ONLY: set[str] = set()


def register(name: str, *, direct_only: bool = False) -> Callable[[PolicyFn], PolicyFn]:
    def wrap(fn: PolicyFn) -> PolicyFn:
        REGISTRY[name] = fn
        if direct_only:
            DIRECT_ONLY.add(name)
        return fn

    return wrap


def recomputing(ctx: Context, layers: tuple[int, ...], keeps: tuple[str, ...] = ()) -> Context:
    """``ctx`` for the step with ``layers`` recomputed (NOTE [Recompute as a trace]), keeping
    the outputs of ops named in ``keeps``; made once per context, layer set and keeps (a
    bisection plans and replays the same sets again)."""
    if not layers or recomputed_as(ctx.trace) == (tuple(layers), tuple(keeps)):
        return ctx
    key = (tuple(layers), tuple(keeps))
    if key not in ctx.recomputed:
        trace = with_recomputed_layers(ctx.trace, layers, keeps)
        ctx.recomputed[key] = replace(ctx, trace=trace, cost=CostModel(trace, ctx.hardware),
                                      min_budgets={})
    return ctx.recomputed[key]


"""From a plan to what the runtime does in each step, keyed to events it can see.

NOTE [Runtime clock]
A steady step is not traced (that would cost as much as profiling). The
runtime sees only hook events: each distinct storage autograd saves (pack, in
order), the first unpack of each managed one in backward, and the optimizer's
step. The profiled step recorded the op index of each of these events, so in
later steps an event tells the runtime where in the trace it is; every move of
the plan with ``issue_at`` at or before that op index is then issued. Two more
kinds of event give the clock in backward and in the optimizer: a parameter's
gradient is complete (a post-accumulate-grad hook), and a chunk of the
streamed optimizer step starts (NOTE [Chunked optimizer step]). A step is
recognised as the profiled one by the sequence of packed storage sizes.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass, field

from sentinel_hm.core.plan import Move, Plan
from sentinel_hm.trace.model import Kind, Phase, Trace

_ALIGN = 64
_STATE_NAME = re.compile(r"state\[(\d+)\]\.(.+)")


class StepEvents:
    """The profiled step's events: saved-tensor packs and unpacks (`Tracer`'s ``on_saved``)
    and completed gradients (`grad_ready`), each with its op clock."""

    def __init__(self) -> None:
        self.pack_order: list[int] = []
        self.grad_ops: dict[str, list[int]] = {}  # parameter name -> op clock of each event
        self.pack_clock: list[int] = []  # op clock of every pack, in order (repeats too)
        self.unpack_clock: list[int] = []  # op clock of every unpack, in order
        self._packed: set[int] = set()

    def grad_ready(self, name: str, clock: int) -> None:
        self.grad_ops.setdefault(name, []).append(clock)

    def __call__(self, event: str, sid: int, clock: int) -> None:
        if event == "pack":
            self.pack_clock.append(clock)
            if sid not in self._packed:
                self._packed.add(sid)
                self.pack_order.append(sid)
        else:
            self.unpack_clock.append(clock)

    def clock(self, trace: Trace) -> tuple[int, ...]:
        """Every op before which a steady step can act, sorted: the events above, the
        optimizer's chunks (or its start, when it runs whole), its end and the step's end."""
        chunks = trace.meta.get("optimizer_chunks")
        chunk_ops = [int(op) for op in chunks] if isinstance(chunks, list) else []
        ticks = {*self.pack_clock, *self.unpack_clock, *chunk_ops, len(trace.ops)}
        ticks.update(op for ops in self.grad_ops.values() for op in ops)
        optimizer = [op.index for op in trace.ops if op.phase is Phase.OPTIMIZER]
        if optimizer:
            ticks.add(optimizer[-1] + 1)
            if not chunk_ops:
                ticks.add(optimizer[0])
        return tuple(sorted(ticks))


@dataclass(frozen=True)
class Schedule:
    """A plan as the runtime executes it, on its clock (NOTE [Runtime clock]).

    NOTE [Parameter reads]
    Under migrate access a moving parameter must be fast before an op reads it. Its own
    module's forward pre-hook brings it back, but code outside that module may read it too
    (a tied projection, ``h @ self.emb.weight``, in the model's own forward; found by the
    residency guard): each forward op that reads a moving parameter is filed under the last
    runtime event before it (``reads_after_pack``), and that event makes the parameter fast
    (`SteadyStep.need`: a no-op when the plan's prefetch has landed).
    """

    saved_order: tuple[int, ...]  # trace storage of the k-th distinct storage packed
    saved_nbytes: tuple[int, ...]
    managed_saved: frozenset[int]
    states: dict[int, tuple[int, str]]  # trace storage -> (parameter index, state key)
    grads: dict[int, str]  # trace storage -> parameter name
    params: dict[int, str]  # trace storage -> parameter name
    moves: tuple[Move, ...]
    start_slow: frozenset[int]  # managed storages in the slow tier at start or creation
    slots: dict[int, int]  # trace storage -> byte offset in the slow arena
    arena_bytes: int
    optimizer_op: int | None  # first op of the optimizer phase
    optimizer_end: int | None  # the op after its last
    pack_clock: tuple[int, ...]  # op clock of every pack and every unpack of the profile
    unpack_clock: tuple[int, ...]
    # first op of each chunk of a streamed optimizer step (the profiled ones, then the
    # plan's: NOTE [Chunked optimizer step])
    chunk_ops: tuple[int, ...]
    grad_ops: dict[str, tuple[int, ...]]  # parameter name -> clock of each completed gradient
    n_ops: int
    # NOTE [Parameter reads]: moving parameters read by forward ops after the k-th pack and
    # up to the next (key -1: before the first pack)
    reads_after_pack: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def merged_chunks(self, groups: list[list[int]]) -> Schedule:
        """NOTE [Chunked optimizer step]: the schedule running the profiled chunks merged into
        ``groups`` (lists of profiled chunk indices): a merged chunk starts at its first's op."""
        return dataclasses.replace(
            self, chunk_ops=tuple(self.chunk_ops[group[0]] for group in groups))

    @staticmethod
    def build(trace: Trace, plan: Plan, events: StepEvents) -> Schedule:
        storages = trace.storages
        keep = [sid for sid in events.pack_order
                if storages[sid].kind not in (Kind.PARAMETER, Kind.BUFFER)]
        managed = plan.managed
        saved = frozenset(sid for sid in keep if sid in managed)
        states: dict[int, tuple[int, str]] = {}
        for sid in managed:
            s = storages[sid]
            match = _STATE_NAME.fullmatch(s.name or "")
            if s.kind is Kind.OPTIMIZER_STATE and match:
                states[sid] = (int(match.group(1)), match.group(2))
        grads = {
            sid: name.removesuffix(".grad")
            for sid in managed
            if storages[sid].kind is Kind.GRADIENT
            and (name := storages[sid].name or "").endswith(".grad")
        }
        params = {sid: storages[sid].name or "" for sid in managed
                  if storages[sid].kind is Kind.PARAMETER and storages[sid].name}
        runnable = saved | frozenset(states) | frozenset(grads) | frozenset(params)
        slots: dict[int, int] = {}
        offset = 0
        for sid in sorted(runnable):
            slots[sid] = offset
            offset += -(-storages[sid].nbytes // _ALIGN) * _ALIGN
        optimizer_ops = [op.index for op in trace.ops if op.phase is Phase.OPTIMIZER]
        optimizer_op = optimizer_ops[0] if optimizer_ops else None
        optimizer_end = optimizer_ops[-1] + 1 if optimizer_ops else None
        chunks = trace.meta.get("optimizer_chunks")
        reads = _reads_after_pack(trace, frozenset(params), events.pack_clock)
        return Schedule(
            saved_order=tuple(keep),
            saved_nbytes=tuple(storages[sid].nbytes for sid in keep),
            managed_saved=saved,
            states=states,
            grads=grads,
            params=params,
            moves=tuple(m for m in plan.moves if m.storage in runnable),
            start_slow=frozenset(s for s, fast in plan.placement.items()
                                 if s in runnable and fast == 0),
            slots=slots,
            arena_bytes=offset,
            optimizer_op=optimizer_op,
            optimizer_end=optimizer_end,
            pack_clock=tuple(events.pack_clock),
            unpack_clock=tuple(events.unpack_clock),
            chunk_ops=tuple(int(op) for op in chunks) if isinstance(chunks, list) else (),
            grad_ops={name: tuple(ops) for name, ops in events.grad_ops.items()},
            n_ops=len(trace.ops),
            reads_after_pack=reads,
        )


def _reads_after_pack(trace: Trace, params: frozenset[int],
                      pack_clock: list[int]) -> dict[int, tuple[int, ...]]:
    """NOTE [Parameter reads]: each forward op that reads a moving parameter, filed under the
    last pack (a runtime event) before it: a pack has the clock of the op that saved, so
    one at the reading op itself comes after the read."""
    if not params or not trace.ops:
        return {}
    last = len(trace.ops) - 1
    forward_packs = sorted({c for c in pack_clock
                            if trace.ops[min(c, last)].phase is Phase.FORWARD})
    first_pack = {c: k for k, c in reversed(list(enumerate(pack_clock)))}
    out: dict[int, list[int]] = {}
    for op in trace.ops:
        read = [sid for sid in op.inputs if sid in params] if op.phase is Phase.FORWARD else ()
        if not read:
            continue
        before = bisect.bisect_left(forward_packs, op.index) - 1
        at = out.setdefault(first_pack[forward_packs[before]] if before >= 0 else -1, [])
        at.extend(sid for sid in read if sid not in at)
    return {k: tuple(v) for k, v in out.items()}

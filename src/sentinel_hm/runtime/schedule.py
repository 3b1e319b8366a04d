"""From a plan to what the runtime does in each step, keyed to events it can see.

NOTE [Runtime clock]
A steady step is not traced (that would cost as much as profiling). The
runtime sees only hook events: each distinct storage autograd saves (pack, in
order), the first unpack of each managed one in backward, and the optimizer's
step. The profiled step recorded the op index of each of these events, so in
later steps an event tells the runtime where in the trace it is; every move of
the plan with ``issue_at`` at or before that op index is then issued. A step
is recognised as the profiled one by the sequence of packed storage sizes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sentinel_hm.planning.model import Move, Plan
from sentinel_hm.trace.model import Kind, Phase, Trace

_ALIGN = 64
_STATE_NAME = re.compile(r"state\[(\d+)\]\.(.+)")


class SavedEvents:
    """Listener for the profiled step's saved-tensor events (see `Tracer`'s ``on_saved``)."""

    def __init__(self) -> None:
        self.pack_order: list[int] = []
        self.pack_op: list[int] = []
        self.unpack_op: dict[int, int] = {}
        self._packed: set[int] = set()

    def __call__(self, event: str, sid: int, clock: int) -> None:
        if event == "pack":
            if sid not in self._packed:
                self._packed.add(sid)
                self.pack_order.append(sid)
                self.pack_op.append(clock)
        elif sid not in self.unpack_op:
            self.unpack_op[sid] = clock


@dataclass(frozen=True)
class Schedule:
    saved_order: tuple[int, ...]  # trace storage of the k-th distinct storage packed
    saved_nbytes: tuple[int, ...]
    pack_op: tuple[int, ...]
    unpack_op: dict[int, int]
    managed_saved: frozenset[int]
    states: dict[int, tuple[int, str]]  # trace storage -> (parameter index, state key)
    grads: dict[int, str]  # trace storage -> parameter name
    params: dict[int, str]  # trace storage -> parameter name (direct access only)
    moves: tuple[Move, ...]
    start_slow: frozenset[int]  # managed storages in the slow tier at start or creation
    slots: dict[int, int]  # trace storage -> byte offset in the slow arena
    arena_bytes: int
    optimizer_op: int | None  # first op of the optimizer phase
    optimizer_end: int | None  # the op after its last
    n_ops: int

    @staticmethod
    def build(trace: Trace, plan: Plan, events: SavedEvents) -> Schedule:
        storages = trace.storages
        keep = [
            (sid, clock)
            for sid, clock in zip(events.pack_order, events.pack_op, strict=True)
            if storages[sid].kind not in (Kind.PARAMETER, Kind.BUFFER)
        ]
        managed = plan.managed
        saved = frozenset(sid for sid, _ in keep if sid in managed)
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
        return Schedule(
            saved_order=tuple(sid for sid, _ in keep),
            saved_nbytes=tuple(storages[sid].nbytes for sid, _ in keep),
            pack_op=tuple(clock for _, clock in keep),
            unpack_op={sid: op for sid, op in events.unpack_op.items() if sid in saved},
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
            n_ops=len(trace.ops),
        )

"""One steady step: the saved-tensor hooks and optimizer hooks that execute a plan.

See NOTE [Runtime clock] (schedule.py) and NOTE [Residency] (residency.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Tier
from sentinel_hm.errors import SentinelError
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.residency import Handle, HeldEntry, ResizedEntry, SavedEntry
from sentinel_hm.runtime.schedule import Schedule
from sentinel_hm.tiers.base import Tiers


class _Unmanaged:
    """A save the plan leaves alone. Installed saved-tensor hooks switch off autograd's own
    check for tensors modified in place after they were saved, so it is done here."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor = t
        self.version = t._version

    def unpack(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise SentinelError(
                f"a tensor saved for backward (shape {tuple(self.tensor.shape)}, "
                f"{self.tensor.dtype}) was modified in place after autograd saved it (version "
                f"{self.version} -> {self.tensor._version}); its gradient would be wrong: clone "
                "it before modifying it, or make the op out of place"
            )
        return self.tensor


class _ParamSave:
    """A saved view of a parameter the plan moves (``weight.t()`` saved by ``nn.Linear``).

    Autograd keeps the parameter and the view's geometry, not its bytes: the bytes can then
    leave fast memory between forward and backward, and the view is rebuilt over wherever
    the parameter lives when backward needs it (NOTE [Parameter saves]).
    """

    __slots__ = ("delta", "dtype", "param", "sid", "size", "stride", "version")

    def __init__(self, sid: int, param: torch.Tensor, t: torch.Tensor) -> None:
        self.sid = sid
        self.param = param
        self.delta = int(t.storage_offset()) - int(param.storage_offset())
        self.size, self.stride, self.dtype = tuple(t.size()), tuple(t.stride()), t.dtype
        self.version = param._version

    def rebuild(self) -> torch.Tensor:
        p = self.param
        if p._version != self.version:
            raise SentinelError(
                f"a parameter (shape {tuple(p.shape)}) was modified in place between the "
                "forward pass that saved it and the backward pass that uses it; its gradient "
                "would be wrong: update parameters after backward, as optimizers do"
            )
        return torch.empty(0, dtype=self.dtype, device=p.device).set_(
            p.untyped_storage(), int(p.storage_offset()) + self.delta, self.size, self.stride
        )


class SteadyStep:
    """Executes ``schedule`` during one training step (forward, backward, optimizer)."""

    def __init__(
        self,
        schedule: Schedule,
        tiers: Tiers,
        mover: Mover,
        held: dict[int, HeldEntry | ResizedEntry],
        never_copied: dict[int, weakref.ref[torch.UntypedStorage]],
        moving_params: dict[int, tuple[weakref.ref[torch.UntypedStorage], int, torch.Tensor]],
        chunk_sids: list[list[int]],
    ) -> None:
        self.schedule = schedule
        self.tiers = tiers
        self.mover = mover
        self.held = held  # parameters, gradients and optimizer state
        self.never_copied = never_copied  # storages of parameters and buffers
        # storage address -> (the storage, its trace id, the parameter) for parameters the
        # plan moves; kept current by the manager as parameters change storage
        self.moving_params = moving_params
        # a moving parameter's slot address -> (its trace storage, the parameter): a save of
        # a parameter that left during the op that saved it (NOTE [Parameter saves])
        self.param_slots: dict[int, tuple[int, torch.Tensor]] = {}
        # NOTE [Parameter reads]: under direct access an op reads a slow parameter in place
        self.reads_after_pack = (schedule.reads_after_pack if tiers.access is Access.MIGRATE
                                 else {})
        self.chunk_sids = chunk_sids  # held entries each optimizer chunk updates
        self.grad_events: dict[str, int] = {}
        self.pack_calls = 0
        self.unpack_calls = 0
        self.program_held: set[int] = set()  # evictions that freed nothing (see SavedEntry)
        # Weak: the handles autograd holds keep entries (and their fast bytes) alive, exactly
        # as long as the saved tensors would live without Sentinel.
        self.entries: weakref.WeakValueDictionary[int, SavedEntry] = (
            weakref.WeakValueDictionary()
        )
        self.seen: dict[int, tuple[weakref.ref[torch.UntypedStorage],
                                   weakref.ref[SavedEntry] | None]] = {}
        self.packed = 0
        self.next_move = 0
        self.mismatch: str | None = None
        self.in_flight: list[HeldEntry | ResizedEntry] = []  # held moves to commit (NOTE [Held-tensor swaps])
        self.clock = 0  # the op of the last event (NOTE [Runtime clock])
        # NOTE [Held by the program]: an audited step watches each evicted activation's fast
        # storage; one that outlives the event of its eviction was held by the program too
        self.watch_frees = False
        self.freed_late: dict[int, int] = {}  # saved storage -> op clock when its bytes died
        # NOTE [Evictions in flight]: the bytes of evictions in flight each clock event allows
        # (from the last audit of this plan), and in an audited step the audit trace's op at
        # each event, to compute those
        self.headroom: dict[int, int] = {}
        self.audit_at: Callable[[Callable[[int], None]], None] | None = None  # at_next_op
        self.ticks: list[tuple[int, int]] = []  # (op clock, audit trace op)
        self._ticked = -1

    # -- the plan's clock ----------------------------------------------------------------------

    def advance(self, op: int) -> None:
        """Issue every move planned at or before trace op ``op``; commit finished swaps."""
        if self.audit_at is not None and op > self._ticked:
            self._ticked = op
            self.audit_at(partial(self._tick, op))
        self.clock = max(self.clock, op)
        if self.in_flight:
            self._commit(block=False)
        if self.mismatch is not None:
            return
        moves = self.schedule.moves
        while self.next_move < len(moves) and moves[self.next_move].issue_at <= op:
            mv = moves[self.next_move]
            self.next_move += 1
            saved = self.entries.get(mv.storage)
            if saved is not None:
                if mv.to is Tier.SLOW:
                    saved.evict(self.mover, self.tiers)
                    if self.watch_frees:
                        self._watch(saved)
                else:
                    saved.prefetch(self.mover, self.tiers)
                continue
            held = self.held.get(mv.storage)
            if held is None:
                continue
            if mv.to is Tier.SLOW:
                held.evict(self.mover, self.tiers)
            else:
                held.prefetch(self.mover, self.tiers)
            self.in_flight.append(held)
        limit = self.headroom.get(self.clock)
        if limit is not None:
            self.mover.bound_evictions(limit)
            if self.in_flight:
                self._commit(block=False)

    def _tick(self, clock: int, at: int) -> None:
        self.ticks.append((clock, at))

    def _watch(self, saved: SavedEntry) -> None:
        left = saved.left_behind() if saved.left_behind is not None else None
        if left is not None:
            weakref.finalize(left, self._died, saved.sid, self.clock)

    def _died(self, sid: int, evicted_at: int) -> None:
        if self.clock > evicted_at:  # alive after the event that evicted it
            self.freed_late[sid] = self.clock

    def _commit(self, block: bool) -> None:
        waiting = []
        for held in self.in_flight:
            if block or held.future is None or held.future.done():
                held.commit(self.mover)
            else:
                waiting.append(held)
        self.in_flight = waiting

    def mismatched(self, why: str) -> None:
        """The step is not the profiled one: stop moving (what was moved still comes back)."""
        if self.mismatch is None:
            self.mismatch = why

    # -- saved-tensor hooks --------------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> Any:
        if t.layout is not torch.strided or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return t  # sparse, nested, subclasses: not managed (the tracer skips them too)
        packed = self._pack(t)
        # every save is a clock event (NOTE [Runtime clock]); moves come after the handle
        # exists, so an eviction sees (and drops) this save too
        n = self.pack_calls
        self.pack_calls += 1
        clock = self.schedule.pack_clock
        if self.mismatch is None and n < len(clock):
            self.advance(clock[n])
            for sid in self.reads_after_pack.get(n, ()):
                self.need(sid)  # NOTE [Parameter reads]
        return packed

    def _pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        key = storage._cdata
        moving = self.moving_params.get(key)
        if moving is not None and moving[0]() is storage:
            return _ParamSave(moving[1], moving[2], t)
        known = self.never_copied.get(key)
        if known is not None and known() is storage:
            slow = self.param_slots.get(t.data_ptr())  # a slot address: the arena
            if slow is not None and slow[1].data_ptr() == t.data_ptr():
                # the parameter left during the op that read it (an eviction issued at one of
                # the op's own saves): rebuilt where it lives when backward needs it
                return _ParamSave(slow[0], slow[1], t)
            return t
        seen = self.seen.get(key)
        if seen is not None and seen[0]() is storage:
            entry = seen[1]() if seen[1] is not None else None
            if entry is None:
                return _Unmanaged(t)  # unmanaged, or its earlier handles are gone
            handle = entry.handle(t)
            return _Unmanaged(t) if handle is None else handle
        # the first save of this storage in the step: the k-th, as in the profile
        k = self.packed
        self.packed += 1
        entry = self._entry(k, storage)
        self.seen[key] = (weakref.ref(storage), weakref.ref(entry) if entry else None)
        handle = entry.handle(t) if entry is not None else None
        if self.mismatch is None and entry is not None and entry.sid in self.schedule.start_slow:
            entry.evict(self.mover, self.tiers)
        return _Unmanaged(t) if handle is None else handle

    def _entry(self, k: int, storage: torch.UntypedStorage) -> SavedEntry | None:
        s = self.schedule
        if self.mismatch is not None:
            return None
        if k >= len(s.saved_order):
            self.mismatched(f"autograd saved more tensors than in the profiled step ({k + 1})")
            return None
        if storage.nbytes() != s.saved_nbytes[k]:
            self.mismatched(f"saved tensor {k} has {storage.nbytes()} bytes, the profile had "
                            f"{s.saved_nbytes[k]}")
            return None
        sid = s.saved_order[k]
        if sid not in s.managed_saved:
            return None
        offset = s.slots[sid]
        entry = SavedEntry(sid, storage.nbytes(), self.tiers.slot(offset, storage.nbytes()),
                           offset, storage)
        self.entries[sid] = entry
        return entry

    def unpack(self, packed: Any) -> Any:
        if isinstance(packed, _Unmanaged | _ParamSave | Handle):
            n = self.unpack_calls  # every unpack is a clock event too
            self.unpack_calls += 1
            clock = self.schedule.unpack_clock
            if self.mismatch is None and n < len(clock):
                self.advance(clock[n])
        if isinstance(packed, _Unmanaged):
            return packed.unpack()
        if isinstance(packed, _ParamSave):
            self.need(packed.sid)
            return packed.rebuild()
        if not isinstance(packed, Handle):
            return packed
        entry = packed.entry
        tensor = entry.materialize(packed, self.mover, self.tiers)
        if entry.program_held:
            self.program_held.add(entry.sid)
        storage = tensor.untyped_storage()
        if storage._cdata not in self.seen:  # a rebuilt storage saved again (recomputation)
            self.seen[storage._cdata] = (weakref.ref(storage), weakref.ref(entry))
        return tensor

    # -- demand fetches ------------------------------------------------------------------------

    def need(self, sid: int) -> None:
        """A held tensor is about to be used: its move in flight lands, and under migrate
        access it comes back now if the plan left it in the slow tier (a stall)."""
        held = self.held.get(sid)
        if held is None:
            return
        held.commit(self.mover)
        if self.tiers.access is Access.MIGRATE or isinstance(held, ResizedEntry):
            held.restore(self.mover, self.tiers)

    def module_pre_forward(self, sids: list[int]) -> None:
        for sid in sids:
            self.need(sid)

    def start(self) -> None:
        """The step begins: what moves in place and starts in the slow tier leaves now (it
        came back at the last step's end)."""
        for sid in self.schedule.start_slow:
            held = self.held.get(sid)
            if isinstance(held, ResizedEntry):
                held.evict(self.mover, self.tiers)
                self.in_flight.append(held)
        for sid in self.reads_after_pack.get(-1, ()):
            self.need(sid)  # NOTE [Parameter reads]: read before the first event

    def hold(self, sids: list[int]) -> None:
        """NOTE [FSDP2]: the program makes views of these storages until `let_go`: they
        come back now if they left, and stay until then."""
        for sid in sids:
            self.need(sid)
            held = self.held.get(sid)
            if isinstance(held, ResizedEntry):
                held.busy()

    def let_go(self, sids: list[int]) -> None:
        for sid in sids:
            held = self.held.get(sid)
            if isinstance(held, ResizedEntry):
                held.release(self.mover, self.tiers)
                self.in_flight.append(held)

    def restore_resized(self) -> None:
        """Everything that moves in place back in fast memory, its bytes complete."""
        for held in self.held.values():
            if isinstance(held, ResizedEntry):
                held.restore(self.mover, self.tiers)

    # -- gradient and optimizer hooks ----------------------------------------------------------

    def grad_ready(self, name: str) -> None:
        """A parameter's gradient is complete (post-accumulate-grad hook): a clock event."""
        k = self.grad_events.get(name, 0)
        self.grad_events[name] = k + 1
        ops = self.schedule.grad_ops.get(name, ())
        if k < len(ops) and self.mismatch is None:
            self.advance(ops[k])

    def before_chunk(self, c: int) -> None:
        """NOTE [Chunked optimizer step]: chunk ``c``'s tensors in fast memory, then update."""
        chunk_ops = self.schedule.chunk_ops
        if c < len(chunk_ops):
            self.advance(chunk_ops[c])
        elif self.mismatch is None:
            self.mismatched(f"the optimizer ran chunk {c + 1}; the plan runs "
                            f"{len(chunk_ops)}")
        for sid in self.chunk_sids[c] if c < len(self.chunk_sids) else ():
            self.need(sid)

    def before_optimizer(self) -> None:
        """An update that runs whole: everything it may touch comes back first."""
        if self.schedule.optimizer_op is not None:
            self.advance(self.schedule.optimizer_op)
        self._commit(block=True)  # no swap may race the optimizer's writes
        for held in self.held.values():  # the optimizer may only touch fast memory
            if self.tiers.access is Access.MIGRATE or isinstance(held, ResizedEntry):
                held.restore(self.mover, self.tiers)

    def after_optimizer(self) -> None:
        end = self.schedule.optimizer_end
        self.advance(end if end is not None else self.schedule.n_ops)

    def finish(self, hooked: bool) -> None:
        """End of the step: issue what is left; check the step matched the profile (when the
        saved-tensor hooks were installed to see it)."""
        self.advance(self.schedule.n_ops)
        self._commit(block=True)
        self.restore_resized()  # NOTE [FSDP2]: the program reads shards between steps
        self.mover.drain()  # nothing of this step stays in flight into the next
        if hooked and self.mismatch is None and self.packed != len(self.schedule.saved_order):
            self.mismatched(f"autograd saved {self.packed} tensors, the profiled step "
                            f"{len(self.schedule.saved_order)}")


def eviction_headroom(ticks: list[tuple[int, int]], fast_bytes: tuple[int, ...],
                      budget: int, excess: int = 0) -> dict[int, int]:
    """NOTE [Evictions in flight]: for each clock event of an audited step, the bytes of
    evictions that may be in flight from it until the next event: the budget less the most
    the audit measured in between (``fast_bytes`` per audit op; ``excess`` is what the
    allocator measured beyond that curve's peak, counted everywhere)."""
    headroom = {}
    for k, (clock, start) in enumerate(ticks):
        end = ticks[k + 1][1] if k + 1 < len(ticks) else len(fast_bytes)
        most = max(fast_bytes[start : max(end, start + 1)], default=0)
        headroom[clock] = max(0, budget - most - excess)
    return headroom

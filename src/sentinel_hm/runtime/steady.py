"""One steady step: the saved-tensor hooks and optimizer hooks that execute a plan.

See NOTE [Runtime clock] (schedule.py) and NOTE [Residency] (residency.py).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.hardware import Access
from sentinel_hm.planning.model import Tier
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.residency import Handle, HeldEntry, SavedEntry
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


class SteadyStep:
    """Executes ``schedule`` during one training step (forward, backward, optimizer)."""

    def __init__(
        self,
        schedule: Schedule,
        tiers: Tiers,
        mover: Mover,
        held: dict[int, HeldEntry],
        never_copied: dict[int, weakref.ref[torch.UntypedStorage]],
    ) -> None:
        self.schedule = schedule
        self.tiers = tiers
        self.mover = mover
        self.held = held  # optimizer state and gradients
        self.never_copied = never_copied  # storages of parameters and buffers
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
        self.in_flight: list[HeldEntry] = []  # held moves to commit (NOTE [Held-tensor swaps])

    # -- the plan's clock ----------------------------------------------------------------------

    def advance(self, op: int) -> None:
        """Issue every move planned at or before trace op ``op``; commit finished swaps."""
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
        storage = t.untyped_storage()
        key = storage._cdata
        known = self.never_copied.get(key)
        if known is not None and known() is storage:
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
        # moves come after the handle exists, so an eviction sees (and drops) this save too
        if self.mismatch is None:
            self.advance(self.schedule.pack_op[k])
            if entry is not None and entry.sid in self.schedule.start_slow:
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
        if isinstance(packed, _Unmanaged):
            return packed.unpack()
        if not isinstance(packed, Handle):
            return packed
        entry = packed.entry
        if not entry.unpacked:
            entry.unpacked = True
            op = self.schedule.unpack_op.get(entry.sid)
            if op is not None:
                self.advance(op)
        tensor = entry.materialize(packed, self.mover, self.tiers)
        storage = tensor.untyped_storage()
        if storage._cdata not in self.seen:  # a rebuilt storage saved again (recomputation)
            self.seen[storage._cdata] = (weakref.ref(storage), weakref.ref(entry))
        return tensor

    # -- optimizer hooks -----------------------------------------------------------------------

    def before_optimizer(self) -> None:
        if self.schedule.optimizer_op is not None:
            self.advance(self.schedule.optimizer_op)
        self._commit(block=True)  # no swap may race the optimizer's writes
        if self.tiers.access is Access.MIGRATE:  # the optimizer may only touch fast memory
            for held in self.held.values():
                held.restore(self.mover, self.tiers)

    def after_optimizer(self) -> None:
        end = self.schedule.optimizer_end
        self.advance(end if end is not None else self.schedule.n_ops)

    def finish(self, hooked: bool) -> None:
        """End of the step: issue what is left; check the step matched the profile (when the
        saved-tensor hooks were installed to see it)."""
        self.advance(self.schedule.n_ops)
        self._commit(block=True)
        self.mover.drain()  # nothing of this step stays in flight into the next
        if hooked and self.mismatch is None and self.packed != len(self.schedule.saved_order):
            self.mismatched(f"autograd saved {self.packed} tensors, the profiled step "
                            f"{len(self.schedule.saved_order)}")

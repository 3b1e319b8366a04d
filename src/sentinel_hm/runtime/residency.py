"""Managed storages and their moves: saved activations and optimizer state.

NOTE [Residency]
An entry is FAST (its bytes in ordinary fast memory) or SLOW (its bytes in its
slot of the slow arena). A move is issued on the compute thread and its copy
runs on the copy engine (NOTE [Copy engine]); the entry's ``future`` is its
last copy, and anything that needs the bytes waits for it first. The entry's
state changes when the move is issued, as on a GPU whose host runs ahead of
its copies: an eviction drops every fast reference the runtime holds at once
(the engine keeps the bytes until its copy has read them, then the fast
memory is freed if the program holds no other reference); a prefetch
allocates fast memory and switches the entry back, its copy ordered after the
entry's previous one (they share the slot). Saved activations are never
written after they are saved (checked with ``_version``), so their slow copy
stays valid and evicting them again costs nothing. Optimizer state and
gradients are held by the program (``optimizer.state``, ``param.grad``): they
move by copying and swapping the program's reference, and are copied each time
they leave, since the optimizer and backward write them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Tier
from sentinel_hm.errors import SentinelError
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.tiers.base import Completion, Tiers


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass(eq=False)
class Handle:
    """What autograd keeps instead of a saved tensor: the entry and how to rebuild the view."""

    entry: SavedEntry
    tensor: torch.Tensor | None  # the original, while its storage is fast
    version: int
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    original: weakref.ref[torch.Tensor]  # to check its version after the bytes left


@dataclass(eq=False)
class SavedEntry:
    sid: int
    nbytes: int
    slot: torch.Tensor  # uint8 view of the slow arena
    slot_offset: int
    storage: torch.UntypedStorage | None  # fast bytes, or None when SLOW
    # weak: autograd owns the handles; an entry must not keep saved tensors alive
    handles: list[weakref.ref[Handle]] = field(default_factory=list)
    future: Completion | None = None
    in_slow: bool = False  # the slot holds (or its copy in flight will hold) the current bytes
    evicted_version: int | None = None  # the storage's version when its bytes left
    # a saved tensor over the storage when its bytes left: written in place since, the slot
    # may hold bytes from before or after the write (checked at unpack, when the copy is done)
    witness: weakref.ref[torch.Tensor] | None = None
    # the fast storage after its bytes left: alive at unpack means the program holds it too,
    # and the eviction freed nothing
    left_behind: weakref.ref[torch.UntypedStorage] | None = None
    program_held: bool = False

    def handle(self, t: torch.Tensor) -> Handle | None:
        """A handle for another save of this storage, or None if it cannot share the entry.

        Once the bytes have left, the program may still hold the storage and save it again
        (a ReLU output saved by ReLU, then by the next layer): the new handle must not hold
        the fast tensor, and it may share the slot only if the bytes have not changed since.
        """
        if t.is_conj() or t.is_neg():
            return None  # a lazy conjugate/negative view: set_() would not rebuild it
        keep: torch.Tensor | None = t
        if self.evicted_version is not None:
            if t._version != self.evicted_version:
                return None
            keep = None
        h = Handle(self, keep, t._version, t.dtype, int(t.storage_offset()), tuple(t.size()),
                   tuple(t.stride()), weakref.ref(t))
        self.handles.append(weakref.ref(h))
        return h

    @property
    def fast(self) -> bool:
        return self.storage is not None

    def live_handles(self) -> list[Handle]:
        return [h for h in (r() for r in self.handles) if h is not None]

    def check_versions(self) -> None:
        for h in self.live_handles():
            if h.tensor is not None and h.tensor._version != h.version:
                raise SentinelError(
                    f"a tensor saved for backward (shape {tuple(h.size)}, {h.dtype}) was "
                    f"modified in place after autograd saved it (version {h.version} -> "
                    f"{h.tensor._version}); its gradient would be wrong: clone it before "
                    "modifying it, or make the op out of place"
                )

    def evict(self, mover: Mover, tiers: Tiers) -> None:
        if self.storage is None:
            return  # already left (a copy in flight completes without the compute)
        self.check_versions()
        live = [h.tensor for h in self.live_handles() if h.tensor is not None]
        if live:
            self.evicted_version = live[0]._version
            self.witness = weakref.ref(live[0])  # shares the storage's version counter
        if not self.in_slow:  # the slot is stale (a prefetch leaves it current)
            self.future = mover.submit(Tier.SLOW, self.slot, _bytes_of(self.storage))
            self.in_slow = True
        self._drop_fast()

    def _drop_fast(self) -> None:
        if self.storage is not None:
            self.left_behind = weakref.ref(self.storage)
        self.storage = None
        for h in self.live_handles():
            h.tensor = None

    def prefetch(self, mover: Mover, tiers: Tiers) -> None:
        if self.storage is not None:
            return  # fast, or on its way
        fast = tiers.fast_empty(self.nbytes)  # allocated by the compute, on its stream
        self.future = mover.submit(Tier.FAST, fast, self.slot, after=self.future)
        self.storage = fast.untyped_storage()

    def materialize(self, h: Handle, mover: Mover, tiers: Tiers) -> torch.Tensor:
        """The saved tensor for autograd (on the compute thread)."""
        mover.wait(self.future)
        if h.tensor is not None:
            if h.tensor._version != h.version:
                self.check_versions()
            return h.tensor
        original = h.original()
        witness = self.witness() if self.witness is not None else None
        if ((witness is not None and witness._version != self.evicted_version)
                or (original is not None and original._version != h.version)):
            raise SentinelError(
                f"a tensor saved for backward (shape {tuple(h.size)}, {h.dtype}) was modified "
                "in place after autograd saved it; its gradient would be wrong: clone it "
                "before modifying it, or make the op out of place"
            )
        kept = self.left_behind() if self.storage is None and self.left_behind else None
        if kept is not None and original is not None:
            # the program kept it (and it is unchanged: checked above): no copy back needed
            self.program_held = True
            self.storage = kept
        if self.storage is None:
            if tiers.access is Access.DIRECT:
                arena = self.slot.untyped_storage()
                itemsize = torch.empty(0, dtype=h.dtype).element_size()
                return torch.empty(0, dtype=h.dtype).set_(
                    arena, self.slot_offset // itemsize + h.offset, h.size, h.stride
                )
            fast = tiers.fast_empty(self.nbytes)
            mover.fetch_now(fast, self.slot)
            self.storage = fast.untyped_storage()
        return torch.empty(0, dtype=h.dtype, device=self.storage.device).set_(
            self.storage, h.offset, h.size, h.stride
        )


@dataclass(eq=False)
class HeldEntry:
    """A tensor the program holds by reference (``optimizer.state[p][key]``, ``p.grad``)
    that the plan moves: moving it means copying, then swapping the program's reference,
    which ``get``/``put`` read and write. ``get`` returns None while there is nothing to move
    (a gradient after ``zero_grad``).

    NOTE [Held-tensor swaps]: the copy engine only copies. The swap is committed on the
    compute thread (`commit`, at the runtime's next event), and only if the program still
    holds the same tensor, unchanged since the copy began (same ``_version``): an optimizer
    that wrote it meanwhile, or ``zero_grad`` (in place or to None), makes the copy stale,
    and it is dropped. Only plain tensors that own their whole storage move (a gradient can
    be a view into a buffer shared with another gradient).
    """

    sid: int
    get: Callable[[], torch.Tensor | None]
    put: Callable[[torch.Tensor], None]
    slot: torch.Tensor
    future: Completion | None = None  # its last copy (every copy of it uses the slot)
    # the move in flight: (tensor copied from, its version then, the tensor to swap in)
    _pending: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def _in_slot(self, t: torch.Tensor) -> bool:
        return t.data_ptr() == self.slot.data_ptr()

    def _movable(self, t: torch.Tensor) -> bool:
        return (t.is_contiguous() and t.storage_offset() == 0 and t.layout is torch.strided
                and t.numel() * t.element_size() == t.untyped_storage().nbytes()
                == self.slot.numel())

    def commit(self, mover: Mover) -> None:
        """Swap the program's reference if the copy in flight is done and still current."""
        if self._pending is None:
            return
        mover.wait(self.future)
        source, version, replacement = self._pending
        self._pending = None
        if self.get() is source and source._version == version:
            self.put(replacement)

    def evict(self, mover: Mover, tiers: Tiers) -> None:
        self.commit(mover)
        current = self.get()
        if current is None or self._in_slot(current) or not self._movable(current):
            return
        src = current.detach().reshape(-1).view(torch.uint8)
        self._pending = (current, current._version,
                         self.slot.view(current.dtype).view(current.shape))
        self.future = mover.submit(Tier.SLOW, self.slot, src, after=self.future)

    def prefetch(self, mover: Mover, tiers: Tiers) -> None:
        self.commit(mover)
        current = self.get()
        if current is None or not self._in_slot(current):
            return
        fast = tiers.fast_empty(self.slot.numel())
        self._pending = (current, current._version,
                         fast.view(current.dtype).view(current.shape))
        self.future = mover.submit(Tier.FAST, fast, self.slot, after=self.future)

    def restore(self, mover: Mover, tiers: Tiers) -> None:
        """Back in fast memory now (before the optimizer uses it, or on exit)."""
        self.prefetch(mover, tiers)
        self.commit(mover)


@dataclass(eq=False)
class ResizedEntry:
    """A storage the program reaches through views it keeps (FSDP2's parameter shards, a
    group's reduce-scattered gradients): it moves in place (NOTE [FSDP2]). Its bytes are
    copied to the slot and the storage is resized to nothing; coming back, it is resized
    and filled. Every view of it stays valid, as FSDP2 frees its gathered parameters.

    ``get`` returns a tensor over the storage (None while there is none: no gradient yet).
    An eviction frees the bytes when its copy is done (`commit`), and only if the tensor was
    not written meanwhile; a prefetch's storage holds no valid bytes until its copy is done,
    so every reader waits for it first (`commit`, or `restore`)."""

    sid: int
    get: Callable[[], torch.Tensor | None]
    slot: torch.Tensor
    future: Completion | None = None
    # the eviction in flight: (its storage, the tensor over it, the tensor's version then)
    _pending: tuple[torch.UntypedStorage, torch.Tensor, int] | None = None
    # while the program is still making views of it (FSDP2 handing out a group's gradients
    # one by one), an eviction waits for `release`
    _busy: bool = False
    _deferred: bool = False

    def busy(self) -> None:
        self._busy = True

    def release(self, mover: Mover, tiers: Tiers) -> None:
        self._busy = False
        if self._deferred:
            self._deferred = False
            self.evict(mover, tiers)

    def _storage(self) -> torch.UntypedStorage | None:
        t = self.get()
        return None if t is None else t.untyped_storage()

    def commit(self, mover: Mover) -> None:
        """The copy in flight is done; an eviction's fast bytes are freed."""
        if self.future is not None:
            mover.wait(self.future)
        if self._pending is None:
            return
        storage, t, version = self._pending
        self._pending = None
        if t._version == version and storage.nbytes() == self.slot.numel():
            storage.resize_(0)

    def evict(self, mover: Mover, tiers: Tiers) -> None:
        if self._busy:
            self._deferred = True
            return
        self.commit(mover)
        t = self.get()
        if t is None or t.untyped_storage().nbytes() != self.slot.numel():
            return  # nothing to move, or not the storage the plan knows
        storage = t.untyped_storage()
        self._pending = (storage, t, t._version)
        self.future = mover.submit(Tier.SLOW, self.slot, _bytes_of(storage), after=self.future)

    def prefetch(self, mover: Mover, tiers: Tiers) -> None:
        self._deferred = False
        self.commit(mover)
        storage = self._storage()
        if storage is None or storage.nbytes() != 0:
            return  # fast already
        storage.resize_(self.slot.numel())
        self.future = mover.submit(Tier.FAST, _bytes_of(storage), self.slot, after=self.future)

    def restore(self, mover: Mover, tiers: Tiers) -> None:
        """Back in fast memory, its bytes complete (before anything reads it)."""
        self.prefetch(mover, tiers)
        self.commit(mover)

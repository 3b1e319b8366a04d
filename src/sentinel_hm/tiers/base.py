"""The tier-backend protocol: where slow-tier bytes live and how bytes move between tiers.

A backend deals in flat byte buffers (``uint8`` tensors); the runtime decides
what to move and when. Backends: ``host`` here; NUMA, throttled-link and CUDA
backends implement the same protocol. Each hands the runtime a `CopyEngine`
that runs its copies beside compute (NOTE [Copy engine]).

NOTE [Copy engine]
One protocol for copies that run beside compute, whatever runs them (mover
threads for the host tiers, side streams for CUDA). The runtime keeps its
bookkeeping on the compute thread, at issue time; only the bytes move later.
What an engine promises, which is what two CUDA side streams give:

1. A copy reads and writes after all compute issued before `submit`, and after
   its ``after`` copy. Copies toward one tier complete in submission order; the
   two directions are independent, and the host runs ahead of both.
2. ``dst`` and ``src`` stay valid until the copy is done: their memory is not
   reused meanwhile, even after the runtime and the program drop them. What an
   engine keeps for that beyond the program's own references is let go no
   later than when the host sees the copy done (`Completion.done` returns
   True, `Completion.wait` or `drain` returns), and a destination in the fast
   tier no later than `compute_wait` on its copy: the fast bytes a dropped
   buffer holds are then those of evictions not yet seen done, which the mover
   counts (NOTE [Evictions in flight]). Nothing may keep a dropped buffer until
   some later copy is done (CUDA's ``record_stream`` does: NOTE [CUDA copies]).
3. `compute_wait` orders the compute issued from then on after a copy: a CPU
   engine blocks the host (the host is the compute), a device engine makes the
   compute stream wait and the host goes on. What the host itself reads (a
   checkpoint between steps) is complete only after `Completion.wait` or
   `drain`.
4. `compute_copy` is a copy made by the compute itself (ordered like compute).

Copies never wait for later copies, so an engine cannot deadlock.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Tier


class Completion(Protocol):
    """A copy submitted to a `CopyEngine`."""

    def done(self) -> bool:
        """Whether the copy has finished (never blocks)."""

    def wait(self) -> None:
        """Block the host until the copy has finished; raise its error, if it failed."""


class CopyEngine(Protocol):
    """Runs the copies between tiers beside compute; NOTE [Copy engine]."""

    def submit(self, to: Tier, dst: torch.Tensor, src: torch.Tensor,
               after: Completion | None = None) -> Completion:
        """Copy ``src`` into ``dst`` (toward tier ``to``) after the compute issued so far and
        after ``after``."""

    def compute_wait(self, copy: Completion) -> float:
        """Order the compute issued from now on after ``copy``; return the seconds the host
        blocked for it (0 where a device waits by itself)."""

    def compute_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy as part of the compute: ordered after every `compute_wait` so far."""

    def drain(self) -> None:
        """Block the host until every copy submitted so far is done; raise the first error."""

    def close(self) -> None:
        """Drain, then release threads or streams."""


class Meter(Protocol):
    """Measures the fast tier's peak over a region of the program (NOTE [One instrument] in
    ``runtime/manager.py``)."""

    def start(self) -> None:
        """The region begins."""

    def stop(self, traced_peak: int) -> int:
        """The peak of fast-memory bytes since `start`, as this instrument reads it;
        ``traced_peak`` is the traced storages' peak over the region, which an instrument that
        sees nothing more reports as it is."""


class TracedMeter:
    """The instrument of tiers whose fast memory holds nothing but the traced storages (the
    host's): the traced peak itself."""

    def start(self) -> None:
        pass

    def stop(self, traced_peak: int) -> int:
        return traced_peak


class Tiers(Protocol):
    name: str
    access: Access
    moves_gradients: bool  # whether ``param.grad`` may be swapped for a slow-tier tensor

    def reserve(self, nbytes: int) -> None:
        """Allocate (and pre-fault) a slow-tier arena of ``nbytes``."""

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        """A ``uint8`` view of the slow arena at ``offset``."""

    def fast_empty(self, nbytes: int) -> torch.Tensor:
        """A new ``uint8`` buffer in the fast tier."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy bytes between tiers (called by the copy engine)."""

    def engine(self) -> CopyEngine:
        """A new copy engine for these tiers (the runtime makes one and closes it)."""

    def is_slow(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` is the slow arena."""

    def arena(self) -> torch.Tensor | None:
        """The slow arena, for audits (None before `reserve`)."""

    def meter(self) -> Meter:
        """The instrument that measures the fast tier's peak: budgets, the all-fast peak
        and audits all read it (NOTE [One instrument])."""

    def hardware(self) -> Hardware:
        """This machine's tiers as a hardware model, with bandwidths measured here."""

    def close(self) -> None:
        """Release the arena."""

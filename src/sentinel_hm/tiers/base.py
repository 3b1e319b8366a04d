"""The tier-backend protocol: where slow-tier bytes live and how bytes move between tiers.

A backend deals in flat byte buffers (``uint8`` tensors); the runtime decides
what to move and when. Backends: ``host`` here; NUMA, throttled-link and CUDA
backends implement the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch

from sentinel_hm.core.hardware import Access, Hardware


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
        """Copy bytes between tiers (called on a mover thread)."""

    def is_slow(self, storage: torch.UntypedStorage) -> bool:
        """Whether ``storage`` is the slow arena."""

    def arena(self) -> torch.Tensor | None:
        """The slow arena, for audits (None before `reserve`)."""

    def hardware(self) -> Hardware:
        """This machine's tiers as a hardware model, with bandwidths measured here."""

    def close(self) -> None:
        """Release the arena."""

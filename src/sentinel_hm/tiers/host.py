"""``host`` tiers: both tiers in ordinary memory, the slow one a pre-faulted arena.

For testing and for studying plans on any machine: the runtime treats the
arena as the slow tier (migrate access by default: data comes back before an
op uses it, as on a GPU; or direct access: ops read the arena in place).
Copies are memcpy on mover threads (`ThreadEngine`); on a 2-core machine
they share cores and memory bandwidth with compute, so they do not hide (see
PITFALLS.md).

NOTE [Copies beside compute]
A copy is one ``memmove`` on the mover thread, not ``Tensor.copy_``: a large
``copy_`` runs an OpenMP team, whose threads spin on after it ends, and MKL
(dynamic threads, its default) then gives the compute thread's matrix products
fewer threads, which sums them in another order: other bits. Measured on the
medium GPT: its plain twin, stepped right after a Sentinel step, ended with
every parameter a few ulps off (``MKL_DYNAMIC=FALSE`` removed it too).
"""

from __future__ import annotations

import ctypes
import dataclasses
import time

import torch

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.presets import PRESETS
from sentinel_hm.errors import SentinelError
from sentinel_hm.tiers.base import Meter, TracedMeter
from sentinel_hm.tiers.threads import ThreadEngine

_PROBE_BYTES = 32 << 20


class HostTiers:
    def __init__(self, access: Access = Access.MIGRATE) -> None:
        self.name = f"host ({access.value} access)"
        self.access = access
        self.moves_gradients = True  # param.grad may be swapped for an arena view
        self._arena: torch.Tensor | None = None
        self._measured: Hardware | None = None

    def reserve(self, nbytes: int) -> None:
        """Called between steps, with nothing in the slow tier: a new plan reuses an arena
        that is large enough (each trial and re-plan would fault in a new one)."""
        if self._arena is not None and self._arena.numel() >= nbytes:
            return
        # zeros() writes every page: the arena is faulted in before the first step uses it
        self._arena = torch.zeros(max(nbytes, 1), dtype=torch.uint8)

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        assert self._arena is not None, "reserve() first"
        return self._arena[offset : offset + nbytes]

    def fast_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """One memmove on the calling (mover) thread. NOTE [Copies beside compute]."""
        nbytes = dst.numel() * dst.element_size()
        if not (dst.is_contiguous() and src.is_contiguous()
                and src.numel() * src.element_size() == nbytes):
            raise SentinelError(f"internal error: a tier copy of {nbytes} bytes between "
                                "non-contiguous or unequal buffers; please report it")
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)

    def engine(self) -> ThreadEngine:
        """Copies on one mover thread per direction (throttled and NUMA tiers too)."""
        return ThreadEngine(self.copy)

    def is_slow(self, storage: torch.UntypedStorage) -> bool:
        arena = self._arena
        return arena is not None and storage.data_ptr() == arena.untyped_storage().data_ptr()

    def arena(self) -> torch.Tensor | None:
        return self._arena

    def meter(self) -> Meter:
        return TracedMeter()

    def hardware(self) -> Hardware:
        """The ``host`` preset with this machine's copy bandwidth, measured once."""
        if self._measured is None:
            src = torch.ones(_PROBE_BYTES, dtype=torch.uint8)
            dst = torch.empty_like(src)
            self.copy(dst, src)  # fault in
            times = []
            for _ in range(5):
                start = time.perf_counter()
                self.copy(dst, src)
                times.append(time.perf_counter() - start)
            bandwidth = _PROBE_BYTES / sorted(times)[len(times) // 2]
            base = PRESETS["host"]
            tier = dataclasses.replace(base.fast, read_bytes_per_s=bandwidth,
                                       write_bytes_per_s=bandwidth)
            self._measured = dataclasses.replace(
                base,
                name=f"host (measured: {bandwidth / 1e9:.1f} GB/s copies)",
                fast=tier,
                slow=dataclasses.replace(tier, name=base.slow.name),
                link=dataclasses.replace(base.link, h2d_bytes_per_s=bandwidth,
                                         d2h_bytes_per_s=bandwidth),
                access=self.access,
            )
        return self._measured

    def close(self) -> None:
        self._arena = None

"""``cuda`` tiers: fast = GPU memory, slow = one pinned host block carved into exact slots.

NOTE [CUDA copies]
Copies run on two side streams created once (one per direction) instead of
mover threads: the compute thread enqueues each copy when the plan issues it,
after making the side stream wait for the compute stream (the data is
produced there). A copy's completion is a CUDA event; an op that needs the
data makes the compute stream wait for that event, so the host never blocks
in the steady state. Memory read by a copy stays valid until the copy ends:
``record_stream`` tells the caching allocator not to reuse a device block
before the side stream's work on it is done (so an evicted tensor can be
dropped at once), and the pinned block lives as long as the tiers.

NOTE [Pinned arena]
``torch.empty(pin_memory=True)`` goes through PyTorch's pinned caching
allocator, which rounds up to a power of two (up to twice the bytes pinned)
and keeps blocks cached after they are dropped. The arena is instead ordinary
host memory, page-aligned, registered with ``cudaHostRegister`` at its exact
size (rounded to a page); it is kept when a later plan needs no more, replaced
(unregistered first) when it needs more, and unregistered on ``close()``.
Slots are exact offsets in it.

Written on a CPU-only machine: the GPU tests (tests/gpu/) and
``scripts/gpu_check.sh`` check it where CUDA is available.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Tier
from sentinel_hm.core.presets import PRESETS
from sentinel_hm.errors import SentinelError

_PROBE_BYTES = 64 << 20
_PAGE = 4096


class CudaEventFuture:
    """What `Mover` hands back for a copy on a side stream: done when its event is."""

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self.event = event
        self.device = device  # the model's GPU, not whichever is current

    def done(self) -> bool:
        return bool(self.event.query())

    def result(self) -> None:
        self.event.synchronize()

    def wait_on_device(self) -> None:
        """Order the current (compute) stream after the copy, without blocking the host."""
        torch.cuda.current_stream(self.device).wait_event(self.event)


class CudaTiers:
    def __init__(self, device: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise SentinelError("tiers='cuda' needs CUDA, and torch.cuda.is_available() is "
                                "False here: use tiers='host'")
        index = torch.cuda.current_device() if device is None else device
        self.device = torch.device("cuda", index)
        self.access = Access.MIGRATE
        self.moves_gradients = False  # param.grad must stay on the parameter's device
        self.name = f"cuda ({torch.cuda.get_device_name(self.device)}, pinned host memory)"
        self.streams = {Tier.SLOW: torch.cuda.Stream(self.device),
                        Tier.FAST: torch.cuda.Stream(self.device)}
        self._arena: torch.Tensor | None = None
        self._measured: Hardware | None = None

    # -- the protocol --------------------------------------------------------------------------

    def reserve(self, nbytes: int) -> None:
        """NOTE [Pinned arena]: called between steps, with nothing in the slow tier."""
        nbytes = -(-max(nbytes, 1) // _PAGE) * _PAGE
        if self._arena is not None and self._arena.numel() >= nbytes:
            return
        self._release()
        block = torch.empty(nbytes + _PAGE, dtype=torch.uint8)
        start = -block.data_ptr() % _PAGE
        arena = block[start : start + nbytes]
        err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise SentinelError(
                f"cudaHostRegister of a {nbytes}-byte slow arena failed (CUDA error {int(err)}): "
                "the host may not let this process pin that much memory (ulimit -l); lower the "
                "slow tier's share with a larger fast_memory")
        self._arena = arena

    def _release(self) -> None:
        if self._arena is not None:
            torch.cuda.synchronize(self.device)  # no copy may still use it
            torch.cuda.cudart().cudaHostUnregister(self._arena.data_ptr())
            self._arena = None

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        assert self._arena is not None, "reserve() first"
        return self._arena[offset : offset + nbytes]

    def fast_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue a copy on the current stream (a side stream inside `submit`); later work on
        the same stream is ordered after it, and `submit`'s event marks its end."""
        dst.copy_(src, non_blocking=True)

    def is_slow(self, storage: torch.UntypedStorage) -> bool:
        arena = self._arena
        return arena is not None and storage.data_ptr() == arena.untyped_storage().data_ptr()

    def arena(self) -> torch.Tensor | None:
        return self._arena

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self._release()

    # -- asynchronous copies (used by Mover) ---------------------------------------------------

    def submit(self, to: Tier, work: Callable[[], Any]) -> CudaEventFuture:
        """Enqueue ``work`` (copies) on the side stream of direction ``to``; NOTE [CUDA copies].

        Device tensors that ``work`` reads must be registered with `read_by` so that their
        memory is not reused before the copy is done."""
        side = self.streams[to]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            work()
            event = torch.cuda.Event()
            event.record(side)
        return CudaEventFuture(event, self.device)

    def synchronize_copies(self) -> None:
        """Block the host until every copy enqueued so far is done (between steps only)."""
        for stream in self.streams.values():
            stream.synchronize()

    def read_by(self, t: torch.Tensor, to: Tier) -> None:
        if t.is_cuda:
            t.record_stream(self.streams[to])

    def hardware(self) -> Hardware:
        """The h100-sxm preset's shape with this GPU's copy bandwidths measured."""
        if self._measured is None:
            host = torch.empty(_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(_PROBE_BYTES, dtype=torch.uint8, device=self.device)
            rates = {}
            for name, (dst, src) in {"h2d": (dev, host), "d2h": (host, dev)}.items():
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                for _ in range(5):
                    dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize(self.device)
                rates[name] = 5 * _PROBE_BYTES / (time.perf_counter() - start)
            base = PRESETS["h100-sxm"]
            props = torch.cuda.get_device_properties(self.device)
            self._measured = dataclasses.replace(
                base,
                name=f"{props.name} (measured: h2d {rates['h2d'] / 1e9:.1f} GB/s, "
                     f"d2h {rates['d2h'] / 1e9:.1f} GB/s)",
                fast=dataclasses.replace(base.fast, capacity_bytes=props.total_memory),
                link=dataclasses.replace(base.link, h2d_bytes_per_s=rates["h2d"],
                                         d2h_bytes_per_s=rates["d2h"]),
                measured_op_times=True,
            )
        return self._measured

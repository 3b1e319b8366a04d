"""``cuda`` tiers: fast = GPU memory, slow = one pinned host block carved into exact slots.

NOTE [CUDA copies]
The copy engine (`CudaEngine`, NOTE [Copy engine] in ``tiers/base.py``) runs
copies on two side streams created once (one per direction) instead of mover
threads: the compute thread enqueues each copy when the plan issues it, after
making the side stream wait for the compute stream (the data is produced
there) and for the copy it must follow. A copy's completion is a CUDA event;
an op that needs the data makes the compute stream wait for that event, so
the host never blocks in the steady state.

Memory a copy reads or writes stays valid until the copy ends. The pinned
block stays registered and allocated until the tiers are closed or dropped
(NOTE [Arena lifetime]), which first waits for the device. A copy's fast-side buffer (an eviction's
source, a prefetch's destination) is held by its `CudaCompletion`, a host
reference, until the host sees the copy's event done (`CudaCompletion.done`,
`wait`, `drain`, or the engine's own poll of its oldest copies at each
submit); a prefetch's destination is let go sooner, when the compute stream
it was allocated on waits for the copy (every later reuse of the block by that
stream is then ordered after the copy). So a block the program drops is freed
exactly when its own copy is seen done, a moment the runtime sees too: the
mover counts evictions until then (NOTE [Evictions in flight]). It used to be
``record_stream``, which keeps a dropped block until the side stream passes
the point where the host dropped it, after every copy queued by then, not just
the block's own: blocks the host never accounted for, and steady steps over
their budget on an H200 (``tests/runtime/test_racing_copies.py`` replays both
on CPU). The host reads pinned memory (a checkpoint between steps) only after
`CudaEngine.drain`, which synchronises the side streams.

NOTE [Pinned arena] and NOTE [Arena lifetime] are in ``tiers/pinned_arena.py``:
the slow tier is one page-aligned host block registered with CUDA, unregistered
before its memory can be freed, whether the tiers are closed or dropped.

NOTE [Allocator peak]
An audit measures the GPU's peak over one step without resetting the
process's peak statistics (``max_memory_allocated`` is the user's, too). It
reads the caching allocator's own history instead: while the step runs the
allocator records every allocation and every completed free (recording
switched on for the step if the user does not record already; without stack
traces it costs about 2 us an event), and the peak is the active bytes at the
start plus the highest running sum. Active bytes count a freed block until
every stream recorded on it (``record_stream``, if the program or a library
calls it) is done with it, which allocated bytes do not; the copy engine's own
blocks are held, so both count them (NOTE [CUDA copies]). If the user records history in a ring buffer
that is already full, the step cannot be told apart, and the audit measures
traced storages only, with a warning.

Written on a CPU-only machine: the GPU tests (tests/gpu/) and
``scripts/gpu_check.sh`` check it where CUDA is available.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Tier
from sentinel_hm.core.presets import PRESETS
from sentinel_hm.errors import SentinelError
from sentinel_hm.tiers.base import Completion
from sentinel_hm.tiers.pinned_arena import HostRuntime, PinnedArena, cuda_runtime

_PROBE_BYTES = 64 << 20


class CudaCompletion:
    """A copy on a side stream: done when its event is. Holds the copy's fast-side buffer
    until it is seen done (NOTE [CUDA copies])."""

    __slots__ = ("event", "keep", "seen", "stream", "to")

    def __init__(self, to: Tier, event: torch.cuda.Event, keep: torch.Tensor,
                 stream: torch.cuda.Stream) -> None:
        self.to = to
        self.event = event
        self.keep: torch.Tensor | None = keep
        self.stream = stream  # the compute stream when the copy was submitted
        self.seen = False

    def done(self) -> bool:
        if not self.seen and self.event.query():
            self.seen, self.keep = True, None
        return self.seen

    def wait(self) -> None:
        if not self.seen:
            self.event.synchronize()
            self.seen, self.keep = True, None


class CudaEngine:
    """Copies on two side streams of the tiers' GPU; NOTE [CUDA copies]."""

    def __init__(self, tiers: CudaTiers) -> None:
        self.tiers = tiers
        self.device = tiers.device  # the model's GPU, not whichever is current
        self.streams = {Tier.SLOW: torch.cuda.Stream(self.device),
                        Tier.FAST: torch.cuda.Stream(self.device)}
        # copies not yet seen done, oldest first per direction (they finish in that order)
        self._pending: dict[Tier, deque[CudaCompletion]] = {to: deque() for to in Tier}

    def submit(self, to: Tier, dst: torch.Tensor, src: torch.Tensor,
               after: Completion | None = None) -> CudaCompletion:
        self._poll()
        side = self.streams[to]
        compute = torch.cuda.current_stream(self.device)
        side.wait_stream(compute)
        if after is not None:
            side.wait_event(_event(after))
        with torch.cuda.stream(side):
            self.tiers.copy(dst, src)  # looked up on the tiers: the GPU tests slow it down
        event = torch.cuda.Event()
        event.record(side)
        # no record_stream: the completion holds the fast side until seen done
        copy = CudaCompletion(to, event, src if to is Tier.SLOW else dst, compute)
        self._pending[to].append(copy)
        return copy

    def compute_wait(self, copy: Completion) -> float:
        """The compute stream waits for the copy's event; the host does not block."""
        stream = torch.cuda.current_stream(self.device)
        event = _event(copy)
        stream.wait_event(event)
        assert isinstance(copy, CudaCompletion)
        if copy.to is Tier.FAST and stream == copy.stream:
            # a prefetch's block was allocated on this stream (`SavedEntry.prefetch`): every
            # reuse of it now follows the copy
            copy.keep = None
        return 0.0

    def compute_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.tiers.copy(dst, src)  # on the current (compute) stream

    def _poll(self) -> None:
        """Let go of the buffers of the oldest copies that are done (NOTE [CUDA copies])."""
        for pending in self._pending.values():
            while pending and pending[0].done():
                pending.popleft()

    def drain(self) -> None:
        for stream in self.streams.values():
            stream.synchronize()
        for pending in self._pending.values():
            for copy in pending:
                copy.seen, copy.keep = True, None
            pending.clear()

    def close(self) -> None:
        self.drain()


def _event(copy: Completion) -> torch.cuda.Event:
    if not isinstance(copy, CudaCompletion):
        raise SentinelError(f"internal error: a CUDA copy ordered after {type(copy).__name__}, "
                            "not a CUDA copy; please report it")
    return copy.event


def active_peak(entries: Iterable[Mapping[str, Any]], start_bytes: int) -> int:
    """NOTE [Allocator peak]: the most bytes active at once, from ``start_bytes`` active and
    the allocator's trace entries since (sizes rounded to its 512-byte blocks)."""
    live: dict[int, int] = {}
    active = peak = start_bytes
    for e in entries:
        action = e.get("action")
        if action == "alloc":
            size = -(-int(e["size"]) // 512) * 512
            live[int(e["addr"])] = size
            active += size
            peak = max(peak, active)
        elif action == "free_completed":
            active -= live.pop(int(e["addr"]), -(-int(e["size"]) // 512) * 512)
    return peak


class AllocatorPeak:
    """The GPU's peak of active bytes over a region, read from the allocator's history
    (NOTE [Allocator peak])."""

    _MAX_ENTRIES = 1 << 20

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._ours = False
        self._start_bytes = 0
        self._skip = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self._ours = not torch._C._cuda_isHistoryEnabled()
        if self._ours:
            torch.cuda.memory._record_memory_history(
                "all", context=None, stacks="python", max_entries=self._MAX_ENTRIES,
                clear_history=True)
            self._skip = 0
        else:  # the user's history: ours is what comes after what is there now
            self._skip = len(self._trace())
        self._start_bytes = torch.cuda.memory_stats(self.device).get("active_bytes.all.current", 0)

    def stop(self, traced_peak: int) -> int:
        """The peak of active bytes; ``traced_peak`` when the user's full ring buffer hides
        where the step began."""
        torch.cuda.synchronize(self.device)
        trace = self._trace()
        if self._ours:  # off again, and its entries dropped
            torch.cuda.memory._record_memory_history(None, clear_history=True)
        elif len(trace) <= self._skip:
            warnings.warn("sentinel: the audit could not read the CUDA allocator's peak "
                          "(your memory history's ring buffer is full): it measures the "
                          "storages it traced only", stacklevel=3)
            return traced_peak
        return active_peak(trace[self._skip:], self._start_bytes)

    def _trace(self) -> list[dict[str, Any]]:
        traces = torch.cuda.memory._snapshot(self.device)["device_traces"]
        index = self.device.index if self.device.index is not None else 0
        return list(traces[index]) if index < len(traces) else []


class CudaTiers:
    def __init__(self, device: int | None = None, runtime: HostRuntime | None = None) -> None:
        if not torch.cuda.is_available():
            raise SentinelError("tiers='cuda' needs CUDA, and torch.cuda.is_available() is "
                                "False here: use tiers='host'")
        index = torch.cuda.current_device() if device is None else device
        self.device = torch.device("cuda", index)
        self.access = Access.MIGRATE
        self.moves_gradients = False  # param.grad must stay on the parameter's device
        self.name = f"cuda ({torch.cuda.get_device_name(self.device)}, pinned host memory)"
        self._runtime = runtime if runtime is not None else cuda_runtime(self.device)
        self._arena: PinnedArena | None = None
        self._measured: Hardware | None = None

    # -- the protocol --------------------------------------------------------------------------

    def reserve(self, nbytes: int) -> None:
        """NOTE [Pinned arena]: called between steps, with nothing in the slow tier; also after
        `close`."""
        if self._arena is not None and self._arena.nbytes >= nbytes:
            return
        self._release()
        self._arena = PinnedArena(nbytes, self._runtime)

    def _release(self) -> None:
        arena, self._arena = self._arena, None
        if arena is not None:
            arena.close()  # waits for the device first: no copy may still use it

    def slot(self, offset: int, nbytes: int) -> torch.Tensor:
        assert self._arena is not None, "reserve() first"
        return self._arena.tensor[offset : offset + nbytes]

    def fast_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Enqueue a copy on the current stream (a side stream inside `CudaEngine.submit`);
        later work on the same stream is ordered after it, and the engine's event marks its
        end."""
        dst.copy_(src, non_blocking=True)

    def engine(self) -> CudaEngine:
        return CudaEngine(self)

    def meter(self) -> AllocatorPeak:
        """NOTE [One instrument]: the allocator's peak (NOTE [Allocator peak])."""
        return AllocatorPeak(self.device)

    def is_slow(self, storage: torch.UntypedStorage) -> bool:
        arena = self._arena
        return (arena is not None
                and storage.data_ptr() == arena.tensor.untyped_storage().data_ptr())

    def arena(self) -> torch.Tensor | None:
        return self._arena.tensor if self._arena is not None else None

    def close(self) -> None:
        """Unpin and free the arena (NOTE [Arena lifetime]); idempotent, and `reserve` works
        again afterwards."""
        self._release()

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

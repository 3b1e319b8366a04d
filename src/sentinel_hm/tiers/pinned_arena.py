"""The CUDA tiers' slow arena: ordinary host memory registered with CUDA, for exactly as long
as that memory lives.

NOTE [Pinned arena]
``torch.empty(pin_memory=True)`` goes through PyTorch's pinned caching
allocator, which rounds up to a power of two (up to twice the bytes pinned)
and keeps blocks cached after they are dropped. The arena is instead ordinary
host memory, page-aligned, registered with ``cudaHostRegister`` at its exact
size (rounded to a page); `CudaTiers` keeps it when a later plan needs no
more, and replaces it (the old one closed first) when it needs more. Slots
are exact offsets in it.

NOTE [Arena lifetime]
A registered range must be unregistered before its memory goes back to
malloc: glibc hands the same range out again, and registering it then fails
with 712 (``cudaErrorHostMemoryAlreadyRegistered``). And a failed CUDA runtime
call leaves its error as CUDA's *last error* (per host thread), which the
next unrelated call that checks it (``model.cuda()``'s first kernel) raises
as its own: "part or all of the requested memory range is already mapped".
Both were seen on an H200 (``../shared/gpu-runs/h200-2026-12-04/``). So:

- the host block belongs to a `weakref.finalize` on the `PinnedArena`, not to
  the arena: closed (`close`, idempotent) or dropped with its owner (a
  ``Sentinel`` never closed), the finalizer waits for the device (no copy may
  still use the memory), unregisters, and only then lets the block go. Slot
  views handed out keep the memory readable, not registered.
- a failed registration takes CUDA's last error off (`HostRuntime.take_error`)
  and raises a `SentinelError` that names what happened; a failed
  unregistration takes it off too and warns (there is nothing to undo).

The CUDA runtime is reached through one seam, `HostRuntime` (`cuda_runtime`
makes the real one), so that the arena's logic runs on a machine without CUDA
against a fake runtime (``tests/tiers/test_cuda_arena.py``).
"""

from __future__ import annotations

import ctypes
import functools
import warnings
import weakref
from collections.abc import Callable
from typing import Protocol

import torch

from sentinel_hm.errors import SentinelError

PAGE = 4096

ALREADY_REGISTERED = 712  # cudaErrorHostMemoryAlreadyRegistered
OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation


class HostRuntime(Protocol):
    """The few CUDA runtime calls an arena makes (NOTE [Arena lifetime])."""

    def host_register(self, ptr: int, nbytes: int) -> int:
        """``cudaHostRegister``; the CUDA error code (0: success)."""

    def host_unregister(self, ptr: int) -> int:
        """``cudaHostUnregister``; the CUDA error code (0: success)."""

    def take_error(self) -> int:
        """CUDA's last error on this thread, cleared (``cudaGetLastError``)."""

    def error_string(self, code: int) -> str:
        """What CUDA calls error ``code``."""

    def synchronize(self) -> None:
        """Wait until the device has finished every copy that may use host memory."""


def _host_block(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class PinnedArena:
    """``nbytes`` (rounded to a page) of page-aligned host memory, registered with CUDA until
    `close` or until the arena is dropped (NOTE [Arena lifetime]). ``allocate`` makes the host
    block (a test hands out the same memory again, as glibc does)."""

    def __init__(self, nbytes: int, runtime: HostRuntime,
                 allocate: Callable[[int], torch.Tensor] = _host_block) -> None:
        nbytes = -(-max(nbytes, 1) // PAGE) * PAGE
        block = allocate(nbytes + PAGE)
        start = -block.data_ptr() % PAGE
        self.tensor = block[start : start + nbytes]
        self.nbytes = nbytes
        self.ptr = self.tensor.data_ptr()
        err = runtime.host_register(self.ptr, nbytes)
        if err != 0:
            runtime.take_error()  # else the next unrelated CUDA call raises it
            raise SentinelError(_registration_failed(err, nbytes, runtime))
        # the finalizer, not the arena, holds the block: it can only be freed once unregistered
        self._finalizer = weakref.finalize(self, _unregister, runtime, block, self.ptr, nbytes)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Wait for the device, unregister, let the memory go (once; later calls do nothing)."""
        self._finalizer()


def _registration_failed(err: int, nbytes: int, runtime: HostRuntime) -> str:
    what = f"pinning the slow tier's {nbytes}-byte host arena (cudaHostRegister) failed"
    cleared = "CUDA's error state was cleared, so later CUDA calls are not affected"
    if err == ALREADY_REGISTERED:
        return (f"{what}: part of that host memory is already registered with CUDA "
                f"(cudaErrorHostMemoryAlreadyRegistered, {err}). Some code registered host "
                "memory and freed it without cudaHostUnregister, and malloc handed the same "
                f"range out again; {cleared}. Unregister host memory you register before "
                "freeing it; Sentinel's own arenas are unregistered when a Sentinel is closed "
                "or dropped")
    if err == OUT_OF_MEMORY:
        return (f"{what}: CUDA could not pin that much memory (cudaErrorMemoryAllocation, "
                f"{err}); the host may not let this process lock that much (ulimit -l, or "
                f"the driver's limit). {cleared}. Raise the limit, or give fast_memory a "
                "larger budget so that less lives in the slow tier")
    return (f"{what}: {runtime.error_string(err)} (CUDA error {err}); {cleared}. "
            "Use tiers='host' to train without the GPU's copy engines")


def _unregister(runtime: HostRuntime, block: torch.Tensor, ptr: int, nbytes: int) -> None:
    """The arena's finalizer (NOTE [Arena lifetime]); ``block`` is freed when it returns."""
    try:
        runtime.synchronize()
    except Exception as e:  # a finalizer: report, go on unregistering
        warnings.warn(f"sentinel: waiting for the GPU before unpinning the slow arena failed "
                      f"({e}); unpinning it anyway", stacklevel=2)
    err = runtime.host_unregister(ptr)
    if err != 0:
        runtime.take_error()
        warnings.warn(
            f"sentinel: unpinning the slow tier's {nbytes}-byte host arena "
            f"(cudaHostUnregister) failed: {runtime.error_string(err)} (CUDA error {err}). "
            "If the range is still registered, a later cudaHostRegister of reused memory "
            "fails with 712; CUDA's error state was cleared", stacklevel=2)
    del block


# -- the real runtime -----------------------------------------------------------------------------


class CudaRuntime:
    """`HostRuntime` over ``torch.cuda.cudart()``. PyTorch exposes no ``cudaGetLastError``:
    `take_error` calls the ``libcudart`` the process has loaded (the one torch calls), through
    ctypes, then makes sure with a kernel launch, whose check reads (and so clears) the error
    wherever the runtime lives."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def host_register(self, ptr: int, nbytes: int) -> int:
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))

    def host_unregister(self, ptr: int) -> int:
        return int(torch.cuda.cudart().cudaHostUnregister(ptr))

    def take_error(self) -> int:
        code = 0
        get_last_error = _get_last_error()
        if get_last_error is not None:
            code = int(get_last_error())
        try:  # torch's launch check calls cudaGetLastError: a stale error is raised, and gone
            with torch.cuda.device(self.device):
                torch.cuda._sleep(0)
        except RuntimeError:
            code = code or -1
        return code

    def error_string(self, code: int) -> str:
        try:
            cudart = torch.cuda.cudart()
            return str(cudart.cudaGetErrorString(cudart.cudaError(code)))
        except Exception:  # only a message
            return f"CUDA error {code}"

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)


@functools.cache
def _get_last_error() -> Callable[[], int] | None:
    """``cudaGetLastError`` of the libcudart already mapped into this process, or None (a torch
    linked with a static runtime; loading another copy would read another copy's error)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = [line.split()[-1] for line in maps if "libcudart.so" in line]
    except OSError:
        return None
    for path in paths:
        try:
            fn = ctypes.CDLL(path).cudaGetLastError  # the mapped library: dlopen reuses it
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = []
        return fn
    return None


def cuda_runtime(device: torch.device) -> HostRuntime:
    """The real runtime (the seam a test replaces)."""
    return CudaRuntime(device)

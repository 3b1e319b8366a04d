"""The mover: copies between tiers on one thread per direction, with exact stall accounting.

Copies run in issue order per direction (like a GPU's copy engines). The
compute thread waits only when an op needs data whose copy has not finished;
that wait is the stall. ``synchronous=True`` runs copies on the caller's
thread (used by audits, so that a tracer sees every copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from sentinel_hm.core.plan import Tier


def _done() -> Future[None]:
    f: Future[None] = Future()
    f.set_result(None)
    return f


class Mover:
    def __init__(self, device: Any = None) -> None:
        """``device``: tiers whose copies run on device streams (`CudaTiers`), submitted
        from the compute thread; NOTE [CUDA copies]."""
        self.device = device
        self._lanes = {
            Tier.SLOW: ThreadPoolExecutor(1, thread_name_prefix="sentinel-to-slow"),
            Tier.FAST: ThreadPoolExecutor(1, thread_name_prefix="sentinel-to-fast"),
        }
        self.synchronous = False
        self.stall_s = 0.0
        self.bytes_moved = {Tier.SLOW: 0, Tier.FAST: 0}
        self._pending: list[Future[None]] = []

    def submit(self, to: Tier, nbytes: int, work: Callable[[], None]) -> Future[None]:
        self.bytes_moved[to] += nbytes
        if self.synchronous:
            work()
            return _done()
        if self.device is not None:
            return self.device.submit(to, work)
        future = self._lanes[to].submit(work)
        if len(self._pending) > 256:  # forget finished copies (their errors were seen by waits)
            self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(future)
        return future

    def wait(self, future: Future[None] | None) -> None:
        """Block the compute thread until ``future`` is done, counting the wait as stall."""
        if hasattr(future, "wait_on_device"):
            future.wait_on_device()  # type: ignore[union-attr]
            return
        if future is None or future.done():
            if future is not None:
                future.result()  # surface a copy's exception
            return
        start = time.perf_counter()
        future.result()
        self.stall_s += time.perf_counter() - start

    def stall(self, seconds: float) -> None:
        """Count a synchronous fetch done on the compute thread."""
        self.stall_s += seconds

    def drain(self) -> None:
        """Wait for every copy issued so far (not counted as stall: used between steps, so
        that what the program reads between steps, such as optimizer state in pinned host
        memory for ``torch.save``, is complete)."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()
        if self.device is not None:
            self.device.synchronize_copies()

    def reset_counters(self) -> None:
        self.stall_s = 0.0
        self.bytes_moved = {Tier.SLOW: 0, Tier.FAST: 0}

    def close(self) -> None:
        self.drain()
        for lane in self._lanes.values():
            lane.shutdown(wait=True)

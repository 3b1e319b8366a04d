"""The copy engine of the host, throttled and NUMA tiers: one mover thread per direction.

Copies toward one tier run in submission order on their thread, like a GPU's
copy engine on one stream; the two threads run independently of each other and
of the compute thread (NOTE [Copy engine] in ``tiers/base.py``). The compute is
the host here, so making compute wait for a copy blocks the host: that wait is
the stall.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from sentinel_hm.core.plan import Tier
from sentinel_hm.tiers.base import Completion

Copy = Callable[[torch.Tensor, torch.Tensor], None]


class ThreadCompletion:
    """A copy on a mover thread."""

    __slots__ = ("future",)

    def __init__(self, future: Future[None]) -> None:
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def wait(self) -> None:
        self.future.result()


class ThreadEngine:
    def __init__(self, copy: Copy) -> None:
        """``copy``: the tiers' copy, called on a mover thread."""
        self._copy = copy
        self._lanes = {
            Tier.SLOW: ThreadPoolExecutor(1, thread_name_prefix="sentinel-to-slow"),
            Tier.FAST: ThreadPoolExecutor(1, thread_name_prefix="sentinel-to-fast"),
        }
        self._pending: list[Future[None]] = []

    def submit(self, to: Tier, dst: torch.Tensor, src: torch.Tensor,
               after: Completion | None = None) -> ThreadCompletion:
        buffers = [dst, src]

        def work() -> None:
            try:
                if after is not None:
                    after.wait()
                self._copy(buffers[0], buffers[1])
            finally:
                # dropped before the copy is seen done: what the program no longer holds is
                # freed by then, as a device's allocator would free it (NOTE [Copy engine])
                buffers.clear()

        future = self._lanes[to].submit(work)
        if len(self._pending) > 256:  # forget finished copies (their errors were seen by waits)
            self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(future)
        return ThreadCompletion(future)

    def compute_wait(self, copy: Completion) -> float:
        if copy.done():
            copy.wait()  # surface a copy's error
            return 0.0
        start = time.perf_counter()
        copy.wait()
        return time.perf_counter() - start

    def compute_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self._copy(dst, src)

    def drain(self) -> None:
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for f in pending:  # every copy ends before the first error is raised
            e = f.exception()
            error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.drain()
        finally:
            for lane in self._lanes.values():
                lane.shutdown(wait=True)

"""The mover: copies between tiers through the tiers' copy engine, with exact accounting.

The engine (mover threads for the host tiers, side streams for CUDA) runs
copies beside compute; NOTE [Copy engine] in ``tiers/base.py`` says what it
promises. The compute waits only when an op needs data whose copy has not
finished; the seconds the host blocks for that are the stall.
``synchronous=True`` makes every copy part of the compute (used by audits, so
that a tracer sees every copy).

NOTE [Evictions in flight]
An eviction's fast bytes are free only when its copy has read them: the
engine keeps them until the host sees the copy done, and lets them go then
(NOTE [Copy engine], promise 2), which is when the mover stops counting them.
An audited step copies synchronously, so its measured peak has no eviction in
flight; a steady step lets the host run ahead of its copies, and each
eviction not yet seen done adds its bytes to what the audit saw. The runtime
therefore bounds those bytes at each clock event by the headroom the audit
left there (the budget minus the audited peak until the next event), and the
host waits, counted as stall, for the oldest evictions until they fit. A
steady step then holds at most what its audit measured plus that headroom:
the budget.

Copies toward the fast tier need no count: the engine lets a prefetch's
destination go by the time the compute waits for it (promise 2), which is
before the program can use, and so drop, it; it then dies where it died in
the audit. (The one exception, a prefetch the runtime drops unused, happens
only when a step stops matching its plan.) What no bound on the host could
count is a block kept until its lane has passed every copy queued before the
program dropped it, CUDA's ``record_stream``: `CudaEngine` does not use it
(NOTE [CUDA copies]); ``tests/runtime/test_racing_copies.py`` replays both.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from sentinel_hm.core.plan import Tier
from sentinel_hm.tiers.base import Completion, Tiers


class Mover:
    def __init__(self, tiers: Tiers) -> None:
        self.engine = tiers.engine()
        self.synchronous = False
        self.stall_s = 0.0
        self.bytes_moved = {Tier.SLOW: 0, Tier.FAST: 0}
        self._evictions: deque[tuple[Completion, int]] = deque()  # not yet seen done
        self._eviction_bytes = 0  # their bytes

    def submit(self, to: Tier, dst: torch.Tensor, src: torch.Tensor,
               after: Completion | None = None) -> Completion | None:
        """Copy ``src`` into ``dst`` (toward tier ``to``) beside compute, after ``after``;
        None when the copy is already part of the compute (synchronous)."""
        nbytes = dst.numel() * dst.element_size()
        self.bytes_moved[to] += nbytes
        if self.synchronous:
            self.wait(after)
            self.engine.compute_copy(dst, src)
            return None
        copy = self.engine.submit(to, dst, src, after)
        if to is Tier.SLOW:
            self._evictions.append((copy, nbytes))
            self._eviction_bytes += nbytes
        return copy

    def evictions_in_flight(self) -> int:
        """Bytes of the evictions not yet seen done (NOTE [Evictions in flight]); seeing one
        done lets the engine free its source. Copies toward one tier finish in submission
        order (NOTE [Copy engine]), so the done ones are at the front."""
        pending = self._evictions
        while pending and pending[0][0].done():
            self._eviction_bytes -= pending.popleft()[1]
        return self._eviction_bytes

    def bound_evictions(self, limit: int) -> None:
        """Block the host until at most ``limit`` bytes of evictions are in flight, waiting for
        the oldest first (NOTE [Evictions in flight]); the seconds blocked are stall."""
        if self.evictions_in_flight() <= limit:
            return
        start = time.perf_counter()
        while self._evictions and self._eviction_bytes > limit:
            copy, nbytes = self._evictions.popleft()
            copy.wait()
            self._eviction_bytes -= nbytes
        self.stall_s += time.perf_counter() - start

    def wait(self, copy: Completion | None) -> None:
        """Order the compute from now on after ``copy``, counting a blocked host as stall."""
        if copy is not None:
            self.stall_s += self.engine.compute_wait(copy)

    def fetch_now(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """A fetch made by the compute itself, because the plan left the data slow: stall."""
        start = time.perf_counter()
        self.engine.compute_copy(dst, src)
        self.stall_s += time.perf_counter() - start
        self.bytes_moved[Tier.FAST] += dst.numel() * dst.element_size()

    def drain(self) -> None:
        """Wait for every copy issued so far (not counted as stall: used between steps, so
        that what the program reads between steps, such as optimizer state in pinned host
        memory for ``torch.save``, is complete)."""
        self.engine.drain()
        self._evictions.clear()
        self._eviction_bytes = 0

    def reset_counters(self) -> None:
        self.stall_s = 0.0
        self.bytes_moved = {Tier.SLOW: 0, Tier.FAST: 0}

    def close(self) -> None:
        self.engine.close()

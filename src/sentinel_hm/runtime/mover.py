"""The mover: copies between tiers through the tiers' copy engine, with exact accounting.

The engine (mover threads for the host tiers, side streams for CUDA) runs
copies beside compute; NOTE [Copy engine] in ``tiers/base.py`` says what it
promises. The compute waits only when an op needs data whose copy has not
finished; the seconds the host blocks for that are the stall.
``synchronous=True`` makes every copy part of the compute (used by audits, so
that a tracer sees every copy).
"""

from __future__ import annotations

import time

import torch

from sentinel_hm.core.plan import Tier
from sentinel_hm.tiers.base import Completion, Tiers


class Mover:
    def __init__(self, tiers: Tiers) -> None:
        self.engine = tiers.engine()
        self.synchronous = False
        self.stall_s = 0.0
        self.bytes_moved = {Tier.SLOW: 0, Tier.FAST: 0}

    def submit(self, to: Tier, dst: torch.Tensor, src: torch.Tensor,
               after: Completion | None = None) -> Completion | None:
        """Copy ``src`` into ``dst`` (toward tier ``to``) beside compute, after ``after``;
        None when the copy is already part of the compute (synchronous)."""
        self.bytes_moved[to] += dst.numel() * dst.element_size()
        if self.synchronous:
            self.wait(after)
            self.engine.compute_copy(dst, src)
            return None
        return self.engine.submit(to, dst, src, after)

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

    def reset_counters(self) -> None:
        self.stall_s = 0.0
        self.bytes_moved = {Tier.SLOW: 0, Tier.FAST: 0}

    def close(self) -> None:
        self.engine.close()

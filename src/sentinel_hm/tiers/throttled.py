"""``throttled`` tiers: the host arenas joined by an emulated link.

Each copy completes no earlier than ``latency + bytes / bandwidth`` of its
direction, like a copy engine on a PCIe link: the mover thread copies, then
sleeps out the rest (sleeping, not spinning, so that compute goes on meanwhile,
as it does beside a GPU's copy engines). This makes overlap, prefetch distance
and stalls observable on any machine, and the emulated link is an exact
hardware description for the simulator. Copies faster than the memcpy itself
cannot be emulated: the link is at most as fast as this machine's memcpy.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.errors import SentinelError
from sentinel_hm.tiers.host import HostTiers
from sentinel_hm.units import format_bandwidth, parse_bandwidth, parse_seconds


class ThrottledTiers(HostTiers):
    def __init__(self, h2d_bytes_per_s: float, d2h_bytes_per_s: float,
                 latency_s: float = 0.0) -> None:
        super().__init__(Access.MIGRATE)
        self.h2d_bytes_per_s = h2d_bytes_per_s
        self.d2h_bytes_per_s = d2h_bytes_per_s
        self.latency_s = latency_s
        self.name = (f"throttled (h2d {format_bandwidth(h2d_bytes_per_s)}, "
                     f"d2h {format_bandwidth(d2h_bytes_per_s)}, latency {latency_s * 1e6:.0f} us)")

    @staticmethod
    def parse(options: str) -> ThrottledTiers:
        """``h2d=8GB/s,d2h=8GB/s[,latency=10us]``."""
        values: dict[str, str] = {}
        for item in filter(None, options.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("h2d", "d2h", "latency"):
                raise SentinelError(
                    f"tiers option {item!r} is not understood: use throttled:h2d=8GB/s,"
                    "d2h=8GB/s[,latency=10us]"
                )
            values[key] = value
        if "h2d" not in values or "d2h" not in values:
            raise SentinelError("throttled tiers need both directions: "
                                "tiers='throttled:h2d=8GB/s,d2h=8GB/s'")
        return ThrottledTiers(parse_bandwidth(values["h2d"]), parse_bandwidth(values["d2h"]),
                              parse_seconds(values.get("latency", "0s")))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        start = time.perf_counter()
        super().copy(dst, src)
        to_slow = self.is_slow(dst.untyped_storage())
        bandwidth = self.d2h_bytes_per_s if to_slow else self.h2d_bytes_per_s
        rest = self.latency_s + dst.numel() * dst.element_size() / bandwidth
        rest -= time.perf_counter() - start
        if rest > 0:
            time.sleep(rest)

    def hardware(self) -> Hardware:
        """Measured tiers, and the emulated link exactly as configured."""
        measured = super().hardware()
        return dataclasses.replace(
            measured,
            name=self.name,
            link=dataclasses.replace(measured.link, h2d_bytes_per_s=self.h2d_bytes_per_s,
                                     d2h_bytes_per_s=self.d2h_bytes_per_s,
                                     latency_s=self.latency_s, copy_engines=1),
        )

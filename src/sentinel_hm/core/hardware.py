"""Hardware model: two tiers, the link between them, and how ops reach slow data.

Figures are bytes and seconds. "h2d" is the slow-to-fast direction (a GPU's
host-to-device copy, a NUMA promotion); "d2h" is fast-to-slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Access(StrEnum):
    """How an op reaches data in the slow tier."""

    DIRECT = "direct"  # in place, at the slow tier's bandwidth (NUMA, CXL, Optane)
    MIGRATE = "migrate"  # it must be copied to the fast tier first (GPU)


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity_bytes: int
    read_bytes_per_s: float
    write_bytes_per_s: float
    latency_s: float


@dataclass(frozen=True)
class LinkSpec:
    h2d_bytes_per_s: float  # slow -> fast
    d2h_bytes_per_s: float  # fast -> slow
    latency_s: float  # fixed cost per copy
    copy_engines: int = 1  # concurrent copies per direction


@dataclass(frozen=True)
class Hardware:
    """A fast and a slow tier, the link between them, and the compute that runs the ops.

    ``measured_op_times``: the trace was taken on this hardware, so the cost model
    uses the trace's measured op times instead of the roofline.
    """

    name: str
    fast: TierSpec
    slow: TierSpec
    link: LinkSpec
    access: Access
    flops_per_s: float
    op_overhead_s: float
    measured_op_times: bool = False

"""Tier backends behind one protocol; `open_tiers` turns a ``tiers=`` string into one."""

import torch

from sentinel_hm.core.hardware import Access
from sentinel_hm.errors import SentinelError
from sentinel_hm.tiers.base import Tiers
from sentinel_hm.tiers.host import HostTiers
from sentinel_hm.tiers.numa import NumaTiers
from sentinel_hm.tiers.throttled import ThrottledTiers

TIER_SPECS = ("auto", "cuda", "host", "host:direct", "throttled:h2d=...,d2h=...",
              "numa:FAST,SLOW")


def open_tiers(spec: str, device: torch.device | None = None) -> Tiers:
    """``auto`` (host; `Sentinel` resolves ``auto`` to ``cuda`` for a model on a GPU; never
    NUMA, which needs the job bound to the fast node), ``cuda``, ``host``, ``host:direct``,
    ``throttled:h2d=8GB/s,d2h=8GB/s[,latency=10us]``, or ``numa:0,1`` (fast node, slow node).
    ``device``: the model's device; ``cuda`` tiers use that GPU (else the current one)."""
    if spec in ("auto", "host"):
        return HostTiers(Access.MIGRATE)
    if spec == "cuda":
        from sentinel_hm.tiers.cuda import CudaTiers

        if device is not None and device.type != "cuda":
            raise SentinelError(f"tiers='cuda' needs a model on a GPU; its parameters are on "
                                f"{device}: move it with model.to('cuda') first, or use "
                                "tiers='host'")
        return CudaTiers(device.index if device is not None else None)
    if spec == "host:direct":
        return HostTiers(Access.DIRECT)
    kind, _, options = spec.partition(":")
    if kind == "throttled":
        return ThrottledTiers.parse(options)
    if kind == "numa":
        return NumaTiers.parse(options)
    raise SentinelError(f"tiers={spec!r} is not known: use one of {', '.join(TIER_SPECS)}")


__all__ = ["TIER_SPECS", "HostTiers", "NumaTiers", "ThrottledTiers", "Tiers", "open_tiers"]

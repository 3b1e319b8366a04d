"""Tier backends behind one protocol; `open_tiers` turns a ``tiers=`` string into one."""

from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.hardware import Access
from sentinel_hm.tiers.base import Tiers
from sentinel_hm.tiers.host import HostTiers

TIER_SPECS = ("auto", "host", "host:direct")


def open_tiers(spec: str) -> Tiers:
    """``auto`` (the best available: host on this build), ``host`` or ``host:direct``."""
    if spec in ("auto", "host"):
        return HostTiers(Access.MIGRATE)
    if spec == "host:direct":
        return HostTiers(Access.DIRECT)
    raise SentinelError(f"tiers={spec!r} is not known: use one of {', '.join(TIER_SPECS)}")


__all__ = ["TIER_SPECS", "HostTiers", "Tiers", "open_tiers"]

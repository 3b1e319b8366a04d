"""Policies: named functions ``(Context, budget bytes) -> Plan``, registered by name."""

from sentinel_hm.planning.policies import (  # noqa: F401  (importing registers them)
    baselines,
    page_lru,
    sentinel,
)
from sentinel_hm.planning.policies._common import (
    DIRECT_ONLY,
    REGISTRY,
    Context,
    Infeasible,
    recomputing,
)

POLICIES = tuple(REGISTRY)

__all__ = ["DIRECT_ONLY", "POLICIES", "REGISTRY", "Context", "Infeasible", "recomputing"]

"""The shared vocabulary: hardware models and their presets, the plan a policy produces, and
the cost model of ops on tiers. The simulator, the tiers, the policies and the runtime all
speak it; it imports nothing of theirs."""

from sentinel_hm.core.cost import CostModel
from sentinel_hm.core.hardware import Access, Hardware, LinkSpec, TierSpec
from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.core.presets import PRESETS, parse_hardware

__all__ = [
    "PRESETS",
    "Access",
    "CostModel",
    "Hardware",
    "LinkSpec",
    "Move",
    "Plan",
    "Tier",
    "TierSpec",
    "parse_hardware",
]

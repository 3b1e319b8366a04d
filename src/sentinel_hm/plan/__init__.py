"""Planning: hardware models, the cost model, policies and the Plan they produce."""

from sentinel_hm.plan.hardware import Access, Hardware, LinkSpec, TierSpec
from sentinel_hm.plan.model import Move, Plan, Tier
from sentinel_hm.plan.planner import make_plan, min_budget
from sentinel_hm.plan.policies import POLICIES
from sentinel_hm.plan.presets import PRESETS, parse_hardware

__all__ = [
    "POLICIES",
    "PRESETS",
    "Access",
    "Hardware",
    "LinkSpec",
    "Move",
    "Plan",
    "Tier",
    "TierSpec",
    "make_plan",
    "min_budget",
    "parse_hardware",
]

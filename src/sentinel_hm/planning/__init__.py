"""Planning: hardware models, the cost model, policies and the Plan they produce."""

from sentinel_hm.planning.hardware import Access, Hardware, LinkSpec, TierSpec
from sentinel_hm.planning.io import load_plan, save_plan
from sentinel_hm.planning.model import Move, Plan, Tier
from sentinel_hm.planning.planner import make_plan, min_budget
from sentinel_hm.planning.policies import POLICIES
from sentinel_hm.planning.presets import PRESETS, parse_hardware

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
    "load_plan",
    "make_plan",
    "min_budget",
    "parse_hardware",
    "save_plan",
]

"""Planning: the policies, the search for a plan within a budget, plan files and the
explanation of a plan's peak. Built on the shared vocabulary in `sentinel_hm.core` and on the
simulator, which it uses to check and compare plans."""

from sentinel_hm.planning.io import load_plan, save_plan
from sentinel_hm.planning.planner import make_plan, min_budget
from sentinel_hm.planning.policies import POLICIES

__all__ = ["POLICIES", "load_plan", "make_plan", "min_budget", "save_plan"]

"""`Sentinel`'s arguments, checked where they are given: a bad value must fail in
``Sentinel(...)`` (or a callback's constructor), not inside the third step after two full
warm-up steps."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.policies import POLICIES
from sentinel_hm.planning.policies.baselines import PLANNER_ONLY
from sentinel_hm.tiers import TIER_SPECS
from sentinel_hm.units import parse_budget


def check_fast_memory(fast_memory: Any) -> None:
    """``'min'``, a positive byte count, a size (``'4GiB'``) or a share in (0%, 100%]."""
    if fast_memory == "min":
        return
    try:
        parse_budget(fast_memory, 1 << 40)  # any peak: only the form is checked here
    except SentinelError as e:
        raise SentinelError(f"fast_memory={fast_memory!r}: {e}; or 'min', the smallest budget "
                            "this step can be held to") from None


def check_policy(policy: Any) -> None:
    """A policy the runtime can execute."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise SentinelError(f"unknown policy {policy!r}: choose one of "
                            f"{', '.join(p for p in POLICIES if p not in PLANNER_ONLY)}")
    if policy in PLANNER_ONLY:
        raise SentinelError(
            f"policy {policy!r} is a baseline for the planner and simulator (sh.plan, sentinel "
            "simulate); the runtime recomputes with policy='sentinel' and recompute=True (it "
            "chooses which layers), or wrap layers in torch.utils.checkpoint yourself")


def check_tiers(tiers: Any) -> None:
    """The form of a ``tiers=`` string (opening the tiers checks the rest: a GPU, NUMA
    nodes, bandwidths)."""
    known = ("auto", "cuda", "host", "host:direct")
    if not isinstance(tiers, str) or not (tiers in known or tiers.startswith(("throttled:",
                                                                             "numa:"))):
        raise SentinelError(f"tiers={tiers!r} is not known: use one of {', '.join(TIER_SPECS)}")


def check_trials(trials: Any) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int):
        raise SentinelError(f"trials={trials!r} is not a whole number: give 0 (no "
                            "test-and-trial steps) or more (3 by default)")
    if trials < 0:
        raise SentinelError(f"trials={trials} is negative: give 0 (no trials) or more")


def check_recompute(recompute: Any) -> None:
    if not isinstance(recompute, bool):
        raise SentinelError(f"recompute={recompute!r} is not a bool: give True (the plan may "
                            "recompute layers) or False")


def check_options(fast_memory: Any, tiers: Any, policy: Any, trials: Any,
                  recompute: Any = True) -> None:
    """Every option of `Sentinel` and of the framework callbacks."""
    check_fast_memory(fast_memory)
    check_tiers(tiers)
    check_policy(policy)
    check_trials(trials)
    check_recompute(recompute)


def check_model_and_optimizer(model: Any, optimizer: Any) -> None:
    if not isinstance(model, nn.Module):
        raise SentinelError(f"model is a {type(model).__name__}, not a torch.nn.Module: give "
                            "Sentinel the module your training step calls")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SentinelError(f"optimizer is a {type(optimizer).__name__}, not a "
                            "torch.optim.Optimizer: give Sentinel the optimizer that updates "
                            "the model's parameters (the torch optimizer inside a framework's "
                            "wrapper)")

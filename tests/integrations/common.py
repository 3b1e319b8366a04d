"""What the framework tests share: a run's outcome, and how a refused budget is reported
(never as a pass: below the floor that ``fast_memory="min"`` measures for the same run it is
a skip naming the refusal; at or above it a failure; and an error that is not a budget
refusal, such as a failure of Sentinel's machinery, is a failure too; as in
tests/runtime/test_third_party_models.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import sentinel_hm as sh

from ..runtime.test_sentinel import assert_same, assert_steady_within_budget


@dataclass
class Run:
    state: list[torch.Tensor]  # parameters, then optimizer state, after the last step
    stats: dict[str, Any] = field(default_factory=dict)
    refused: str | None = None  # the SentinelError's message
    warned: list[str] = field(default_factory=list)  # Sentinel's warnings
    evals: list[float] = field(default_factory=list)  # evaluation losses between steps
    sentinel: sh.Sentinel | None = None


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = list(model.parameters())
    state = [p.detach().clone() for p in params]
    return state + [optimizer.state[p][k].clone() for p in params
                    for k in sorted(optimizer.state[p])]


def sentinel_warnings(caught: list[Any]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("sentinel:")]


def phases(trace: sh.Trace) -> list[str]:
    """The profiled step's phases in order, runs collapsed (ops outside the model and the
    optimizer, e.g. the loss bookkeeping, left out)."""
    return [k for k, _ in itertools.groupby(op.phase.value for op in trace.ops
                                            if op.phase.value != "other")]


def check_twin(plain: Run, ours: Run, budget: str, floor: Callable[[], Run],
               accumulate: int = 1) -> None:
    """``ours`` trained exactly as ``plain`` and held its budget, one Sentinel step holding
    every micro-batch and the update; a refusal below the floor skips, any other fails."""
    steps = ["forward", "backward"] * accumulate + ["optimizer"]
    if ours.refused is not None:
        message = ours.refused
        assert budget != "min", message  # "min" is the measured floor: never refused
        # a budget refusal, not a failure of the machinery (NOTE [Failures]): that one fails
        assert ("smallest it can honour" in message
                or "smallest budget measured to work" in message), message
        asked = ours.stats["all_fast_peak_bytes"] * float(budget.rstrip("%")) / 100
        smallest = floor()
        assert smallest.refused is None, smallest.refused
        # the floor is the floor of whole steps, not of a step the callback cut short
        assert smallest.sentinel is not None and smallest.sentinel.trace is not None
        assert phases(smallest.sentinel.trace) == steps
        at = smallest.stats["budget_bytes"]
        if asked >= at:  # a larger budget refused where a smaller one trains: a bug
            pytest.fail(f"{budget} ({asked:.0f} bytes) refused although "
                        f'fast_memory="min" trains at {at} bytes: {message}')
        pytest.skip(f"{budget} refused (below the measured floor of {at} bytes): {message}")
    assert_same(plain.state, ours.state)
    assert ours.sentinel is not None and ours.sentinel.trace is not None
    assert phases(ours.sentinel.trace) == steps
    assert_steady_within_budget(ours.sentinel)  # steady, audited within budget, bytes moved
    stats = ours.stats
    assert stats["budget_bytes"] < stats["all_fast_peak_bytes"]  # every budget here binds
    assert stats["bytes_to_slow_per_step"] > 0
    # one profile, and one more when the plan recomputes layers (NOTE [Recomputed layers])
    assert stats["profiles"] == 1 + bool(stats["recomputed_layers"]), stats

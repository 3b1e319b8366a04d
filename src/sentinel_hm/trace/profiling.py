"""Public profiling entry points: `profile`, and the seed-style `start_profile` / `end_profile`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sentinel_hm.errors import SentinelError
from sentinel_hm.trace import tracer as _tracer
from sentinel_hm.trace.model import Trace


def profile(
    step_fn: Callable[[], Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    layers: str | Sequence[nn.Module] | None = "auto",
) -> Trace:
    """Run ``step_fn()`` once under the tracer and return its `Trace`.

    ``model`` delimits the forward pass and gives the layers (``layers="auto"``:
    the repeated blocks, see `sentinel_hm.trace.layers`; or a list of modules;
    or ``None`` for ``add_layer`` marks only). ``optimizer`` lets parameters,
    gradients and optimizer state be recognised from the start; without it,
    optimizers are found when they step. Run a warm-up step first if you want
    a steady step (optimizers create their state lazily in their first step).
    """
    start_profile(model=model, optimizer=optimizer, layers=layers)
    try:
        step_fn()
    except BaseException:
        end_profile()
        raise
    return end_profile()


def start_profile(
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    layers: str | Sequence[nn.Module] | None = "auto",
) -> None:
    """Start recording a step; `end_profile` returns the `Trace`."""
    _tracer.Tracer(model, optimizer, layers).start()


def end_profile() -> Trace:
    """Stop the profile that `start_profile` began and return its `Trace`."""
    active = _tracer.active_tracer()
    if active is None:
        raise SentinelError("end_profile() was called with no profile running: call start_profile() first")
    return active.stop()

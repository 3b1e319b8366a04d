"""The `Workload` bundle that every reference workload (and a user's factory) returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Workload:
    """A model, its optimizer and a deterministic batch factory.

    Convention shared with user factories: ``model(*batch)`` returns the scalar
    loss, so one training step is ``step()`` below and needs nothing else.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    make_batch: Callable[[], Batch]

    def step(self) -> torch.Tensor:
        """One plain training step: batch, forward (loss), backward, update."""
        batch = self.make_batch()
        loss = self.model(*batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def as_workload(name: str, made: Any) -> Workload:
    """Accept a `Workload` or a ``(model, optimizer, make_batch)`` tuple from a factory."""
    if isinstance(made, Workload):
        return made
    if isinstance(made, tuple) and len(made) == 3:
        model, optimizer, make_batch = made
        if (
            isinstance(model, nn.Module)
            and isinstance(optimizer, torch.optim.Optimizer)
            and callable(make_batch)
        ):
            return Workload(name, model, optimizer, make_batch)
    from sentinel_hm.errors import SentinelError

    raise SentinelError(
        f"workload factory {name!r} returned {type(made).__name__}; expected a "
        "(model: nn.Module, optimizer: torch.optim.Optimizer, make_batch: callable) tuple "
        "where model(*make_batch()) returns the loss"
    )

"""Recomputed layers: a layer's forward wrapped in non-reentrant activation checkpointing.

See NOTE [Recomputed layers] in manager.py. ``torch.utils.checkpoint`` restores the RNG state
for the rerun (dropout draws the same masks); the rerun also gives back the buffers it
changed, so batch norm's running statistics are updated once a step, as without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn


class CheckpointedLayers:
    """Layers whose forwards are checkpointed, by name; `restore` gives their own back."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[nn.Module, Any]] = {}  # name -> (module, own forward)

    def __bool__(self) -> bool:
        return bool(self._wrapped)

    @property
    def names(self) -> list[str]:
        return list(self._wrapped)

    def wrap(self, name: str, module: nn.Module) -> None:
        # an instance attribute ``forward`` (the module's own, if it had one) is replaced;
        # ``module(...)`` still runs the module's hooks, the rerun does not
        self._wrapped[name] = (module, module.__dict__.get("forward"))
        module.forward = partial(
            torch.utils.checkpoint.checkpoint, module.forward, use_reentrant=False,
            context_fn=partial(_rerun_keeps_buffers, list(module.buffers())))

    def restore(self) -> None:
        for module, own in self._wrapped.values():
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._wrapped = {}


def _rerun_keeps_buffers(
        buffers: list[torch.Tensor]) -> tuple[contextlib.AbstractContextManager[None],
                                              contextlib.AbstractContextManager[None]]:
    """Checkpoint contexts (forward, rerun): the rerun gives back the buffers it changed."""
    return contextlib.nullcontext(), _kept(buffers)


@contextlib.contextmanager
def _kept(buffers: list[torch.Tensor]) -> Iterator[None]:
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in zip(buffers, saved, strict=True):
                b.copy_(value)

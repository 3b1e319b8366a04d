"""``add_layer``: layer boundaries marked by the model itself, as in the original Sentinel."""

from __future__ import annotations

from typing import Any

import torch

from sentinel_hm.trace.tracer import active_tracer


class _LayerBoundary(torch.autograd.Function):
    """Identity whose autograd node marks a layer boundary in backward as well."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def add_layer(x: torch.Tensor) -> torch.Tensor:
    """Mark the end of one layer and the start of the next; returns ``x`` (a view).

    Call it between the layers of a forward pass, as in the original Sentinel:
    ``x = sh.add_layer(x)``. Forward layer *i* and backward layer *i* are then
    the ops between marks *i* and *i+1* (mark 0 is the start of the forward
    pass). Outside a profile it costs one identity autograd node.
    """
    tracer = active_tracer()
    if tracer is not None:
        tracer.mark_layer(x)
    if torch.is_grad_enabled() and x.requires_grad:
        return _LayerBoundary.apply(x)
    return x

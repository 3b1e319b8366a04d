"""Optimizer streaming: ``optimizer.step()`` runs chunk by chunk, one parameter at a time.

NOTE [Chunked optimizer step]
SGD, Adam and AdamW update each parameter from its own gradient and state
only, and their foreach kernels are elementwise, so updating the parameters in
chunks, one call per chunk, gives the same bits as one call over all of them.
The user still calls ``optimizer.step()``: a step pre-hook runs the class's
own step function once per chunk, with each param group's ``params`` narrowed
to the chunk's members, then empties the groups so that the step torch runs
next updates nothing; a post-hook (the first to run) puts the groups back.
Other hooks, LR schedulers and profilers see one step, as before. Before each
chunk the runtime makes sure the chunk's parameters, gradients and state are
in fast memory (the plan prefetched them while the previous chunk ran) and
advances its clock; the plan sends finished chunks out.

Not streamed, with one warning (the update then runs whole, with everything
brought back to fast memory first): an optimizer class not known to update
per parameter, ``fused=True`` (one kernel over all parameters), ``differentiable``
groups, and a step given a closure.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sentinel_hm.trace.layers import find_layers

STREAMABLE: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW,
)


def why_not_streamable(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the runtime cannot run ``optimizer``'s update in chunks, or None if it can."""
    name = type(optimizer).__name__
    if type(optimizer) not in STREAMABLE:
        known = ", ".join(c.__name__ for c in STREAMABLE)
        return f"{name} is not an optimizer known to update each parameter on its own ({known})"
    for group in optimizer.param_groups:
        if group.get("fused"):
            return f"{name}(fused=True) updates all parameters in one kernel"
        if group.get("differentiable"):
            return f"{name}(differentiable=True) builds a graph through the update"
    return None


def param_chunks(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    """One chunk per parameter, in the order of the model's layers (a tied parameter at its
    first layer), then the optimizer's parameters in no layer. One parameter per chunk is the
    finest clock the plan can use: it cuts the optimizer phase into intervals of as many
    chunks as its interval length says."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    seen: set[int] = set()
    chunks: list[list[nn.Parameter]] = []
    layered = [p for _, module in find_layers(model) for p in module.parameters()]
    rest = [p for group in optimizer.param_groups for p in group["params"]]
    for p in (*layered, *rest):
        if id(p) in owned and id(p) not in seen:
            seen.add(id(p))
            chunks.append([p])
    return chunks


class ChunkedStep:
    """Installs the hooks of NOTE [Chunked optimizer step] for one training step.

    ``before_chunk(c)`` runs before chunk ``c`` is updated, ``after_chunk(c)`` after it;
    ``whole()`` runs before an update that cannot be chunked (a closure was given).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        chunks: list[list[nn.Parameter]],
        before_chunk: Callable[[int], None],
        after_chunk: Callable[[int], None],
        whole: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self.chunks = chunks
        self.before_chunk, self.after_chunk, self.whole = before_chunk, after_chunk, whole
        self._groups: list[list[Any]] | None = None
        self._handles: list[Any] = []

    def install(self) -> None:
        opt = self.optimizer
        self._handles.append(opt.register_step_pre_hook(self._pre))
        post = opt.register_step_post_hook(self._post)
        # first among post-hooks: the user's own hooks see the param groups whole
        hooks = opt._optimizer_step_post_hooks  # an OrderedDict, typed as a dict
        hooks.move_to_end(post.id, last=False)  # type: ignore[attr-defined]
        self._handles.append(post)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.restore_groups()

    def restore_groups(self) -> None:
        """Put the param groups back (also after an exception inside the step)."""
        if self._groups is not None:
            for group, params in zip(self.optimizer.param_groups, self._groups, strict=True):
                group["params"] = params
            self._groups = None

    def _pre(self, opt: torch.optim.Optimizer, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        if args[1:] or kwargs.get("closure") is not None:  # args[0] is the optimizer
            self.whole()
            return
        raw = type(opt).step.__wrapped__  # type: ignore[attr-defined]  # below torch's hooks
        groups = opt.param_groups
        self._groups = [g["params"] for g in groups]
        group_of = {id(p): g for g, params in enumerate(self._groups) for p in params}
        try:
            for c, chunk in enumerate(self.chunks):
                narrowed: list[list[Any]] = [[] for _ in groups]
                for p in chunk:
                    if id(p) in group_of:
                        narrowed[group_of[id(p)]].append(p)
                for group, params in zip(groups, narrowed, strict=True):
                    group["params"] = params
                self.before_chunk(c)
                raw(opt)
                self.after_chunk(c)
        except BaseException:
            self.restore_groups()
            raise
        for group in groups:
            group["params"] = []  # the step torch runs now has nothing left to update

    def _post(self, opt: torch.optim.Optimizer, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> None:
        self.restore_groups()


def warn_unstreamed(reason: str) -> None:
    warnings.warn(
        f"sentinel: the optimizer step is not streamed ({reason}): its gradients and state "
        "come back to fast memory whole before each step, which raises the smallest budget "
        "that fits; SGD, Adam or AdamW without fused=True stream chunk by chunk",
        stacklevel=4,
    )

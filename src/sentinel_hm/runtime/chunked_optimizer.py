"""Optimizer streaming: ``optimizer.step()`` runs chunk by chunk, by the plan's intervals.

NOTE [Chunked optimizer step]
SGD, Adam and AdamW update each parameter from its own gradient and state
only, and their foreach and fused kernels are elementwise, so updating the
parameters in chunks, one call per chunk, gives the same bits as one call over
all of them. The user still calls ``optimizer.step()``: a step pre-hook runs
the class's own step function once per chunk, with each param group's
``params`` narrowed to the chunk's members (each group keeps its own flags:
foreach stays foreach, ``fused=True`` stays fused, a for-loop stays one), then
empties the groups so that the step torch runs next updates nothing; a
post-hook (the first to run) puts the groups back. Other hooks, LR schedulers
and profilers see one step, as before. Before each chunk the runtime makes
sure the chunk's parameters, gradients and state are in fast memory (the plan
prefetched them while the previous chunk ran) and advances its clock; the plan
sends finished chunks out.

Chunks are chosen per plan. The profiled step runs one parameter per chunk
(`param_chunks`): the finest clock, each chunk's first op a clock event the
planner can cut the optimizer phase at. The plan then runs coarser chunks
(`merge_chunks`), whose boundaries are a subset of the profiled ones: a
profiled boundary is kept only where the plan acts (a move is issued there, or
a chunk's tensors are in the slow tier and come back on demand), or where a
merged foreach chunk's temporaries (one call allocates them for all its
parameters at once) would not fit the plan's headroom. A merged chunk's clock
event is its first profiled chunk's. So state that never moves is updated in
as few calls as the plan allows, each group of tensors the plan brings back
together in one call, and when nothing moves the update is one call, the
user's own ``optimizer.step()`` itself.

Not streamed, with one warning (the update then runs whole, with everything
brought back to fast memory first): an optimizer class not known to update
per parameter, ``differentiable`` groups, and a step given a closure.
"""

from __future__ import annotations

import bisect
import itertools
import warnings
from collections.abc import Callable, Sequence, Set
from typing import Any

import torch
from torch import nn

from sentinel_hm.core.plan import Move, Tier
from sentinel_hm.trace.layers import find_layers
from sentinel_hm.trace.model import Trace

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


def merge_chunks(
    chunk_ops: Sequence[int],
    chunk_sids: Sequence[Sequence[int]],
    moves: Sequence[Move],
    start_slow: Set[int],
    extra_bytes: Sequence[int] = (),
    headroom: Sequence[int] = (),
) -> list[list[int]]:
    """NOTE [Chunked optimizer step]: the profiled chunks (first ops ``chunk_ops``, held
    storages ``chunk_sids``) grouped into the chunks a plan runs, as lists of profiled chunk
    indices, in order. Profiled chunk ``k`` starts a new chunk where the plan acts at its
    first op: a move is issued after the previous chunk's first op and at or before its own,
    or one of its storages is in the slow tier then (``start_slow``, then the moves in order)
    and comes back on demand. ``extra_bytes[k]``: the bytes chunk ``k``'s temporaries add when
    merged with others (those of a foreach call, allocated for all its parameters at once;
    0 for a for-loop or fused update); ``headroom[k]``: the plan's budget less its predicted
    fast bytes during chunk ``k``: a merged chunk keeps the sum of its extras, less the
    largest (already in the plan), within its smallest headroom."""
    ordered = sorted(moves, key=lambda m: m.issue_at)
    slow = set(start_slow)
    i = 0
    groups: list[list[int]] = []
    extras: list[int] = []
    room = 0
    for k, op in enumerate(chunk_ops):
        acted = False
        while i < len(ordered) and ordered[i].issue_at <= op:
            move = ordered[i]
            if move.to is Tier.SLOW:
                slow.add(move.storage)
            else:
                slow.discard(move.storage)
            acted = acted or k > 0
            i += 1
        extra = extra_bytes[k] if k < len(extra_bytes) else 0
        here = headroom[k] if k < len(headroom) else 0
        merged = [*extras, extra]
        added = sum(merged) - max(merged)
        fits = bool(groups) and (added == 0 or added <= min(room, here))
        if acted or not fits or any(sid in slow for sid in chunk_sids[k]):
            groups.append([k])
            extras, room = [extra], here
        else:
            groups[-1].append(k)
            extras, room = merged, min(room, here)
    return groups


def chunk_extras(trace: Trace, chunk_ops: Sequence[int], end: int, fast_bytes: Sequence[int],
                 budget: int) -> tuple[list[int], list[int]]:
    """For `merge_chunks`, from the profiled step and a plan's prediction: each profiled
    chunk's foreach temporaries (storages its ops create and free, when it runs a
    ``_foreach_`` op; a for-loop frees each parameter's before the next, a fused kernel has
    none) and the plan's headroom during its ops (``fast_bytes``: predicted per op)."""
    bounds = [*chunk_ops, end]
    temporaries = [0] * len(chunk_ops)
    for s in trace.storages:  # created and freed within one chunk
        c = bisect.bisect_right(bounds, s.created_at) - 1 if s.created_at is not None else -1
        if 0 <= c < len(chunk_ops) and s.freed_at is not None and s.freed_at < bounds[c + 1]:
            temporaries[c] += s.nbytes
    extras, headroom = [], []
    for c, (first, stop) in enumerate(itertools.pairwise(bounds)):
        foreach = any("_foreach_" in trace.ops[op].name
                      for op in range(first, min(stop, len(trace.ops))))
        extras.append(temporaries[c] if foreach else 0)
        during = fast_bytes[first:stop]
        headroom.append(budget - max(during) if len(during) else 0)
    return extras, headroom


class ChunkedStep:
    """Installs the hooks of NOTE [Chunked optimizer step] for one training step.

    ``before_chunk(c)`` runs before chunk ``c`` is updated; ``whole()`` runs before an
    update that cannot be chunked (a closure was given).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        chunks: list[list[nn.Parameter]],
        before_chunk: Callable[[int], None],
        whole: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self.chunks = chunks
        self.before_chunk, self.whole = before_chunk, whole
        self._groups: list[list[Any]] | None = None
        self._hidden: list[dict[str, Any]] | None = None  # the groups, during torch's step
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
        if self._hidden is not None:
            self.optimizer.param_groups[:] = self._hidden
            self._hidden = None
        if self._groups is not None:
            for group, params in zip(self.optimizer.param_groups, self._groups, strict=True):
                group["params"] = params
            self._groups = None

    def _pre(self, opt: torch.optim.Optimizer, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        if args[1:] or kwargs.get("closure") is not None:  # args[0] is the optimizer
            self.whole()
            return
        groups = opt.param_groups
        self._groups = [g["params"] for g in groups]
        group_of = {id(p): g for g, params in enumerate(self._groups) for p in params}
        narrowed_chunks: list[list[list[Any]]] = []
        for chunk in self.chunks:
            narrowed: list[list[Any]] = [[] for _ in groups]
            for p in chunk:
                if id(p) in group_of:
                    narrowed[group_of[id(p)]].append(p)
            narrowed_chunks.append(narrowed)
        if len(narrowed_chunks) == 1 and all(
                len(n) == len(params) for n, params in zip(narrowed_chunks[0], self._groups,
                                                           strict=True)):
            # one chunk over every parameter: the step torch runs next is the update, the
            # user's own call (in the groups' own order)
            self._groups = None
            self.before_chunk(0)
            return
        raw = type(opt).step.__wrapped__  # type: ignore[attr-defined]  # below torch's hooks
        try:
            for c, narrowed in enumerate(narrowed_chunks):
                for group, params in zip(groups, narrowed, strict=True):
                    group["params"] = params
                self.before_chunk(c)
                raw(opt)
        except BaseException:
            self.restore_groups()
            raise
        for group in groups:
            group["params"] = []  # the step torch runs now has nothing left to update
        self._hidden = list(groups)
        groups.clear()  # nor any group to call its update for

    def _post(self, opt: torch.optim.Optimizer, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> None:
        self.restore_groups()


def warn_unstreamed(reason: str) -> None:
    warnings.warn(
        f"sentinel: the optimizer step is not streamed ({reason}): its gradients and state "
        "come back to fast memory whole before each step, which raises the smallest budget "
        "that fits; SGD, Adam or AdamW (foreach, for-loop or fused) stream chunk by chunk",
        stacklevel=4,
    )

"""The residency guard: an op that reads the slow tier under migrate access fails, on any machine.

NOTE [Residency guard]
Under migrate access (a GPU's tiers) an op may only read tensors in the fast tier: the
runtime brings a tensor back before its use. On a GPU an op that reads a slow-tier tensor (a
pinned host view) fails with a device mismatch, or runs on the host, or under autocast in
another dtype; on the host tiers the same mistake is silent, since host memory is readable
in place. `ResidencyGuard` makes it visible on any machine: under a ``TorchDispatchMode``,
each op that reads data (not a view, alias or metadata op) is checked, and an input whose
storage the tiers place in the slow tier (``tiers.is_slow``: slow tensors are views of the
arena) is a violation, named by the op, the tensor (shape, dtype, parameter name), the
innermost module running and whether it ran in backward or in a checkpoint rerun.

What is not a violation:
- views and metadata ops (``func.is_view``, ``detach``, ``alias``, ``_unsafe_view``): they
  read no bytes (the runtime makes slot views of the arena all the time);
- the copies between tiers: ``copy_`` (a slow operand of a copy is a tier copy by
  definition), ``set_`` (rebuilding a tensor over a storage), ``_to_copy`` with an explicit
  ``device`` (``.to(device)``: a fetch); the host tiers' own copies are ``memmove`` and
  dispatch no op at all, on the mover threads or on the compute thread (``fetch_now``);
- empty tensors (no bytes are read);
- tensor subclasses (DTensor: FSDP2 paths are not checked) and non-strided layouts;
- a gradient, on tiers that move gradients (``moves_gradients``: the host tiers swap
  ``param.grad`` for an arena view, which accumulation and ``clip_grad_norm_`` then read in
  place by design; GPU-like tiers never do, and there a slow gradient read is a violation).

A ``*_like`` factory (``empty_like``) reads no bytes, but counts: on a GPU it would make its
result on the slow tier's device.

A dispatch mode is thread-local: the copy engine's threads are not seen, and the compute
thread (the autograd engine runs a CPU backward on the calling thread) is. Under direct
access an op may read the slow tier in place, so the guard checks nothing there and is
not even installed. Not entered, it costs nothing; entered, one Python call per op.

The guard raises a `ResidencyError` at the first violation (``collect=False``), or records
every violation in ``violations`` and lets the op run (``collect=True``: an audited step can
report them all, and training goes on as it would on the host); `check` then raises for
what was collected.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sentinel_hm.core.hardware import Access
from sentinel_hm.errors import SentinelError
from sentinel_hm.tiers.base import Tiers

aten = torch.ops.aten

# ops that read no bytes of their inputs, or that are the tier copies themselves
_PASS: frozenset[Any] = frozenset({
    aten.detach.default, aten.alias.default, aten._unsafe_view.default,
    aten.copy_.default, aten.set_.source_Storage, aten.set_.source_Storage_storage_offset,
    aten.set_.source_Tensor, aten.set_.default, aten.lift_fresh.default,
    aten.is_same_size.default, aten._has_compatible_shallow_copy_type.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
    aten.sym_storage_offset.default, aten.dim.default,
})
_PLAIN = (torch.Tensor, nn.Parameter)
_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


class ResidencyError(SentinelError):
    """An op read a tensor in the slow tier under migrate access (NOTE [Residency guard])."""


@dataclass(frozen=True)
class Violation:
    """One op input in the slow tier."""

    op: str  # e.g. "aten.mm.default"
    shape: tuple[int, ...]  # of the tensor the op was given
    dtype: torch.dtype
    argument: int  # its position among the op's tensor inputs
    parameter: str | None  # the model's parameter it is (or is a view of), if any
    layer: str  # the innermost module running, else the parameter's owner
    context: str  # "forward", "backward (MmBackward0)", "a checkpoint rerun in backward (...)"

    def __str__(self) -> str:
        what = "a tensor" if self.parameter is None else f"parameter {self.parameter!r}"
        return (f"{self.op} read {what} in the slow tier (shape {self.shape}, {self.dtype}, "
                f"tensor input {self.argument}) in {self.layer}, during {self.context}")


class ResidencyGuard(TorchDispatchMode):
    """Within ``with ResidencyGuard(tiers, model):``, an op that reads a slow-tier tensor under
    migrate access is a violation (NOTE [Residency guard]): raised at once as a
    `ResidencyError`, or with ``collect=True`` appended to ``violations`` (the op still runs).
    ``model`` names layers and parameters by their qualified names (else by class)."""

    def __init__(self, tiers: Tiers, model: nn.Module | None = None, *,
                 collect: bool = False) -> None:
        super().__init__()
        self.tiers = tiers
        self.model = model
        self.collect = collect
        self.violations: list[Violation] = []
        self.ops_checked = 0  # ops whose inputs were checked (a test can see it ran)
        self._pushed: list[bool] = []  # per (re-entrant) __enter__: whether the mode went on

    @property
    def checking(self) -> bool:
        """Whether ops are checked: only under migrate access (direct access reads in place)."""
        return self.tiers.access is Access.MIGRATE

    def __enter__(self) -> ResidencyGuard:
        pushed = self.checking
        self._pushed.append(pushed)
        if pushed:
            super().__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._pushed.pop():
            super().__exit__(exc_type, exc, tb)

    def check(self) -> None:
        """Raise a `ResidencyError` for the violations collected so far (and forget them)."""
        found, self.violations = self.violations, []
        if found:
            raise ResidencyError(_message(found))

    # -- the mode ------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not (func.is_view or func in _PASS
                or (func is aten._to_copy.default and "device" in kwargs)):
            self._check(func, args, kwargs)
        return func(*args, **kwargs)

    def _check(self, func: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if self.tiers.arena() is None:
            return  # nothing is in the slow tier
        self.ops_checked += 1
        k = 0
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            k += 1
            if (type(t) not in _PLAIN or t.layout is not torch.strided or t.numel() == 0
                    or not self.tiers.is_slow(t.untyped_storage())):
                continue
            if (self.tiers.moves_gradients and self.model is not None
                    and _within(t, (p.grad for p in self.model.parameters()))):
                continue  # such tiers let the program read a gradient in place, by design
            v = self._violation(func, t, k - 1)
            if not self.collect:
                raise ResidencyError(_message([v]))
            self.violations.append(v)

    def _violation(self, func: Any, t: torch.Tensor, argument: int) -> Violation:
        module, rerun = _running(sys._getframe(2))
        node = torch._C._current_autograd_node()
        context = "forward" if node is None else f"backward ({node.name()})"
        if rerun:
            context = f"a checkpoint rerun in {context}"
        parameter = None if self.model is None else _parameter_of(t, self.model)
        if module is not None:
            layer = self._name(module)
        elif parameter is not None:  # a backward op runs in no module's code: the owner
            owner = dict(self.model.named_modules())[parameter.rpartition(".")[0]] \
                if self.model is not None else None
            layer = f"{self._name(owner)}, the parameter's owner" if owner else "no module"
        else:
            layer = "no module"
        return Violation(str(func), tuple(t.shape), t.dtype, argument, parameter, layer,
                         context)

    def _name(self, module: nn.Module) -> str:
        kind = type(module).__name__
        name = None if self.model is None else next(
            (n for n, m in self.model.named_modules() if m is module), None)
        return f"a {kind}" if name is None else f"layer {name or '(the model)'!r} ({kind})"


def _parameter_of(t: torch.Tensor, model: nn.Module) -> str | None:
    """The parameter whose bytes ``t`` reads: itself, or a view of it (``weight.t()``)."""
    return next((name for name, p in model.named_parameters() if _within(t, (p,))), None)


def _within(t: torch.Tensor, tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether ``t`` starts within the bytes of one of ``tensors`` (all in ``t``'s storage's
    address space: slow tensors share the arena)."""
    start = t.data_ptr()
    return any(o is not None and o.data_ptr() <= start < o.data_ptr() + o.numel()
               * o.element_size() for o in tensors)


def _running(frame: FrameType | None) -> tuple[nn.Module | None, bool]:
    """The innermost module whose code is running (its frames name it even in a checkpoint
    rerun, which calls the bound forward without the module's hooks), and whether a
    checkpoint rerun is running. Only on a violation: walking frames costs."""
    module: nn.Module | None = None
    rerun = False
    while frame is not None:
        code = frame.f_code
        if module is None and code.co_varnames[:1] == ("self",):
            obj = frame.f_locals.get("self")
            if isinstance(obj, nn.Module):
                module = obj
        if code.co_name == "recompute_fn" and code.co_filename.endswith(_CHECKPOINT_FILE):
            rerun = True
        frame = frame.f_back
    return module, rerun


def _message(found: list[Violation]) -> str:
    unique = list(dict.fromkeys(str(v) for v in found))
    lines = "\n".join(f"  - {v}" for v in unique[:10])
    more = f"\n  (and {len(unique) - 10} more)" if len(unique) > 10 else ""
    return (f"residency guard: {len(found)} op input(s) read the slow tier under migrate "
            "access, which on a GPU is a device mismatch (or a silent host computation); "
            f"the runtime must bring each back to the fast tier before it is used:\n"
            f"{lines}{more}")

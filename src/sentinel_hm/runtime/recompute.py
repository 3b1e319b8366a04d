"""Recomputed layers: a layer's forward wrapped in non-reentrant activation checkpointing.

See NOTE [Recomputed layers] in manager.py. ``torch.utils.checkpoint`` restores the RNG state
for the rerun (dropout draws the same masks); the rerun also gives back the buffers it
changed, so batch norm's running statistics are updated once a step, as without it.

NOTE [Safe reruns]
A checkpoint reruns a layer's forward in backward with the arguments of the first call, kept
by reference. Three things make that rerun safe, or find that it is not:

- No cache. Hugging Face passes its ``DynamicCache`` into each decoder layer (positionally
  or by keyword, named ``cache``, ``past_key_values``, ``past_key_value`` or ``layer_past``
  across versions), and the layer appends this call's keys and values to it: a rerun would
  append them again (keys 2T long; eager attention fails on the mask's shape, sdpa silently
  doubles the cache). As Hugging Face's own gradient checkpointing does, the rerun gets no
  cache and ``use_cache=False`` (bound by name through the forward's signature, so positional
  passing is caught too). The first forward keeps its cache: its outputs, and the cache the
  model returns, are bit for bit those of plain training (with an empty cache, attending to
  the cache's copy of this call's keys or to the keys themselves is the same arithmetic).
  Dropping the cache in the first forward too, as Hugging Face does, would return a cache
  with no entries for the recomputed layers.
- Parameters fast. A rerun calls the layer's forward directly: the module's own forward
  pre-hooks, which make its moving parameters fast before it runs, do not fire. The rerun
  calls `CheckpointedLayers.before_forward` with the module first (the manager sets it, per
  steady step, to make that module's own parameters fast; the first forward ran the hooks).
- Verified. On a profile step (``verifying``), every tensor autograd saves inside a
  recomputed layer is also copied aside, out of the tracer's sight (the profile stays that of
  the recomputing step). At the first unpack the rerun runs, and each rebuilt tensor must
  equal its copy: shape, dtype and device, and the bits of every floating-point and boolean
  tensor (integer tensors are indices, or opaque workspaces: oneDNN's LSTM saves bytes whose
  contents differ run to run, as cuDNN's reserves do). A rerun that raises, or rebuilds anything
  else, is a rerun that does not repeat its forward (a side effect it replays, state it
  reads that has changed, a cache that was not empty): the copies are given to autograd
  instead, so that step still trains exactly as without recomputation, and the layer is
  listed in `diverged` with the reason; the manager gives it its own forward back, warns,
  and profiles again without it. Saved tensors are compared rather than the sequence of ops,
  because the first forward's ops include the cache's update and the rerun's rightly do
  not. Parameters and buffers, which outlive the step anyway, are kept by reference, not
  copied.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

# NOTE [Safe reruns]: the names Hugging Face's layers take their cache by, across versions
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value", "layer_past")

# raised by a checkpoint to end a rerun once every saved tensor is rebuilt: not a failure
_STOP = getattr(torch.utils.checkpoint, "_StopRecomputationError", ())


class CheckpointedLayers:
    """Layers whose forwards are checkpointed, by name; `restore` gives their own back.

    NOTE [Safe reruns]: ``before_forward(module)`` runs before the rerun (the first forward
    ran the module's pre-hooks); ``verifying`` makes the reruns of this step check that they repeat their
    forwards (`diverged`: the layers that did not, and why; never wrapped again)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[nn.Module, Any]] = {}  # name -> (module, own forward)
        self.before_forward: Callable[[nn.Module], None] | None = None
        self.verifying = False
        self.diverged: dict[str, str] = {}  # found on this profile step: name -> why
        self.unsafe: dict[str, str] = {}  # given their forwards back for good: name -> why

    def __bool__(self) -> bool:
        return bool(self._wrapped)

    @property
    def names(self) -> list[str]:
        return list(self._wrapped)

    def wrap(self, name: str, module: nn.Module) -> bool:
        """Checkpoint ``module``'s forward; False (nothing done) for a layer whose rerun was
        found not to repeat its forward."""
        if name in self.unsafe or name in self._wrapped:
            return name in self._wrapped
        # an instance attribute ``forward`` (the module's own, if it had one) is replaced;
        # ``module(...)`` still runs the module's hooks, the rerun does not
        self._wrapped[name] = (module, module.__dict__.get("forward"))
        forward = module.forward
        try:
            signature: inspect.Signature | None = inspect.signature(forward)
        except (TypeError, ValueError):  # a builtin or C forward: nothing to bind by name
            signature = None
        buffers = list(module.buffers())

        def checkpointed(*args: Any, **kwargs: Any) -> Any:
            call = _Call(self, name, module, forward, signature, buffers)
            # keyword arguments through a partial: names such as ``use_reentrant`` or
            # ``context_fn`` are the layer's, never the checkpoint's
            return torch.utils.checkpoint.checkpoint(
                partial(call.run, **kwargs), *args, use_reentrant=False,
                context_fn=call.contexts)

        module.forward = checkpointed
        return True

    def restore(self, names: list[str] | None = None) -> None:
        """Give the layers (``names``; all by default) their own forwards back."""
        for name in list(self._wrapped) if names is None else names:
            module, own = self._wrapped.pop(name)
            if own is None:
                del module.forward
            else:
                module.forward = own

    def give_up_diverged(self) -> dict[str, str]:
        """NOTE [Safe reruns]: the layers found unsafe on this step get their own forwards
        back and are never wrapped again; returns them with the reason."""
        diverged, self.diverged = self.diverged, {}
        self.restore([name for name in diverged if name in self._wrapped])
        self.unsafe.update(diverged)
        return diverged


class _Call:
    """One checkpointed call of a layer: its first forward, then its rerun in backward."""

    def __init__(self, layers: CheckpointedLayers, name: str, module: nn.Module,
                 forward: Callable[..., Any], signature: inspect.Signature | None,
                 buffers: list[torch.Tensor]) -> None:
        self.layers, self.name, self.module = layers, name, module
        self.forward, self.signature, self.buffers = forward, signature, buffers
        self.rerunning = False
        self.failed = False

    def contexts(self) -> tuple[contextlib.AbstractContextManager[None],
                                contextlib.AbstractContextManager[None]]:
        """Checkpoint contexts (first forward, rerun)."""
        first = _verified(self) if self.layers.verifying else contextlib.nullcontext()
        return first, self._rerun()

    @contextlib.contextmanager
    def _rerun(self) -> Iterator[None]:
        """The rerun gives back the buffers it changed, and knows it is the rerun."""
        saved = [b.clone() for b in self.buffers]
        self.rerunning = True
        try:
            yield
        finally:
            self.rerunning = False
            with torch.no_grad():
                for b, value in zip(self.buffers, saved, strict=True):
                    b.copy_(value)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if not self.rerunning:  # ``module(...)`` ran its pre-hooks (`_fetch_hooks`) already
            return self.forward(*args, **kwargs)
        if self.layers.before_forward is not None:  # a rerun runs no pre-hooks
            self.layers.before_forward(self.module)
        args, kwargs = _without_cache(self.signature, args, kwargs)
        try:
            return self.forward(*args, **kwargs)
        except _STOP:
            raise
        except Exception as e:
            e.add_note(f"sentinel: raised while recomputing layer {self.name!r} in backward "
                       "(NOTE [Recomputed layers]); Sentinel(..., recompute=False) does not "
                       "recompute layers")
            raise

    def fail(self, why: str) -> None:
        self.failed = True
        self.layers.diverged.setdefault(self.name, why)


def _without_cache(signature: inspect.Signature | None, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """NOTE [Safe reruns]: the arguments with no cache and ``use_cache=False``."""
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:  # the forward itself will say what is wrong with these arguments
        return args, kwargs
    arguments = bound.arguments
    spread = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    for where in (arguments, *(arguments[n] for n in spread if n in arguments)):
        for key in CACHE_ARGUMENTS:
            if where.get(key) is not None:
                where[key] = None
        if where.get("use_cache"):
            where["use_cache"] = False
    return bound.args, bound.kwargs


@contextlib.contextmanager
def _verified(call: _Call) -> Iterator[None]:
    """NOTE [Safe reruns]: within a checkpoint's first forward, each saved tensor is packed
    by the checkpoint and also kept aside; its unpack checks the rerun's rebuilt tensor
    against it, and gives autograd the kept one when the rerun did not repeat the forward."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    if hooks is None:  # an older torch: reruns are not verified
        yield
        return
    pack, unpack = hooks  # the checkpoint's, entered just before this context
    alive = {t.untyped_storage().data_ptr() for t in (*call.module.parameters(),
                                                      *call.module.buffers())}

    def pack_kept(t: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        if type(t) not in (torch.Tensor, nn.Parameter) or t.layout is not torch.strided:
            return pack(t), None  # a subclass, a sparse tensor: not verified
        if t.untyped_storage().data_ptr() in alive:
            return pack(t), t  # a parameter or buffer: alive anyway
        with _disable_current_modes():  # out of the tracer's sight
            copy = t.detach().clone()
        return pack(t), copy

    def unpack_checked(packed: tuple[Any, torch.Tensor | None]) -> torch.Tensor:
        holder, copy = packed
        if call.failed and copy is not None:
            return copy
        try:
            rebuilt = unpack(holder)
        except Exception as e:  # any failure of the rerun: it is not safe
            if copy is None:
                raise
            call.fail(f"its rerun in backward raised {type(e).__name__}: {_gist(e)}")
            return copy
        if copy is None:
            return rebuilt
        why = _differs(rebuilt, copy)
        if why is None:
            return rebuilt
        call.fail(f"its rerun in backward rebuilt a saved tensor with {why}")
        return copy

    with torch.autograd.graph.saved_tensors_hooks(pack_kept, unpack_checked):
        yield


def _gist(error: Exception, most: int = 600) -> str:
    """An error's message on one line, without checkpoint's prefix and debugging tip."""
    lines = []
    for line in str(error).removeprefix("torch.utils.checkpoint: ").splitlines():
        if line.strip() in ("", ".") or "debug" in line.lower():
            break
        lines.append(line.strip())
    gist = "; ".join(lines)
    return gist if len(gist) <= most else gist[: most - 3] + "..."


def _differs(rebuilt: torch.Tensor, saved: torch.Tensor) -> str | None:
    """How a rebuilt saved tensor differs from the one the first forward saved, or None."""
    for what in ("shape", "dtype", "device"):
        a, b = getattr(rebuilt, what), getattr(saved, what)
        if a != b:
            return f"{what} {tuple(a) if what == 'shape' else a} instead of " \
                   f"{tuple(b) if what == 'shape' else b}"
    if not (rebuilt.is_floating_point() or rebuilt.is_complex() or rebuilt.dtype == torch.bool):
        # integers: indices, or an opaque workspace (oneDNN's LSTM, cuDNN's RNN and batch norm
        # reserve bytes whose contents are no result of the kernel's and differ run to run);
        # a wrong index shows in the floating-point tensors computed from it
        return None
    with _disable_current_modes(), torch.no_grad():
        if rebuilt.data_ptr() == saved.data_ptr() and rebuilt.stride() == saved.stride():
            return None
        if torch.equal(rebuilt, saved):
            return None
        if rebuilt.is_floating_point() or rebuilt.is_complex():
            nan = rebuilt.isnan()
            if torch.equal(nan, saved.isnan()) and torch.equal(rebuilt[~nan], saved[~nan]):
                return None  # NaN where the forward had NaN
    return "other values (a rerun must rebuild the same bits: state read that has changed, " \
           "or a nondeterministic kernel)"

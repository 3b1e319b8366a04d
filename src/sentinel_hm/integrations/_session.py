"""One `Sentinel` driven by a framework's callbacks instead of a ``with`` block.

A framework's hooks say where a training step begins and where it ends (after the optimizer
step); `StepSession` enters `Sentinel.step()` at the first and leaves it at the second, so one
Sentinel step holds exactly one optimizer step's worth of work, every micro-batch of a
gradient accumulation included.

NOTE [Open steps]
Between `begin` and `end` the Sentinel step is open: its saved-tensor hooks are pushed on this
thread and its optimizer hooks installed. A framework that raises inside a step never reaches
the hook that would end it, so `abort` throws the error into the step (the Sentinel brings
every tensor back to fast memory and removes its hooks, as after an exception in a ``with``
block) and `close` aborts an open step before closing the Sentinel.

NOTE [Closures]
Frameworks call ``optimizer.step`` with a closure: accelerate passes ``closure=None``
positionally, and Lightning's automatic optimization passes a closure that runs the forward,
the backward and gradient clipping. The runtime streams an update (NOTE [Chunked optimizer
step]) only when no closure is given, and a closure running inside ``optimizer.step`` would
run the whole forward and backward inside the update, where the tracer files its operations
under the optimizer phase. torch's own optimizers (LBFGS aside) call the closure once, first
thing in ``step``, under ``torch.enable_grad()``, so a global optimizer step pre-hook
(global hooks run before the optimizer's own, and this one is registered before the tracer's)
calls the closure itself and hands ``step`` no closure: the same work in the same order, and
the update streams. ``step`` then returns None instead of the closure's loss; Lightning reads
the loss from its closure object, accelerate ignores it. Other optimizers keep their closure.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from sentinel_hm.errors import SentinelError
from sentinel_hm.runtime import Sentinel
from sentinel_hm.runtime.options import check_options


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a framework's wrapper: accelerate's ``AcceleratedOptimizer``
    (``.optimizer``; itself a torch ``Optimizer`` subclass whose ``param_groups`` and
    ``state`` are the inner one's), Lightning's ``LightningOptimizer`` (``._optimizer``)."""
    seen: set[int] = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        for attr in ("optimizer", "_optimizer"):
            inner = getattr(optimizer, attr, None)
            if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
                optimizer = inner
                break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SentinelError(f"the trainer's optimizer is a {type(optimizer).__name__}, not a "
                            "torch.optim.Optimizer (nor a wrapper of one): Sentinel needs the "
                            "torch optimizer that updates the model's parameters")
    return optimizer


def calls_closure_once_first(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step(closure)`` is ``closure()`` (under ``enable_grad``) and then
    ``step()``: the step function of a torch optimizer other than LBFGS."""
    step = getattr(type(optimizer).step, "__wrapped__", type(optimizer).step)
    return (getattr(step, "__module__", "").startswith("torch.optim.")
            and not isinstance(optimizer, torch.optim.LBFGS))


class StepSession:
    """A `Sentinel` whose steps are opened and closed by callbacks (NOTE [Open steps])."""

    def __init__(self, fast_memory: str | int, tiers: str, policy: str, trials: int) -> None:
        check_options(fast_memory, tiers, policy, trials)  # at construction, not at the third step
        self.options: dict[str, Any] = {"fast_memory": fast_memory, "tiers": tiers,
                                        "policy": policy, "trials": trials}
        self.sentinel: Sentinel | None = None  # the last one built, kept after it closes
        self._live = False
        self._step: AbstractContextManager[None] | None = None
        self._closure_hook: Any = None

    @property
    def live(self) -> bool:
        """A Sentinel is built and not yet closed."""
        return self._live

    @property
    def in_step(self) -> bool:
        return self._step is not None

    def start(self, model: nn.Module, optimizer: Any) -> Sentinel:
        """Build the Sentinel (after closing one left from an earlier run)."""
        self.close()
        optimizer = unwrap_optimizer(optimizer)
        self._closure_hook = register_optimizer_step_pre_hook(partial(_closure_first, optimizer))
        try:
            self.sentinel = Sentinel(model, optimizer, **self.options)
        except BaseException:
            self._closure_hook.remove()
            self._closure_hook = None
            raise
        self._live = True
        return self.sentinel

    def begin(self) -> None:
        """Open a step, unless one is open (a later micro-batch of the same step)."""
        if self.sentinel is None or not self._live or self._step is not None:
            return
        step = self.sentinel.step()
        step.__enter__()
        self._step = step

    def end(self) -> None:
        """Close the open step (after the optimizer step and the gradients' reset)."""
        step, self._step = self._step, None
        if step is not None:
            step.__exit__(None, None, None)

    def abort(self, error: BaseException | None = None) -> None:
        """Leave an open step as if ``error`` had been raised inside it."""
        step, self._step = self._step, None
        if step is None:
            return
        if error is None:
            error = RuntimeError("sentinel: the training loop stopped inside a step")
        try:
            step.__exit__(type(error), error, error.__traceback__)
        except BaseException as raised:  # the step re-raises what it was given
            if raised is not error:
                raise

    def close(self) -> None:
        """Abort an open step, bring every tensor back to fast memory, stop the Sentinel (its
        `stats()` still answer afterwards)."""
        self.abort()
        if self._closure_hook is not None:
            self._closure_hook.remove()
            self._closure_hook = None
        if self.sentinel is not None and self._live:
            self._live = False
            self.sentinel.close()


def _closure_first(target: torch.optim.Optimizer, optimizer: torch.optim.Optimizer,
                   args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """NOTE [Closures]: ``target.step(closure)`` becomes ``closure(); target.step()``."""
    if optimizer is not target or len(args) > 2 or (len(args) == 1 and "closure" not in kwargs):
        return None
    rest = dict(kwargs)
    closure = rest.pop("closure", None) if len(args) == 1 else args[1]
    if closure is not None:
        if not calls_closure_once_first(optimizer):
            return None
        with torch.enable_grad():
            closure()
    return args[:1], rest

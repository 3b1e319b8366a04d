"""Sentinel in a Lightning ``Trainer``, as one callback::

    from sentinel_hm.integrations.lightning import SentinelCallback
    trainer = lightning.pytorch.Trainer(..., callbacks=[SentinelCallback(fast_memory="20%")])
    trainer.fit(module, loader)

Where Lightning (2.2 to 2.6) calls what, one batch of automatic optimization
(``_TrainingEpochLoop.advance``, ``_AutomaticOptimization.run``)::

    batch_to_device, on_train_batch_start
    a batch that does not step (accumulate_grad_batches > 1):  training_step, backward
    a batch that steps:  optimizer.step(closure), the closure running training_step,
                         zero_grad (first batch of a window only), backward, clipping
    lr_scheduler.step() (interval "step"), on_train_batch_end, then validation if due

A Sentinel step opens in the ``on_train_batch_start`` of the first batch of an
accumulation window and closes in the ``on_train_batch_end`` of the batch whose optimizer step
ran (an optimizer step post-hook says which), so every micro-batch and the update run inside
one Sentinel step; validation and checkpoints run between steps. Lightning's closure runs
before the update, outside ``optimizer.step``'s own work (NOTE [Closures]), so the update
streams. The Sentinel is built in ``on_train_start`` from the LightningModule and its one
optimizer and closed in ``on_train_end``; ``on_exception`` brings everything back first.

Known limitations (docs/integrations.md has the list): one optimizer; steps must repeat (a
last batch of another size, an epoch whose batch count leaves a short accumulation window, a
skipped optimizer step make a step that does not match the profile: it runs without
migrations and the next is profiled again, with a warning); one process, one device.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ModuleNotFoundError as e:  # the extra is optional
    raise ModuleNotFoundError(f"sentinel_hm.integrations.lightning needs lightning ({e}): "
                              "pip install 'sentinel-hm[lightning]'") from e

from sentinel_hm.errors import SentinelError
from sentinel_hm.integrations._session import StepSession, unwrap_optimizer
from sentinel_hm.runtime import Sentinel


class SentinelCallback(pl.Callback):
    """Train under `sentinel_hm.Sentinel` with ``fast_memory`` of fast memory (bytes, "4GiB",
    "20%" of the profiled all-fast peak, or "min"); ``tiers``, ``policy`` and ``trials`` are
    `Sentinel`'s. ``callback.sentinel`` is the Sentinel of the current (or last) fit:
    ``callback.sentinel.stats()``, ``callback.sentinel.audit()``.

    ``free_gradients``: set the gradients to None when the step closes, right after the
    update. Lightning zeroes them in the next window, after its first forward, so they would
    live on through that forward, at its peak; training is the same either way, but hooks
    that run after this callback's ``on_train_batch_end`` see no gradients."""

    def __init__(self, fast_memory: str | int = "20%", tiers: str = "auto",
                 policy: str = "sentinel", trials: int = 3, free_gradients: bool = True) -> None:
        self._session = StepSession(fast_memory, tiers, policy, trials)
        self.free_gradients = free_gradients
        self._optimizer: Any = None
        self._stepped = False  # the optimizer stepped in the open Sentinel step
        self._hook: Any = None

    @property
    def sentinel(self) -> Sentinel | None:
        return self._session.sentinel

    def close(self) -> None:
        """Bring everything back to fast memory and stop the Sentinel (``on_train_end`` and
        ``on_exception`` do this themselves)."""
        self._session.close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise SentinelError(f"SentinelCallback manages one optimizer; this module's "
                                f"configure_optimizers gives {len(optimizers)}: use one "
                                "optimizer, or drop the callback")
        optimizer = unwrap_optimizer(optimizers[0])
        self._session.start(pl_module, optimizer)
        self._optimizer = optimizer
        self._stepped = False
        self._hook = optimizer.register_step_post_hook(self._saw_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not self._session.in_step:
            self._stepped = False
            self._session.begin()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            if self.free_gradients and self._session.in_step:
                self._optimizer.zero_grad(set_to_none=True)
            self._session.end()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session.end()  # a window the epoch cut short (a module's on_train_batch_start -1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._session.abort(exception)
        self.close()

    def _saw_step(self, *_: Any) -> None:
        self._stepped = True

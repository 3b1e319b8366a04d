"""Sentinel in a Hugging Face ``transformers.Trainer``, as one callback::

    from sentinel_hm.integrations.hf import SentinelCallback
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[SentinelCallback(fast_memory="20%")])
    trainer.train()

Where the Trainer calls its callbacks (``Trainer._run_epoch``, transformers 4.4x to 5.x)::

    on_step_begin                      first micro-batch of an optimizer step only
    training_step (forward, backward)  once per micro-batch (gradient_accumulation_steps)
    on_substep_end                     after each micro-batch but the last
    clip gradients, on_pre_optimizer_step, optimizer.step(), on_optimizer_step,
    lr_scheduler.step(), model.zero_grad()
    on_step_end                        then logging, evaluation, checkpoints

so a Sentinel step opens in ``on_step_begin`` and closes in ``on_step_end``: all the
micro-batches, the clipping, the update and the reset of the gradients run inside it;
logging, evaluation and saving run between steps. The Sentinel is built in
``on_train_begin`` from the model and optimizer the Trainer hands its callbacks (the
optimizer unwrapped from accelerate's ``AcceleratedOptimizer``; built at the first step
instead if the Trainer creates its optimizer late) and closed in ``on_train_end``.

Known limitations (docs/integrations.md has the list):
- Steps must repeat: a last step with fewer micro-batches (an epoch not divisible by
  ``gradient_accumulation_steps``), a smaller last batch (``dataloader_drop_last=False``)
  or padding to each batch's longest sequence make steps that do not match the profile; each
  such step runs without migrations and the next is profiled again (with a warning).
- The Trainer has no hook for an exception: if ``trainer.train()`` raises, call
  `SentinelCallback.close` (NOTE [Open steps]).
- One process, one device: DeepSpeed, FSDP, DDP and ``torch_compile=True`` are not covered.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as e:  # the extra is optional
    raise ModuleNotFoundError(f"sentinel_hm.integrations.hf needs transformers ({e}): "
                              "pip install 'sentinel-hm[hf]'") from e

from sentinel_hm.integrations._session import StepSession
from sentinel_hm.runtime import Sentinel


class SentinelCallback(TrainerCallback):
    """Train under `sentinel_hm.Sentinel` with ``fast_memory`` of fast memory (bytes, "4GiB",
    "20%" of the profiled all-fast peak, or "min"); ``tiers``, ``policy`` and ``trials`` are
    `Sentinel`'s. ``callback.sentinel`` is the Sentinel of the current (or last) run:
    ``callback.sentinel.stats()``, ``callback.sentinel.audit()``."""

    def __init__(self, fast_memory: str | int = "20%", tiers: str = "auto",
                 policy: str = "sentinel", trials: int = 3) -> None:
        self._session = StepSession(fast_memory, tiers, policy, trials)

    @property
    def sentinel(self) -> Sentinel | None:
        return self._session.sentinel

    def close(self) -> None:
        """Bring everything back to fast memory and stop the Sentinel; needed only if
        ``trainer.train()`` raised (``on_train_end`` closes it otherwise)."""
        self._session.close()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self._session.close()  # a run that raised before (e.g. auto_find_batch_size's retry)
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is not None and optimizer is not None:
            self._session.start(model, optimizer)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState,
                      control: TrainerControl, **kwargs: Any) -> None:
        if not self._session.live:
            model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
            if model is None or optimizer is None:
                return  # nothing to manage yet; the step runs plain
            self._session.start(model, optimizer)
        self._session.begin()

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, **kwargs: Any) -> None:
        self._session.end()

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self._session.close()

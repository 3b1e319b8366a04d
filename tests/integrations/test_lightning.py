"""`sentinel_hm.integrations.lightning.SentinelCallback` in a real Lightning ``Trainer``
(automatic optimization, gradient clipping, dropout): trained once plain and once with the
callback at a binding budget, the module ends with the same parameters and AdamW state bit
for bit, reaches the steady phase, moves bytes and keeps its audited steady step within the
budget; with ``accumulate_grad_batches=2`` and validation between epochs too. An exception
inside a step leaves nothing behind."""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import sentinel_hm as sh

from .common import Run, check_twin, sentinel_warnings, state_of

pl = pytest.importorskip("lightning.pytorch")
from sentinel_hm.integrations.lightning import SentinelCallback  # noqa: E402

WIDTH, DEPTH, CLASSES, BATCH, BATCHES, STEPS = 128, 4, 10, 128, 8, 12


class Classifier(pl.LightningModule):
    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(
            *[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Dropout(0.1))
              for _ in range(DEPTH)],
            nn.Linear(WIDTH, CLASSES))
        self.fail_at = fail_at
        self.val_losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.trainer.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.val_losses.append(nn.functional.cross_entropy(self.net(x), y).item())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.01)


class AuditStep(pl.Callback):
    """Listed before the Sentinel's callback: the step about to open is audited."""

    def __init__(self, callback: SentinelCallback, step: int) -> None:
        self.callback, self.step = callback, step

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
        if trainer.global_step == self.step and self.callback.sentinel is not None:
            self.callback.sentinel.audit()


def loader(n: int, seed: int, shuffle: bool) -> torch.utils.data.DataLoader[Any]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, WIDTH, generator=gen),
                                          torch.randint(0, CLASSES, (n,), generator=gen))
    return torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=shuffle, drop_last=True)


def fit(out: Path, module: Classifier, callbacks: list[Any], accumulate: int,
        validate: bool) -> Any:
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, accumulate_grad_batches=accumulate,
        gradient_clip_val=1.0, limit_val_batches=2 if validate else 0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        default_root_dir=str(out), callbacks=callbacks)
    # BATCHES batches an epoch: every step has the same micro-batches; validation at the end
    # of each epoch
    trainer.fit(module, loader(BATCH * BATCHES, 1, True),
                loader(2 * BATCH, 2, False) if validate else None)
    return trainer


def train(out: Path, budget: str | None, accumulate: int = 1, validate: bool = False,
          free_gradients: bool = True) -> Run:
    torch.manual_seed(0)  # the module's initial weights, the loader's shuffles, dropout
    module = Classifier()
    callback = (SentinelCallback(fast_memory=budget, tiers="host",
                                 free_gradients=free_gradients) if budget else None)
    callbacks = [AuditStep(callback, STEPS - 1), callback] if callback else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer = fit(out, module, callbacks, accumulate, validate)
        except sh.SentinelError as e:  # refused at the profile or the trial step
            assert callback is not None and callback.sentinel is not None
            return Run([], callback.sentinel.stats(), refused=str(e))  # on_exception closed it
    optimizer = trainer.optimizers[0]
    run = Run(state_of(module, optimizer), evals=module.val_losses,
              warned=sentinel_warnings(caught))
    if callback is not None:
        assert callback.sentinel is not None and callback.sentinel.optimizer is optimizer
        run.sentinel, run.stats = callback.sentinel, callback.sentinel.stats()
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Every configuration trains once; the plain twin and "min" are shared. Lightning's
    ``deterministic=True`` switches torch's deterministic algorithms on for the process: put
    them back afterwards."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield functools.cache(functools.partial(train, tmp_path_factory.mktemp("lightning")))
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_trainer_is_bitwise_equal_within_budget(run, budget):
    ours = run(budget)
    check_twin(run(None), ours, budget, lambda: run("min"))
    assert not ours.warned  # Lightning's closure runs first: AdamW streams


@pytest.mark.slow
def test_gradient_accumulation_and_validation_between_epochs(run):
    plain, ours = run(None, 2, validate=True), run("50%", 2, validate=True)
    check_twin(plain, ours, "50%", lambda: run("min", 2, validate=True), accumulate=2)
    assert len(plain.evals) == 2 * (STEPS * 2 // BATCHES)  # 2 batches after each epoch
    assert plain.evals == ours.evals
    assert not ours.warned


@pytest.mark.slow
def test_gradients_kept_until_the_next_backward(run):
    """``free_gradients=False`` keeps Lightning's own timing: gradients live on through the
    next step's forward (zero_grad comes after it), so the all-fast peak is higher."""
    ours = run("min", free_gradients=False)
    check_twin(run(None), ours, "min", lambda: ours)
    assert ours.stats["all_fast_peak_bytes"] > run("min").stats["all_fast_peak_bytes"]


def test_exception_inside_a_step_leaves_nothing_behind(run, tmp_path):
    """``on_exception`` leaves the open step (its saved-tensor hooks popped, every tensor back
    in fast memory) and closes the Sentinel; training can go on plain."""
    torch.manual_seed(0)
    module = Classifier(fail_at=9)  # a steady step (2 warm-up, profile, 3 trials, trial)
    callback = SentinelCallback(fast_memory="50%", tiers="host")
    with pytest.raises(RuntimeError, match="boom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's own (no val_dataloader, deprecations)
        fit(tmp_path, module, [callback], 1, False)
    assert callback.sentinel is not None and callback.sentinel.stats()["phase"] == "steady"
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    optimizer = callback.sentinel.optimizer
    before = [p.detach().clone() for p in module.parameters()]
    x, y = next(iter(loader(BATCH, 3, False)))
    nn.functional.cross_entropy(module.net(x), y).backward()
    optimizer.step()
    after = list(module.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))

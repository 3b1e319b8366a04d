"""`sentinel_hm.integrations.hf.SentinelCallback` in a real ``transformers.Trainer``: a small
GPT-2 built from a config (no downloads, dropout on), trained once plain and once with the
callback at a binding budget, ends with the same parameters and AdamW state bit for bit,
reaches the steady phase, moves bytes and keeps its audited steady step within the budget;
with gradient accumulation, evaluation between steps and the Trainer's fused default
optimizer (streamed, one fused call per chunk) too. Twins start from the same seed, so
dropout draws the same masks."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import sentinel_hm as sh

from .common import Run, check_twin, sentinel_warnings, state_of

tf = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from sentinel_hm.integrations.hf import SentinelCallback  # noqa: E402

VOCAB, SEQ, BATCH, STEPS = 128, 32, 4, 12
# warm-up (2), profile, 3 interval trials, the audited trial step, then steady steps; the
# last is audited again


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}  # the model shifts labels


class AuditStep(tf.TrainerCallback):
    """Listed before the Sentinel's callback: the step about to open is audited."""

    def __init__(self, callback: SentinelCallback, step: int) -> None:
        self.callback, self.step = callback, step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and self.callback.sentinel is not None:
            self.callback.sentinel.audit()


class FailAt(tf.TrainerCallback):
    """Raises inside a step (after the update, before ``on_step_end``)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError("boom")


def make_trainer(out: Path, accumulate: int, optim: str, evaluate: bool,
                 callbacks: list[Any]) -> Any:
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=4,
                           resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = tf.GPT2LMHeadModel(config)  # lm_head tied to the token embedding
    args = tf.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accumulate, learning_rate=1e-3, optim=optim,
        max_grad_norm=1.0,  # clipping reads and scales every gradient inside the step
        eval_strategy="steps" if evaluate else "no", eval_steps=4, per_device_eval_batch_size=BATCH,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_drop_last=True)
    # 4 optimizer steps an epoch: every step has the same micro-batches
    return tf.Trainer(model=model, args=args, train_dataset=Tokens(4 * BATCH * accumulate, 1),
                      eval_dataset=Tokens(2 * BATCH, 2) if evaluate else None,
                      callbacks=callbacks)


def train(out: Path, budget: str | None, accumulate: int = 1, optim: str = "adamw_torch",
          evaluate: bool = False) -> Run:
    callback = SentinelCallback(fast_memory=budget, tiers="host") if budget else None
    callbacks = [AuditStep(callback, STEPS - 1), callback] if callback else []
    trainer = make_trainer(out, accumulate, optim, evaluate, callbacks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.train()
        except sh.SentinelError as e:  # refused at the profile or the trial step
            assert callback is not None and callback.sentinel is not None
            callback.close()
            return Run([], callback.sentinel.stats(), refused=str(e))
    evals = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    optimizer = trainer.optimizer.optimizer  # inside accelerate's AcceleratedOptimizer
    run = Run(state_of(trainer.model, optimizer), evals=evals, warned=sentinel_warnings(caught))
    if callback is not None:
        assert callback.sentinel is not None and callback.sentinel.optimizer is optimizer
        run.sentinel, run.stats = callback.sentinel, callback.sentinel.stats()
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Every configuration trains once; the plain twin and "min" are shared."""
    out = tmp_path_factory.mktemp("hf")
    yield functools.cache(functools.partial(train, out))


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_trainer_is_bitwise_equal_within_budget(run, budget):
    ours = run(budget)
    check_twin(run(None), ours, budget, lambda: run("min"))
    assert not ours.warned  # AdamW streams (accelerate's closure=None is no closure)


@pytest.mark.slow
def test_gradient_accumulation_and_evaluation_between_steps(run):
    """Two micro-batches a step; evaluation every 4 steps reads the parameters where the
    plan left them between steps (host tiers)."""
    plain, ours = run(None, 2, evaluate=True), run("50%", 2, evaluate=True)
    check_twin(plain, ours, "50%", lambda: run("min", 2, evaluate=True), accumulate=2)
    assert len(plain.evals) == STEPS // 4
    assert plain.evals == ours.evals
    assert not ours.warned


@pytest.mark.slow
def test_fused_default_optimizer_streams_fused(run):
    """transformers 5's default optimizer is AdamW(fused=True): it streams chunk by chunk,
    one fused kernel per chunk (NOTE [Chunked optimizer step]), bit for bit, without a
    warning."""
    ours = run("min", optim="adamw_torch_fused")
    check_twin(run(None, optim="adamw_torch_fused"), ours, "min", lambda: ours)
    assert not ours.warned


def test_close_after_an_exception_inside_a_step(tmp_path):
    """The Trainer has no hook for an exception: ``close()`` leaves the open step (its
    saved-tensor hooks popped, every tensor back in fast memory) and training goes on plain."""
    callback = SentinelCallback(fast_memory="50%", tiers="host")
    trainer = make_trainer(tmp_path, 1, "adamw_torch", False, [callback, FailAt(9)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert callback.sentinel is not None and callback.sentinel.stats()["phase"] == "steady"
    callback.close()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    model, optimizer = trainer.model, trainer.optimizer
    before = [p.detach().clone() for p in model.parameters()]
    ids = Tokens(BATCH, 3).ids
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))

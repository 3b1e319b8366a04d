"""NOTE [Failures]: a failure inside Sentinel's machinery (a copy, a recomputed layer's
rerun) restores everything and raises a `SentinelError` that says training can go on; the
loop then runs plain, bit for bit as without Sentinel. The program's own error passes through
unchanged and Sentinel stays usable."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import sentinel_hm as sh
from sentinel_hm.core.plan import Tier
from sentinel_hm.runtime import manager
from sentinel_hm.tiers.host import HostTiers

from .test_sentinel import CONFIGS, assert_same

STEPS = 10


class FaultyTiers(HostTiers):
    """Host tiers whose copies toward ``fail_to`` raise once ``armed``."""

    def __init__(self, fail_to: Tier) -> None:
        super().__init__()
        self.fail_to = fail_to
        self.armed = False
        self.failed = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        to_slow = self.is_slow(dst.untyped_storage())
        if self.armed and to_slow == (self.fail_to is Tier.SLOW):
            self.armed = False
            self.failed += 1
            raise RuntimeError("injected copy failure")
        super().copy(dst, src)


def _train(name: str, budget: str | None, on_steady=None, on_error=None) -> tuple[list[torch.Tensor], list[torch.Tensor], sh.Sentinel | None,
                                    list[BaseException]]:
    """Train ``STEPS`` steps; a step that raises SentinelError is run again from the same
    batch and RNG state with zeroed gradients, as the error tells the user to."""
    torch.manual_seed(0)
    wl = CONFIGS[name](0)
    sentinel = (sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, trials=0)
                if budget else None)
    losses: list[torch.Tensor] = []
    errors: list[BaseException] = []
    for _ in range(STEPS):
        if sentinel is not None and sentinel.stats()["phase"] == "steady" and on_steady:
            on_steady(sentinel)
            on_steady = None
        batch, rng = wl.make_batch(), torch.get_rng_state()
        for _attempt in range(2):
            torch.set_rng_state(rng)
            try:
                with sentinel.step() if sentinel is not None else contextlib.nullcontext():
                    loss = wl.model(*batch)
                    loss.backward()
                    wl.optimizer.step()
                    wl.optimizer.zero_grad()
                losses.append(loss.detach())
                break
            except sh.SentinelError as e:
                errors.append(e)
                wl.optimizer.zero_grad()
                if on_error is not None:
                    on_error(e)
    state = [t.detach().clone() for t in (*wl.model.parameters(), *wl.model.buffers())]
    return losses, state, sentinel, errors


def _nothing_left(sentinel: sh.Sentinel) -> None:
    """Phase off, no layer wrapped, no hook of Sentinel's left, the arena released."""
    assert sentinel.stats()["phase"] == "off"
    assert sentinel.tiers.arena() is None
    model, opt = sentinel.model, sentinel.optimizer
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    assert all(not sentinel.tiers.is_slow(t.untyped_storage())
               for t in (*model.parameters(), *(v for s in opt.state.values()
                                                 for v in s.values()
                                                 if isinstance(v, torch.Tensor))))


@pytest.mark.parametrize("fail_to", [Tier.SLOW, Tier.FAST])
def test_a_copy_that_fails_restores_everything_and_training_goes_on_plain(monkeypatch, fail_to):
    faulty = FaultyTiers(fail_to)
    monkeypatch.setattr(manager, "open_tiers", lambda spec, device=None: faulty)
    plain_losses, plain_state, _, _ = _train("gpt", None)

    def arm(_sentinel: sh.Sentinel) -> None:
        faulty.armed = True

    losses, state, sentinel, errors = _train("gpt", "50%", on_steady=arm)
    assert sentinel is not None and faulty.failed == 1
    assert len(errors) == 1, errors
    message = str(errors[0])
    assert "failed in its own machinery during a steady step" in message
    assert "injected copy failure" in message and "Training can go on" in message
    assert isinstance(errors[0].__cause__, RuntimeError)
    _nothing_left(sentinel)
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    sentinel.close()  # still fine after a failure


class _FailsOnRerun(nn.Module):
    """A layer whose second call in a step (the checkpoint's rerun) raises."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.armed = False

    def forward(self, *args):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.armed and self.calls % 2 == 0:
            raise RuntimeError("injected rerun failure")
        return self.inner(*args)


def test_a_rerun_that_fails_restores_everything_and_training_goes_on_plain(monkeypatch):
    """Every layer of the MLP recomputed (the planner's choice forced); a rerun raises once
    the steady phase is reached."""
    layers: list[_FailsOnRerun] = []
    real = CONFIGS["mlp"]

    def wrapped(seed: int):  # type: ignore[no-untyped-def]
        wl = real(seed)
        for block in list(wl.model.modules()):
            if isinstance(getattr(block, "linear", None), nn.Linear):
                block.linear = _FailsOnRerun(block.linear)
                layers.append(block.linear)
        return wl

    monkeypatch.setitem(CONFIGS, "mlp", wrapped)

    def recompute_all(self, trace):  # type: ignore[no-untyped-def]
        if self._checkpointed:
            return False
        modules = dict(self.model.named_modules())
        for module_name, module in modules.items():
            if isinstance(module, _FailsOnRerun):
                self._checkpointed.wrap(module_name, module)
        self._stats.recomputed_layers = self._checkpointed.names
        return bool(self._checkpointed)

    monkeypatch.setattr(sh.Sentinel, "_recompute_layers", recompute_all)
    plain_losses, plain_state, _, _ = _train("mlp", None)
    layers.clear()

    def arm(sentinel: sh.Sentinel) -> None:
        assert sentinel.stats()["recomputed_layers"]
        for layer in layers:
            layer.calls, layer.armed = 0, True

    def disarm(_error: BaseException) -> None:  # the batch runs again, plain
        for layer in layers:
            layer.armed = False

    losses, state, sentinel, errors = _train("mlp", "min", on_steady=arm, on_error=disarm)
    assert layers, "the MLP has no block with a Linear to wrap"
    for layer in layers:
        layer.armed = False
    assert sentinel is not None and len(errors) == 1, errors
    assert "injected rerun failure" in str(errors[0])
    assert "did not complete" in str(errors[0])
    _nothing_left(sentinel)
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)


class _UserError(Exception):
    pass


@pytest.mark.parametrize("at_phase", ["profile", "trial", "steady"])
def test_the_programs_own_error_passes_through_and_sentinel_stays_usable(at_phase):
    """An exception in the user's forward (at any phase) reaches the user unchanged; the loop
    catches it, and training goes on under Sentinel, reaching steady, bit for bit."""
    torch.manual_seed(0)
    plain_losses, plain_state, _, _ = _train("gpt", None)
    torch.manual_seed(0)
    wl = CONFIGS["gpt"](0)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="50%", trials=0)
    losses, raised = [], False
    for _ in range(STEPS + 4):
        batch, rng = wl.make_batch(), torch.get_rng_state()
        if not raised and sentinel.stats()["phase"] == at_phase:
            raised = True
            with pytest.raises(_UserError), sentinel.step():
                wl.model(*batch)
                raise _UserError("the user's own bug")
            wl.optimizer.zero_grad()
        torch.set_rng_state(rng)
        with sentinel.step():
            loss = wl.model(*batch)
            loss.backward()
            wl.optimizer.step()
            wl.optimizer.zero_grad()
        losses.append(loss.detach())
        if len(losses) == STEPS:
            break
    assert raised
    state = [t.detach().clone() for t in (*wl.model.parameters(), *wl.model.buffers())]
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    assert sentinel.stats()["phase"] in ("trial", "steady", "profile")
    sentinel.close()

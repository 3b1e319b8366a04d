"""NOTE [Checkpoints]: state dicts taken between steps under Sentinel are the plain ones (same
bytes, same size on disk), and training resumed from them is bit for bit uninterrupted."""

from __future__ import annotations

import io

import torch

import sentinel_hm as sh

from .test_everything_moves import OPTIMIZERS, _tied
from .test_sentinel import assert_same

STEPS, SAVE_AT = 14, 7  # saved after a few steady steps; resumed runs reach steady steps too


def _saved(obj: object) -> bytes:
    """``obj`` through torch.save, as a checkpoint is written (state dicts hold references:
    they must be written before training goes on)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), weights_only=False)


def _run(budget: str | None, steps: int = STEPS, resume: dict | None = None):
    wl = _tied(0, OPTIMIZERS["adamw-for-loop"])
    gen = torch.Generator().manual_seed(1)
    if resume is not None:
        wl.model.load_state_dict(resume["model"])
        wl.optimizer.load_state_dict(resume["optimizer"])
        gen.set_state(resume["data"])
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, trials=0) if budget else None
    saved, losses = None, []
    for i in range(steps):
        idx = torch.randint(0, 64, (16, 32), generator=gen)
        with sentinel.step() if sentinel else torch.enable_grad():
            loss = wl.model(idx, torch.roll(idx, -1, 1))
            loss.backward()
            wl.optimizer.step()
            wl.optimizer.zero_grad()
        losses.append(loss.detach())
        if i == SAVE_AT - 1 and resume is None:
            if sentinel is not None:  # the state really is in the slow tier right now
                assert sentinel.stats()["phase"] == "steady"
                assert any(sentinel.tiers.is_slow(s.untyped_storage())
                           for st in wl.optimizer.state.values() for s in st.values())
            saved = {"model": _saved(wl.model.state_dict()),
                     "optimizer": _saved(wl.optimizer.state_dict()),
                     "data": gen.get_state()}
    params = [p.detach().clone() for p in wl.model.parameters()]
    if sentinel is not None:
        sentinel.close()
    return losses, params, saved


def test_state_dicts_between_steps_are_the_plain_ones():
    plain_losses, plain_params, plain_saved = _run(None)
    losses, params, saved = _run("min")
    assert_same(plain_losses, losses)
    assert_same(plain_params, params)
    for part in ("model", "optimizer"):
        assert len(saved[part]) == len(plain_saved[part])  # no arena written with them
    assert_same(list(_load(plain_saved["model"]).values()), list(_load(saved["model"]).values()))
    ours = [v for s in _load(saved["optimizer"])["state"].values() for v in s.values()]
    plain = [v for s in _load(plain_saved["optimizer"])["state"].values() for v in s.values()]
    assert_same(plain, ours)


def test_training_resumed_from_a_checkpoint_is_uninterrupted():
    plain_losses, plain_params, _ = _run(None)
    _, _, saved = _run("min")
    for budget in (None, "min"):  # resumed plain, and under a new Sentinel
        # loaded afresh for each: the optimizer adopts the loaded state tensors and trains them
        checkpoint = {"model": _load(saved["model"]), "optimizer": _load(saved["optimizer"]),
                      "data": saved["data"]}
        losses, params, _ = _run(budget, STEPS - SAVE_AT, resume=checkpoint)
        assert_same(plain_losses[SAVE_AT:], losses)
        assert_same(plain_params, params)


def test_a_state_dict_leaves_the_optimizers_own_state_alone():
    """``optimizer.state_dict()`` hands out the optimizer's own per-parameter state dicts: the
    compact copies go in new dicts, the optimizer keeps its tensors (the slow ones included).
    Replaced by host copies, the state stopped being managed, and on an H200 the next update
    mixed a host tensor with GPU ones ("Expected all tensors to be on the same device")."""
    wl = _tied(0, OPTIMIZERS["adamw-for-loop"])
    gen = torch.Generator().manual_seed(1)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="min", trials=0)
    moved = []
    for i in range(STEPS):
        idx = torch.randint(0, 64, (16, 32), generator=gen)
        with sentinel.step():
            wl.model(idx, torch.roll(idx, -1, 1)).backward()
            wl.optimizer.step()
            wl.optimizer.zero_grad()
        own = {(id(p), k): v for p, st in wl.optimizer.state.items() for k, v in st.items()}
        state = wl.optimizer.state_dict()["state"]
        assert not any(sentinel.tiers.is_slow(v.untyped_storage()) for s in state.values()
                       for v in s.values())  # the checkpoint owns its bytes
        after = {(id(p), k): v for p, st in wl.optimizer.state.items() for k, v in st.items()}
        assert all(after[key] is t for key, t in own.items()), f"step {i}: state replaced"
        if i >= SAVE_AT:
            moved.append(sentinel.stats()["bytes_to_fast_per_step"])
    assert sentinel.stats()["phase"] == "steady" and all(moved)
    sentinel.close()

"""Every argument of `Sentinel` (and of the framework callbacks) is checked where it is
given: a bad one once failed only inside the third step, after two full warm-up steps."""

from __future__ import annotations

import pytest
import torch

import sentinel_hm as sh


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 4)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize(("fast_memory", "says"), [
    ("abc", r"fast_memory='abc': .*neither a percentage nor a size"),
    ("150%", r"fast_memory='150%': .*not a percentage in \(0, 100\]"),
    ("0%", r"fast_memory='0%': .*not a percentage in \(0, 100\]"),
    (-5, r"fast_memory=-5: .*not positive"),
    ("-5%", r"fast_memory='-5%': .*negative"),
    (None, r"fast_memory=None: .*neither a byte count nor text"),
    (2.5, r"fast_memory=2.5: .*neither a byte count nor text"),
])
def test_a_bad_fast_memory_is_refused_at_construction(fast_memory, says):
    model, opt = _model_and_optimizer()
    with pytest.raises(sh.SentinelError, match=says) as error:
        sh.Sentinel(model, opt, fast_memory=fast_memory)
    assert "'min'" in str(error.value)  # the message names every form allowed


@pytest.mark.parametrize("fast_memory", ["20%", "100%", "4GiB", 1 << 20, "min", " 50% "])
def test_good_fast_memory_values_are_accepted(fast_memory):
    model, opt = _model_and_optimizer()
    sh.Sentinel(model, opt, fast_memory=fast_memory).close()


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"tiers": "gpu"}, r"tiers='gpu' is not known: use one of .*host"),
    ({"tiers": None}, r"tiers=None is not known"),
    ({"trials": 1.5}, r"trials=1.5 is not a whole number"),
    ({"trials": True}, r"trials=True is not a whole number"),
    ({"trials": -1}, r"trials=-1 is negative"),
    ({"recompute": "yes"}, r"recompute='yes' is not a bool"),
    ({"policy": None}, r"unknown policy None"),
])
def test_other_bad_options_are_refused_at_construction(kwargs, says):
    model, opt = _model_and_optimizer()
    with pytest.raises(sh.SentinelError, match=says):
        sh.Sentinel(model, opt, **kwargs)


def test_a_model_or_optimizer_of_the_wrong_type_is_refused_with_what_to_give():
    model, opt = _model_and_optimizer()
    with pytest.raises(sh.SentinelError, match=r"model is a dict, not a torch.nn.Module"):
        sh.Sentinel({"w": torch.zeros(1)}, opt)  # type: ignore[arg-type]
    with pytest.raises(sh.SentinelError, match=r"optimizer is a list, not a torch.optim"):
        sh.Sentinel(model, [opt])  # type: ignore[arg-type]


def test_the_hf_callback_checks_its_options_when_built():
    hf = pytest.importorskip("sentinel_hm.integrations.hf")
    with pytest.raises(sh.SentinelError, match=r"fast_memory='150%'"):
        hf.SentinelCallback(fast_memory="150%")
    with pytest.raises(sh.SentinelError, match=r"trials=-2 is negative"):
        hf.SentinelCallback(trials=-2)


def test_the_lightning_callback_checks_its_options_when_built():
    lightning = pytest.importorskip("sentinel_hm.integrations.lightning")
    with pytest.raises(sh.SentinelError, match=r"tiers='fast' is not known"):
        lightning.SentinelCallback(tiers="fast")

"""Reference workloads build, train and are reproducible; user factories load or fail cleanly."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sentinel_hm.errors import SentinelError
from sentinel_hm.workloads import SIZES, WORKLOADS, Workload, load_factory, make_workload


def _params(wl: Workload) -> list[torch.Tensor]:
    return [p.detach().clone() for p in wl.model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", WORKLOADS)
def test_step_returns_finite_scalar_loss_and_updates_parameters(name: str) -> None:
    wl = make_workload(name, "tiny")
    assert wl.name == name
    before = _params(wl)
    loss = wl.step()
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert not _same(before, _params(wl))


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_gives_identical_parameters_batches_and_steps(name: str) -> None:
    def run() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        wl = make_workload(name, "tiny", seed=3)
        params = _params(wl)
        batches = [t for _ in range(3) for t in wl.make_batch()]
        losses = [wl.step() for _ in range(2)]
        return params, batches, losses

    params_a, batches_a, losses_a = run()
    params_b, batches_b, losses_b = run()
    assert _same(params_a, params_b)
    assert _same(batches_a, batches_b)
    assert _same(losses_a, losses_b)


@pytest.mark.parametrize("name", WORKLOADS)
def test_different_seeds_differ(name: str) -> None:
    a = make_workload(name, "tiny", seed=0)
    b = make_workload(name, "tiny", seed=1)
    assert not _same(_params(a), _params(b))
    assert not _same(list(a.make_batch()), list(b.make_batch()))


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(SentinelError, match="bert") as info:
        make_workload("bert")
    assert all(name in str(info.value) for name in WORKLOADS)


def test_unknown_size_lists_allowed_sizes() -> None:
    with pytest.raises(SentinelError, match="huge") as info:
        make_workload("gpt", "huge")
    assert all(size in str(info.value) for size in SIZES)


FACTORY_SOURCE = """
import torch
from torch import nn

from sentinel_hm.workloads import Workload


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y):
        return (self.linear(x).squeeze(1) - y).pow(2).mean()


def _parts():
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, lambda: (torch.ones(2, 4), torch.zeros(2))


def as_tuple():
    return _parts()


def as_workload():
    return Workload("mine", *_parts())


def boom():
    raise RuntimeError("kaput\\nsecond line")


def wrong_type():
    return 42


NOT_CALLABLE = 7
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user module on sys.path; its unique name keeps it apart from other tests' imports."""
    name = f"user_factories_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    (tmp_path / f"{name}_broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("func", ["as_tuple", "as_workload"])
def test_load_factory_accepts_tuple_or_workload(factory_module: str, func: str) -> None:
    wl = load_factory(f"{factory_module}:{func}")
    assert isinstance(wl, Workload)
    before = _params(wl)
    assert torch.isfinite(wl.step())
    assert not _same(before, _params(wl))


def test_load_factory_is_seeded(factory_module: str) -> None:
    spec = f"{factory_module}:as_tuple"
    assert _same(_params(load_factory(spec, seed=5)), _params(load_factory(spec, seed=5)))
    assert not _same(_params(load_factory(spec, seed=5)), _params(load_factory(spec, seed=6)))


@pytest.mark.parametrize(
    "spec",
    [
        "{mod}",  # no colon
        "{mod}:",  # no function
        ":as_tuple",  # no module
        "no_such_module_xyz:factory",
        "{mod}_broken:factory",  # the module itself fails to import
        "{mod}:missing",
        "{mod}:NOT_CALLABLE",
        "{mod}:boom",
        "{mod}:wrong_type",
    ],
)
def test_load_factory_failures_raise_one_line_sentinel_error(
    factory_module: str, spec: str
) -> None:
    spec = spec.format(mod=factory_module)
    with pytest.raises(SentinelError) as info:
        load_factory(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "\n" not in message

"""Reference workloads and loading of a user's own workload factory.

Every workload is a `Workload` bundle whose ``model(*batch)`` returns the scalar loss.
Building is deterministic from ``seed``: the same seed gives bitwise-identical parameters
and the same batch sequence, so a profiled step and a replayed step see the same tensors.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from sentinel_hm.errors import SentinelError
from sentinel_hm.workloads import cnn, gpt, lstm, mlp
from sentinel_hm.workloads._base import Workload, as_workload

__all__ = ["SIZES", "WORKLOADS", "Workload", "load_factory", "make_workload"]

_MODULES: dict[str, ModuleType] = {"gpt": gpt, "cnn": cnn, "lstm": lstm, "mlp": mlp}
WORKLOADS: tuple[str, ...] = tuple(_MODULES)
SIZES: tuple[str, ...] = ("tiny", "small", "medium", "large")


def make_workload(name: str, size: str = "small", seed: int = 0) -> Workload:
    """Build reference workload ``name`` at preset ``size``, seeding torch's global RNG first."""
    if name not in _MODULES:
        raise SentinelError(
            f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)} "
            "or pass a 'package.module:function' factory"
        )
    if size not in SIZES:
        raise SentinelError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    torch.manual_seed(seed)
    return _MODULES[name].build(size, seed)


def _one_line(exc: BaseException) -> str:
    """``Type: message`` squeezed onto one line, so the CLI can print it as is."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_factory(spec: str, seed: int = 0) -> Workload:
    """Import ``"package.module:function"``, seed torch's global RNG, call it with no arguments.

    The factory returns a `Workload` or a ``(model, optimizer, make_batch)`` tuple. Seeding
    makes its parameter initialisation reproducible; its batches are its own business.
    """
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise SentinelError(
            f"workload spec {spec!r} is not of the form 'package.module:function'; "
            f"name a factory or one of {', '.join(WORKLOADS)}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise SentinelError(
            f"cannot import module {module_name!r} of workload spec {spec!r} ({_one_line(exc)}); "
            "make it importable, e.g. add its directory to PYTHONPATH"
        ) from exc
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise SentinelError(
            f"module {module_name!r} has no callable {func_name!r} (workload spec {spec!r}); "
            "define a function that takes no arguments and returns the workload"
        )
    torch.manual_seed(seed)
    try:
        made = factory()
    except Exception as exc:
        raise SentinelError(
            f"workload factory {spec!r} raised {_one_line(exc)}; fix the factory so that it "
            "runs with no arguments"
        ) from exc
    return as_workload(spec, made)

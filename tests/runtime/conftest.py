"""Fixtures shared by the runtime's tests."""

from __future__ import annotations

import pytest

import sentinel_hm as sh


@pytest.fixture
def every_layer_recomputed(monkeypatch):
    """The planner's choice of layers depends on measured op times (and at the test sizes it
    often recomputes nothing): this makes it recompute every detected layer, outermost
    modules only, so the runtime's execution of recomputation is what is tested. A layer
    found unsafe to rerun (NOTE [Safe reruns]) is not wrapped again, as with the planner."""

    def recompute_all(self, trace):
        if self._checkpointed or self._recompute_undone:
            return False
        modules = dict(self.model.named_modules())
        names = [layer.name for layer in trace.layers if layer.name in modules]
        for name in names:
            if not any(other.startswith(f"{name}.") for other in names):
                self._checkpointed.wrap(name, modules[name])
        self._stats.recomputed_layers = self._checkpointed.names
        return bool(self._checkpointed)

    monkeypatch.setattr(sh.Sentinel, "_recompute_layers", recompute_all)

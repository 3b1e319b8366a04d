"""The allocation tracer (NOTE [Tracing compiled code]) against the dispatch-mode tracer.

On an eager step both see the same storages, one through aten ops and finalizers, the other
through the allocator's events: the all-fast peak, the model state by kind and the saved
bytes must agree. On a compiled step it still finds what the compiled code saves, by the
hooks' markers, and cuts a compiled graph into ops at its allocations."""

from __future__ import annotations

import torch
from torch import nn

from sentinel_hm.trace import load_trace, save_trace
from sentinel_hm.trace.allocation_tracer import AllocationTracer
from sentinel_hm.trace.model import Kind, Phase
from sentinel_hm.trace.tracer import Tracer


def _model() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.Tanh(),
                          nn.Linear(512, 10))
    return model, torch.optim.AdamW(model.parameters()), torch.randn(256, 128)


def _step(model, opt, x) -> None:
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_it_agrees_with_the_dispatch_mode_tracer_on_an_eager_step(tmp_path):
    model, opt, x = _model()
    _step(model, opt, x)  # the optimizer's state exists
    events: list[tuple[str, int, int]] = []
    tracer = AllocationTracer(model, opt, on_saved=lambda *e: events.append(e))
    tracer.start()
    _step(model, opt, x)
    ours = tracer.stop()
    eager = Tracer(model, opt)
    eager.start()
    _step(model, opt, x)
    theirs = eager.stop()

    assert abs(ours.peak_bytes - theirs.peak_bytes) <= 0.01 * theirs.peak_bytes
    by_kind, their_kinds = ours.bytes_by_kind(), theirs.bytes_by_kind()
    for kind in (Kind.PARAMETER, Kind.GRADIENT, Kind.OPTIMIZER_STATE, Kind.SAVED_ACTIVATION):
        assert by_kind[kind] == their_kinds[kind] > 0, kind
    assert {op.phase for op in ours.ops} == {Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER}
    packed = [sid for what, sid, _ in events if what == "pack"]
    unpacked = [sid for what, sid, _ in events if what == "unpack"]
    assert packed and set(unpacked) <= set(packed)
    assert all(ours.storages[sid].saved for sid in packed)
    clocks = [clock for _, _, clock in events]
    assert clocks == sorted(clocks)  # heard in the order they happened
    save_trace(ours, tmp_path / "trace.json")  # a valid trace: its file loads back
    assert load_trace(tmp_path / "trace.json").peak_bytes == ours.peak_bytes


def test_a_compiled_graph_is_cut_at_its_allocations():
    model, opt, x = _model()
    compiled = torch.compile(model, backend="inductor")
    for _ in range(2):
        _step(compiled, opt, x)
    tracer = AllocationTracer(model, opt)
    tracer.start()
    _step(compiled, opt, x)
    trace = tracer.stop()

    pieces = [op for op in trace.ops if op.name == "compiled_graph"]
    assert len(pieces) > 2 and sum(1 for op in pieces if op.outputs) > 2
    assert [layer.name for layer in trace.layers] == ["compiled region 0"]
    # (the batch is saved too, from before the step)
    saved = [s for s in trace.storages
             if s.kind is Kind.SAVED_ACTIVATION and s.created_at is not None]
    assert len(saved) >= 2
    forward = {op.index for op in trace.ops if op.phase is Phase.FORWARD and op.layer == 0}
    assert all(s.created_at in forward for s in saved)  # made inside the compiled forward
    assert any(op.layer == 0 for op in trace.ops if op.phase is Phase.BACKWARD)

"""Tracer: classification on hand-built models with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sentinel_hm as sh
from sentinel_hm.trace import Kind, Phase, Trace, find_layers
from sentinel_hm.trace.tracer import active_tracer

from .models import Stack, TinyResNet

B, D = 8, 16


def _profiled_stack(
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
) -> tuple[Stack, Trace]:
    model = Stack(D)
    opt = optimizer_cls(model.parameters(), lr=0.01)
    x, y = torch.randn(B, D), torch.randint(0, 4, (B,))

    def step() -> None:
        model(x, y).backward()
        opt.step()
        opt.zero_grad()

    step()  # optimizer state exists before the profiled step
    return model, sh.profile(step, model=model, optimizer=opt)


def _by_name(trace: Trace) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in trace.storages:
        out.setdefault(s.name, []).append(s)
    return out


def test_parameters_gradients_and_optimizer_state_are_found():
    model, trace = _profiled_stack()
    named = _by_name(trace)
    for name, p in model.named_parameters():
        (param,) = named[name]
        assert param.kind is Kind.PARAMETER and param.nbytes == p.numel() * 4
        assert param.created_at is None and param.freed_at is None
        (grad,) = named[f"{name}.grad"]
        assert grad.kind is Kind.GRADIENT and grad.nbytes == param.nbytes
        # born in backward (AccumulateGrad adopts the op's output), freed by zero_grad
        assert trace.ops[grad.created_at].phase is Phase.BACKWARD
        assert grad.freed_at is not None
    n_params = len(list(model.parameters()))
    param_bytes = sum(p.numel() * 4 for p in model.parameters())
    states = [s for s in trace.storages if s.kind is Kind.OPTIMIZER_STATE]
    assert len(states) == 3 * n_params  # Adam: step, exp_avg, exp_avg_sq per parameter
    assert sum(s.nbytes for s in states if not s.name.endswith(".step")) == 2 * param_bytes
    assert {s.name for s in states} >= {"state[0].exp_avg", f"state[{n_params - 1}].exp_avg_sq"}


def test_linear_saves_weight_view_recognised_as_parameter():
    _, trace = _profiled_stack()
    named = _by_name(trace)
    # blocks.0's input does not require grad, so its weight (as weight.t()) is not saved;
    # every later Linear saves weight.t() to compute the gradient of its input.
    assert not named["blocks.0.fc.weight"][0].saved
    for name in ("blocks.1.fc.weight", "blocks.2.fc.weight", "head.weight"):
        (s,) = named[name]
        assert s.saved and s.kind is Kind.PARAMETER


def test_short_lived_and_long_lived():
    _, trace = _profiled_stack()
    fwd = [op for op in trace.ops if op.phase is Phase.FORWARD and op.layer is not None]
    for layer in range(3):  # the three Linear+ReLU blocks
        ops = [op for op in fwd if op.layer == layer]
        addmm = next(op for op in ops if op.name == "aten::addmm")
        relu = next(op for op in ops if op.name == "aten::relu")
        (pre_act,) = addmm.outputs
        (act,) = relu.outputs
        pre, post = trace.storage_by_id[pre_act], trace.storage_by_id[act]
        # the Linear output is only read by the ReLU in the same block: freed there
        assert trace.is_short_lived(pre) and pre.kind is Kind.TEMPORARY
        # the ReLU output is saved (by ReLU and by the next Linear) until backward
        assert post.saved and post.kind is Kind.SAVED_ACTIVATION
        assert not trace.is_short_lived(post)
        assert trace.ops[post.freed_at].phase is Phase.BACKWARD
        assert post.nbytes == B * D * 4


def test_layers_found_and_backward_linked_to_forward():
    _, trace = _profiled_stack()
    assert [layer.name for layer in trace.layers] == ["blocks.0", "blocks.1", "blocks.2", "head"]
    phases_by_layer = {
        i: [op.phase for op in trace.ops if op.layer == i] for i in range(len(trace.layers))
    }
    for phases in phases_by_layer.values():
        assert Phase.FORWARD in phases and Phase.BACKWARD in phases
    # backward visits the layers in reverse order
    order = [op.layer for op in trace.ops if op.phase is Phase.BACKWARD and op.layer is not None]
    firsts = list(dict.fromkeys(order))
    assert firsts == [3, 2, 1, 0]
    # each block's parameter gradients are produced by that block's backward ops
    named = _by_name(trace)
    for i, layer in enumerate(trace.layers):
        for p in ("weight", "bias"):
            fc = "fc." if layer.name.startswith("blocks") else ""
            grad = named[f"{layer.name}.{fc}{p}.grad"][0]
            assert trace.ops[grad.created_at].layer == i


def test_optimizer_phase_and_live_curve():
    _, trace = _profiled_stack(torch.optim.SGD)
    assert any(op.phase is Phase.OPTIMIZER for op in trace.ops)
    curve = trace.live_bytes
    assert len(curve) == len(trace.ops)
    # recompute the curve the slow way: a storage is live from creation through its free
    for i in range(len(trace.ops)):
        expect = sum(
            s.nbytes
            for s in trace.storages
            if (s.created_at is None or s.created_at <= i) and (s.freed_at is None or i <= s.freed_at)
        )
        assert curve[i] == expect
    assert trace.peak_bytes == max(curve) and curve[trace.peak_op] == trace.peak_bytes


def test_resnet_layers_buffers_and_inplace_relu():
    model = TinyResNet()
    assert [n for n, _ in find_layers(model)] == [
        "stem", "stage1.0", "stage1.1", "stage2.0", "stage2.1", "fc",
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])

    def step() -> None:
        model(x, y).backward()
        opt.step()
        opt.zero_grad()

    step()
    trace = sh.profile(step, model=model, optimizer=opt)
    kinds = {s.name: s.kind for s in trace.storages if s.name}
    assert kinds["stage1.0.a.bn.running_mean"] is Kind.BUFFER
    assert kinds["stage1.0.a.bn.num_batches_tracked"] is Kind.BUFFER
    # in-place ReLU writes the BatchNorm output's storage: recorded as a write, no new storage
    relu_ops = [op for op in trace.ops if op.name == "aten::relu_"]
    assert relu_ops and all(op.outputs == op.inputs for op in relu_ops)
    momentum = [s for s in trace.storages if s.kind is Kind.OPTIMIZER_STATE]
    assert len(momentum) == len(list(model.parameters()))


def test_find_layers_nested_wrapper_and_flat_models():
    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = Stack()
            self.extra = torch.nn.Linear(4, 4)

    assert [n for n, _ in find_layers(Wrapper())] == [
        "body.blocks.0", "body.blocks.1", "body.blocks.2", "body.head", "extra",
    ]
    flat = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    assert [n for n, _ in find_layers(flat)] == ["0", "1", "2"]
    assert [n for n, _ in find_layers(torch.nn.Linear(2, 2))] == ["Linear"]


def test_find_layers_stages_of_blocks_give_the_blocks():
    """A sequence of stages, each a sequence of blocks (the reference CNN): the blocks are the
    layers (a whole stage would be too coarse to plan or recompute), as for a torchvision
    ResNet whose stages are top-level children."""
    def block() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Linear(4, 4)
            self.stages = torch.nn.Sequential(*(torch.nn.Sequential(block(), block())
                                                for _ in range(2)))

    assert [n for n, _ in find_layers(Net())] == [
        "stem", "stages.0.0", "stages.0.1", "stages.1.0", "stages.1.1"]


def test_add_layer_marks_without_a_model():
    w = [torch.randn(D, D, requires_grad=True) for _ in range(3)]
    x = torch.randn(B, D)
    sh.start_profile()
    h = x
    for i, wi in enumerate(w):
        if i:
            h = sh.add_layer(h)
        h = torch.tanh(h @ wi)
    h.sum().backward()
    trace = sh.end_profile()
    assert [layer.name for layer in trace.layers] == ["layer0", "layer1", "layer2"]
    fwd = [(op.name, op.layer) for op in trace.ops if op.phase is Phase.FORWARD]
    assert [layer for name, layer in fwd if name == "aten::mm"] == [0, 1, 2]
    # the gradient of w[i] is computed by a backward op of layer i
    mms = [op for op in trace.ops if op.phase is Phase.BACKWARD and op.name == "aten::mm"]
    assert sorted({op.layer for op in mms}) == [0, 1, 2]
    for i, wi in enumerate(w):
        grad_ops = [op for op in mms if op.layer == i]
        assert grad_ops, f"no backward mm in layer {i}"
        assert wi.grad is not None


def test_gradient_accumulation_gives_one_forward_instance_per_micro_batch():
    model = Stack(D)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(B, D), torch.randint(0, 4, (B,))) for _ in range(2)]

    def step() -> None:
        for x, y in batches:
            model(x, y).backward()
        opt.step()
        opt.zero_grad()

    trace = sh.profile(step, model=model, optimizer=opt)
    fwd_segments = [s for s in trace.segments if s.phase is Phase.FORWARD and s.layer == 1]
    bwd_segments = [s for s in trace.segments if s.phase is Phase.BACKWARD and s.layer == 1]
    assert len(fwd_segments) == 2 and len(bwd_segments) == 2
    assert fwd_segments[0].last_op < bwd_segments[0].first_op < fwd_segments[1].first_op


def test_exception_in_step_leaves_nothing_installed():
    model = Stack(D)

    def bad_step() -> None:
        model(torch.randn(B, D), torch.randint(0, 4, (B,))).backward()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        sh.profile(bad_step, model=model)
    assert active_tracer() is None
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    # the model still trains and profiles normally
    model(torch.randn(B, D), torch.randint(0, 4, (B,))).backward()
    assert sh.profile(lambda: model(torch.randn(B, D), torch.randint(0, 4, (B,))), model=model).ops


def test_profile_sessions_do_not_nest():
    sh.start_profile()
    try:
        with pytest.raises(sh.SentinelError, match="already running"):
            sh.start_profile()
    finally:
        sh.end_profile()
    with pytest.raises(sh.SentinelError, match="start_profile"):
        sh.end_profile()
    with pytest.raises(sh.SentinelError, match="layers="):
        sh.profile(lambda: None, model=Stack(), layers="repeated")


def test_in_place_writes_bump_versions_under_the_tracer():
    """Under a dispatch mode foreach in-place ops leave version counters alone (a PyTorch
    fact); the tracer bumps them, so autograd's and the runtime's staleness checks hold."""
    a, b, c = torch.ones(3), torch.ones(3), torch.ones(3)

    def step() -> None:
        with torch.no_grad():
            torch._foreach_mul_([a, b], 2.0)  # what clip_grad_norm_ does to gradients
            c.mul_(2.0)

    sh.profile(step)
    assert (a._version, b._version, c._version) == (1, 1, 1)
    assert torch.equal(a, torch.full((3,), 2.0))


def test_matches_plain_training_bitwise():
    """Profiling observes; it must not change what training computes."""

    def run(profile_second_step: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        model = Stack(D)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(2)

        def step() -> None:
            x, y = torch.randn(B, D, generator=g), torch.randint(0, 4, (B,), generator=g)
            F.dropout(model(x, y), 0.0).backward()
            opt.step()
            opt.zero_grad()

        for i in range(3):
            if i == 1 and profile_second_step:
                sh.profile(step, model=model, optimizer=opt)
            else:
                step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)

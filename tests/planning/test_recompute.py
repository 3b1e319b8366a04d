"""Recomputation as a third choice (NOTE [Recompute as a trace]): the rewritten trace, the
sentinel policy's choice among keep, move and recompute, and the checkpoint-all baseline."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sentinel_hm as sh
from sentinel_hm.core.hardware import Access
from sentinel_hm.planning import load_plan, min_budget, save_plan
from sentinel_hm.planning.planner import context
from sentinel_hm.trace.model import Kind, Phase, Trace
from sentinel_hm.trace.recompute import (
    MATMUL_OPS,
    recomputable_layers,
    with_recomputed_layers,
)

from .tracegen import Builder, MiB, hardware


def blocks(n_layers: int, saved: list[int], out_bytes: int, op_s: list[float]) -> Trace:
    """Layers of two ops: ``h = f(x, w)`` (saved, used only by the layer's backward), then
    ``y = g(h)`` (the next layer's input); backward reads both and the parameter."""
    b = Builder()
    params = [b.storage(64 * 1024, Kind.PARAMETER, pre=True) for _ in range(n_layers)]
    x = b.storage(out_bytes, Kind.INPUT, pre=True)
    keep = []
    for i in range(n_layers):
        h = b.storage(saved[i % len(saved)], Kind.SAVED_ACTIVATION, saved=True)
        b.op(Phase.FORWARD, i, reads=[x, params[i]], creates=[h], duration_s=op_s[i % len(op_s)])
        y = b.storage(out_bytes, Kind.SAVED_ACTIVATION, saved=True)
        b.op(Phase.FORWARD, i, reads=[h], creates=[y], duration_s=op_s[i % len(op_s)] / 4)
        keep.append((x, h))
        x = y
    loss = b.storage(4, Kind.TEMPORARY)
    b.op(Phase.FORWARD, None, reads=[x], creates=[loss], frees=[x], duration_s=1e-5)
    for i in reversed(range(n_layers)):
        xi, h = keep[i]
        b.op(Phase.BACKWARD, i, reads=[h, xi, params[i]], frees=[h, xi] if i else [h],
             duration_s=2 * op_s[i % len(op_s)])
    b.op(Phase.OTHER, None, frees=[loss], duration_s=1e-5)
    return b.build(n_layers)


stepped = st.builds(
    blocks,
    n_layers=st.integers(1, 5),
    saved=st.lists(st.integers(4096, 4 * MiB), min_size=1, max_size=4),
    out_bytes=st.integers(4096, MiB),
    op_s=st.lists(st.floats(1e-5, 2e-3), min_size=1, max_size=4),
)


def _lives(trace: Trace) -> bool:
    """Every op touches only live storages."""
    by_id = trace.storage_by_id
    for op in trace.ops:
        for sid in (*op.inputs, *op.outputs):
            s = by_id[sid]
            if not ((s.created_at is None or s.created_at <= op.index)
                    and (s.freed_at is None or op.index <= s.freed_at)):
                return False
    return True


@settings(max_examples=60, deadline=None)
@given(trace=stepped)
def test_a_recomputed_layer_holds_nothing_of_its_own_between_forward_and_backward(trace):
    layers = recomputable_layers(trace)
    assert set(layers) == set(range(len(trace.layers)))  # each h is its layer's own
    for index, layer in layers.items():
        rewritten = with_recomputed_layers(trace, [index])
        assert _lives(rewritten)
        (one,) = layer.passes  # one forward and one backward instance each
        rerun = one.last_op - one.forward[0] + 1
        assert len(rewritten.ops) == len(trace.ops) + rerun
        assert [op.index for op in rewritten.ops] == list(range(len(rewritten.ops)))
        # between the end of the forward pass and the rerun, the layer's saved bytes are gone
        end_forward = max(op.index for op in trace.ops if op.phase is Phase.FORWARD)
        dropped = sum(trace.storages[sid].nbytes for sid in layer.saved)
        assert rewritten.live_bytes[end_forward] == trace.live_bytes[end_forward] - dropped
        # the rerun costs what the forward ops cost
        extra = sum(op.duration_s for op in rewritten.ops) - sum(op.duration_s
                                                                  for op in trace.ops)
        assert extra == pytest.approx(sum(op.duration_s for op in
                                          trace.ops[one.forward[0]: one.last_op + 1]))
    everything = with_recomputed_layers(trace, layers)
    assert _lives(everything) and everything.meta["recomputed_layers"] == sorted(layers)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=stepped, access=st.sampled_from([Access.DIRECT, Access.MIGRATE]),
       link=st.sampled_from([64 * MiB, 16384 * MiB]), share=st.floats(0.05, 1.0))
def test_recompute_is_never_slower_and_never_raises_the_floor(trace, access, link, share):
    hw = hardware(access, link)
    with_rc, without = context(trace, hw, recompute=True), context(trace, hw)
    assert min_budget(with_rc, "sentinel") <= min_budget(without, "sentinel")
    budget = max(1, int(trace.peak_bytes * share))
    times = {}
    for name, ctx, policy in (("keep or move", without, "sentinel"),
                              ("keep, move or recompute", with_rc, "sentinel"),
                              ("checkpoint-all", without, "checkpoint-all")):
        try:
            plan = sh.plan(trace, hw, budget, policy, ctx=ctx)
        except sh.SentinelError:
            continue
        result = sh.simulate(trace, plan, hw)  # the plan names its recomputed layers
        assert result.overflow_bytes == 0 and result.peak_fast_bytes <= budget, name
        times[name] = result.step_s
    best = times.get("keep, move or recompute")
    if times:
        assert best is not None, times  # what either other choice fits, recompute fits
        assert best <= min(times.values()) * (1 + 1e-9), times


def test_plan_files_keep_the_recomputed_layers(tmp_path):
    trace = blocks(3, [2 * MiB], 64 * 1024, [1e-4])
    plan = sh.plan(trace, hardware(Access.MIGRATE), "60%", "checkpoint-all")
    assert plan.recompute == (0, 1, 2)
    loaded = load_plan(save_plan(plan, tmp_path / "plan.json"))
    assert loaded == plan
    assert sh.simulate(trace, loaded, "host").peak_fast_bytes == sh.simulate(
        trace, plan, "host").peak_fast_bytes
    # a no-recompute context never recomputes
    plain = sh.plan(trace, hardware(Access.MIGRATE), "60%", "sentinel", recompute=False)
    assert plain.recompute == ()


def products(n_layers: int = 3, act: int = MiB) -> Trace:
    """Layers of a product and a cheap op: ``h = mm(x, w)`` and ``g = gelu(h)``, both saved
    for the layer's backward; ``y = add(g)`` is the next layer's input."""
    b = Builder()
    params = [b.storage(64 * 1024, Kind.PARAMETER, pre=True) for _ in range(n_layers)]
    x = b.storage(act, Kind.INPUT, pre=True)
    keep = []
    for i in range(n_layers):
        h = b.storage(act, Kind.SAVED_ACTIVATION, saved=True)
        b.op(Phase.FORWARD, i, reads=[x, params[i]], creates=[h], duration_s=1e-3,
             name="aten::mm")
        g = b.storage(2 * act, Kind.SAVED_ACTIVATION, saved=True)
        b.op(Phase.FORWARD, i, reads=[h], creates=[g], duration_s=1e-4, name="aten::gelu")
        y = b.storage(act, Kind.SAVED_ACTIVATION, saved=True)
        b.op(Phase.FORWARD, i, reads=[g], creates=[y], duration_s=1e-4, name="aten::add")
        keep.append((x, h, g))
        x = y
    loss = b.storage(4, Kind.TEMPORARY)
    b.op(Phase.FORWARD, None, reads=[x], creates=[loss], frees=[x], duration_s=1e-5)
    for i in reversed(range(n_layers)):
        xi, h, g = keep[i]
        b.op(Phase.BACKWARD, i, reads=[g, h, xi, params[i]],
             frees=[g, h, xi] if i else [g, h], duration_s=2e-3)
    b.op(Phase.OTHER, None, frees=[loss], duration_s=1e-5)
    return b.build(n_layers)


def test_selective_recompute_keeps_the_products_and_reruns_the_cheap_ops(tmp_path):
    trace = products()
    keeps = ("aten::mm",)
    end_forward = max(op.index for op in trace.ops if op.phase is Phase.FORWARD)
    selective = with_recomputed_layers(trace, [0, 1, 2], keeps)
    full = with_recomputed_layers(trace, [0, 1, 2])
    assert _lives(selective) and _lives(full)
    assert selective.meta["recompute_keeps"] == ["aten::mm"]
    # only the gelus rerun (one op a layer, 0.1 ms each); the whole forward reruns in full
    assert len(selective.ops) == len(trace.ops) + 3
    rerun = [op.name for op in selective.ops if op.phase is Phase.BACKWARD
             and op.name != "aten::test"]
    assert rerun == ["aten::gelu"] * 3
    extra = sum(op.duration_s for op in selective.ops) - sum(op.duration_s for op in trace.ops)
    assert extra == pytest.approx(3e-4)
    # between the passes, selective drops each layer's 2 MiB gelu output, full its 3 MiB
    assert trace.live_bytes[end_forward] - selective.live_bytes[end_forward] == 3 * 2 * MiB
    assert trace.live_bytes[end_forward] - full.live_bytes[end_forward] == 3 * 3 * MiB
    # the baseline policy, its plan file and its replay
    hw = hardware(Access.MIGRATE)
    plan = sh.plan(trace, hw, trace.peak_bytes, "checkpoint-selective")
    assert plan.recompute == (0, 1, 2) and plan.recompute_keeps == tuple(sorted(MATMUL_OPS))
    loaded = load_plan(save_plan(plan, tmp_path / "plan.json"))
    assert loaded == plan
    peaks = {name: sh.simulate(trace, p, hw).peak_fast_bytes for name, p in (
        ("selective", loaded), ("full", sh.plan(trace, hw, trace.peak_bytes, "checkpoint-all")),
        ("none", sh.plan(trace, hw, trace.peak_bytes, "all-fast")))}
    assert peaks["full"] < peaks["selective"] < peaks["none"], peaks
    assert sh.simulate(trace, loaded, hw).step_s < sh.simulate(
        trace, sh.plan(trace, hw, trace.peak_bytes, "checkpoint-all"), hw).step_s


def test_a_version_2_plan_file_still_loads_as_whole_layer_recompute(tmp_path):
    import json

    trace = blocks(3, [2 * MiB], 64 * 1024, [1e-4])
    plan = sh.plan(trace, hardware(Access.MIGRATE), "60%", "checkpoint-all")
    path = save_plan(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    data["version"] = 2
    del data["recompute_keeps"]
    path.write_text(json.dumps(data))
    assert load_plan(path) == plan


def test_each_micro_batch_of_a_recomputed_layer_reruns():
    """Gradient accumulation: a checkpointed module reruns in every micro-batch, so a layer
    whose passes alternate forward and backward is recomputable in each, and the rewritten
    trace reruns its forward before each of its backward instances."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
                            for _ in range(3)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step() -> None:
        for _ in range(2):
            model(torch.randn(64, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    step()
    trace = sh.profile(step, model=model, optimizer=opt)
    layers = recomputable_layers(trace)
    assert layers and all(len(layer.passes) == 2 for layer in layers.values())
    index, layer = next(iter(layers.items()))
    rewritten = with_recomputed_layers(trace, [index])
    rerun = sum(one.last_op - one.forward[0] + 1 for one in layer.passes)
    assert len(rewritten.ops) == len(trace.ops) + rerun
    assert _lives(rewritten)
    # nothing of the layer's own stays saved from a forward pass to its backward
    first = layer.passes[0]
    dropped = sum(trace.storages[sid].nbytes for sid in first.saved)
    assert rewritten.live_bytes[first.forward[1] + 1] <= trace.live_bytes[first.forward[1] + 1] \
        - dropped


def wide_first_layer(n_layers: int = 4) -> Trace:
    """Layer 0 saves three 4 MiB tensors in a chain, and its backward uses and frees them one
    at a time; the other layers save one 2 MiB tensor each. Recomputing layer 0 rebuilds all
    three at once before its backward: 12 MiB where plain backward needs one at a time."""
    b = Builder()
    params = [b.storage(64 * 1024, Kind.PARAMETER, pre=True) for _ in range(n_layers)]
    x = b.storage(256 * 1024, Kind.INPUT, pre=True)
    keep = []
    for i in range(n_layers):
        saved, prev = [], x
        for _ in range(3 if i == 0 else 1):
            h = b.storage(4 * MiB if i == 0 else 2 * MiB, Kind.SAVED_ACTIVATION, saved=True)
            b.op(Phase.FORWARD, i, reads=[prev, params[i]], creates=[h], duration_s=2e-5)
            saved.append(h)
            prev = h
        y = b.storage(256 * 1024, Kind.SAVED_ACTIVATION, saved=True)
        b.op(Phase.FORWARD, i, reads=[prev], creates=[y], duration_s=1e-4)
        keep.append((x, saved))
        x = y
    loss = b.storage(4, Kind.TEMPORARY)
    b.op(Phase.FORWARD, None, reads=[x], creates=[loss], frees=[x], duration_s=1e-5)
    for i in reversed(range(n_layers)):
        xi, saved = keep[i]
        for j in reversed(range(len(saved))):
            first = j == 0  # the layer's input is read by its last backward op
            b.op(Phase.BACKWARD, i, reads=[saved[j], params[i], *([xi] if first else [])],
                 frees=[saved[j], *([xi] if first and i else [])],
                 duration_s=4e-4 / len(saved))
    b.op(Phase.OTHER, None, frees=[loss], duration_s=1e-5)
    return b.build(n_layers)


def test_a_layer_whose_rebuild_does_not_fit_is_skipped_not_kept_in_every_later_set():
    # layer 0 drops the most bytes per second of rerun, so it is tried first; rebuilt at once
    # it does not fit 45% of the peak, and the layers after it are still recomputed
    trace = wide_first_layer()
    hw = hardware(Access.MIGRATE, 256 * MiB)  # a link too slow to hide the moves
    budget = int(trace.peak_bytes * 0.45)
    times = {}
    for recompute in (False, True):
        plan = sh.plan(trace, hw, budget, "sentinel", ctx=context(trace, hw, recompute=recompute))
        result = sh.simulate(trace, plan, hw)
        assert result.peak_fast_bytes <= budget and not result.overflow_bytes
        times[recompute] = result.step_s
    assert plan.info["search"]["recompute 0"] == "infeasible"
    assert 0 not in plan.recompute and set(plan.recompute) == {1, 2, 3}
    assert times[True] < 0.8 * times[False], times

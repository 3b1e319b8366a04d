"""Baseline policies: the bounds, what an OS does unaided, and offloading as others do it."""

from __future__ import annotations

from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.planning.policies._common import (
    Context,
    Infeasible,
    empty_plan,
    recomputing,
    register,
    slow_homed,
)
from sentinel_hm.trace.model import Kind, Phase
from sentinel_hm.trace.recompute import MATMUL_OPS
from sentinel_hm.units import format_bytes

# Policies that recompute, for comparison in the planner and simulator; the runtime executes
# its own recomputation (policy "sentinel", recompute=True), not these
PLANNER_ONLY = frozenset({"checkpoint-all", "checkpoint-selective"})


@register("all-fast")
def all_fast(ctx: Context, budget: int) -> Plan:
    """Everything in fast memory: the upper bound on speed."""
    peak = ctx.trace.peak_bytes
    if peak > budget:
        raise Infeasible(
            f"all-fast needs the whole peak, {format_bytes(peak)}, in fast memory; the budget is "
            f"{format_bytes(budget)}: raise it to at least {format_bytes(peak)} or pick a policy "
            "that migrates (sentinel)"
        )
    return empty_plan(ctx, "all-fast", budget)


@register("all-slow")
def all_slow(ctx: Context, budget: int) -> Plan:
    """Everything in slow memory: the lower bound on speed.

    Direct access: every storage, short-lived ones included, lives in slow
    memory. Migrate access: ops can only run on fast data, so every long-lived
    storage is fetched for each use and evicted after it; short-lived ones are
    the ops' working memory.
    """
    placement: dict[int, int] = {}
    moves: list[Move] = []
    if ctx.hardware.access is Access.DIRECT:
        placement = {s.id: 0 for s in ctx.trace.storages}
    else:
        for s in ctx.long_lived:
            if not ctx.may_move(s):
                continue
            placement[s.id], extra = slow_homed(ctx, s)
            moves += extra
    return empty_plan(ctx, "all-slow", budget, placement=placement, moves=moves)


@register("first-touch", direct_only=True)
def first_touch(ctx: Context, budget: int) -> Plan:
    """Fast memory until it is full, then slow; nothing ever moves (an OS with no help).

    Whole storages in allocation order: storages that exist before the step
    first (by id), then as the step creates them; a free returns its space.
    """
    trace = ctx.trace
    placement: dict[int, int] = {}
    used = 0
    created: dict[int, list[int]] = {}
    freed: dict[int, list[int]] = {}
    for s in trace.storages:
        if s.created_at is None:
            if used + s.nbytes <= budget:
                used += s.nbytes
            else:
                placement[s.id] = 0
        else:
            created.setdefault(s.created_at, []).append(s.id)
        if s.freed_at is not None:
            freed.setdefault(s.freed_at, []).append(s.id)
    for i in range(len(trace.ops)):
        for sid in created.get(i, ()):
            n = trace.storages[sid].nbytes
            if used + n <= budget:
                used += n
            else:
                placement[sid] = 0
        for sid in freed.get(i, ()):
            if sid not in placement:
                used -= trace.storages[sid].nbytes
    return empty_plan(ctx, "first-touch", budget, placement=placement)


def _offload_saved(ctx: Context, budget: int, name: str, lookahead: bool, min_bytes: int) -> Plan:
    """Evict saved activations after their last forward use; bring them back for backward."""
    trace = ctx.trace
    backward = [seg for seg in trace.segments if seg.phase is Phase.BACKWARD]
    moves: list[Move] = []
    for s in ctx.long_lived:
        if s.kind is not Kind.SAVED_ACTIVATION or s.nbytes < min_bytes:
            continue
        uses = ctx.uses[s.id]
        fwd = [u for u in uses if trace.ops[u].phase is not Phase.BACKWARD]
        bwd = [u for u in uses if trace.ops[u].phase is Phase.BACKWARD]
        if not fwd or not bwd or bwd[0] <= fwd[-1] + 1:
            continue
        evict_at = fwd[-1] + 1
        need = bwd[0]
        fetch_at = need
        if lookahead:  # at the start of the backward layer before the one that needs it
            seg = trace.segments[trace.segment_of_op[need]]
            earlier = [b for b in backward if b.last_op < seg.first_op and b.layer is not None]
            fetch_at = earlier[-1].first_op if earlier else seg.first_op
        fetch_at = max(fetch_at, evict_at + 1)
        moves.append(Move(s.id, Tier.SLOW, evict_at, s.nbytes))
        moves.append(Move(s.id, Tier.FAST, fetch_at, s.nbytes))
    return empty_plan(ctx, name, budget, moves=moves)


@register("vdnn")
def vdnn(ctx: Context, budget: int) -> Plan:
    """vDNN (Rhu et al., MICRO 2016): offload saved activations in forward, prefetch one layer ahead."""
    return _offload_saved(ctx, budget, "vdnn", lookahead=True, min_bytes=0)


@register("offload-all")
def offload_all(ctx: Context, budget: int) -> Plan:
    """Every saved activation of at least 1 KiB offloaded, fetched when used (torchtune's design)."""
    return _offload_saved(ctx, budget, "offload-all", lookahead=False, min_bytes=1024)


@register("checkpoint-all")
def checkpoint_all(ctx: Context, budget: int) -> Plan:
    """Activation checkpointing of every layer it can drop saved bytes from (as
    ``torch.utils.checkpoint`` around each layer would), nothing moved: each such layer's
    forward reruns before its backward (NOTE [Recompute as a trace])."""
    return _checkpoint(ctx, budget, "checkpoint-all", ())


@register("checkpoint-selective")
def checkpoint_selective(ctx: Context, budget: int) -> Plan:
    """Selective activation checkpointing of every layer, nothing moved: the outputs of its
    products and convolutions (``MATMUL_OPS``) are kept, the cheap ops around them rerun
    before the layer's backward (as PyTorch's selective checkpointing with a policy that
    saves matmuls does)."""
    return _checkpoint(ctx, budget, "checkpoint-selective", tuple(sorted(MATMUL_OPS)))


def _checkpoint(ctx: Context, budget: int, name: str, keeps: tuple[str, ...]) -> Plan:
    rctx = recomputing(ctx, tuple(sorted(ctx.recomputable)), keeps)
    peak = rctx.trace.peak_bytes
    if peak > budget:
        raise Infeasible(
            f"{name} keeps {format_bytes(peak)} in fast memory at its peak; the budget "
            f"is {format_bytes(budget)}: raise it or pick a policy that migrates (sentinel)"
        )
    return empty_plan(rctx, name, budget)

"""A step with some layers recomputed, as a trace: what the planner and simulator price.

NOTE [Recompute as a trace]
Recomputing layer L (activation checkpointing of L, the way non-reentrant
``torch.utils.checkpoint`` does it) changes the step in two ways, and both are
written into a new trace, so the policies and the simulator need no rule of
their own:
- L's forward saves nothing of its own: each storage L creates and only L uses
  (its saved activations and temporaries) dies after its last forward use.
- Just before L's backward, L's forward runs again, up to the op that makes the
  last of those saved activations (checkpoint's early stop): the same ops, the
  same times, recorded in the backward phase. Their outputs are new storages:
  the saved ones live until their last use in L's backward (which now reads
  them), the others die after their last use in the recomputation.
Storages L creates that others use (its output, read by the next layer) are
left as they are. A layer qualifies when each of its forward instances is
followed by its backward (one pass, or one per micro-batch with gradient
accumulation: the checkpointed module reruns in each) and each pass saves
something of its own; its inputs are still saved (by the layer before, or by
checkpoint itself), so they need no change.

Selective recomputation (``keeps``: op names, as PyTorch's selective
activation checkpointing saves the outputs of the ops its policy names): the
layer's ops named in ``keeps`` do not rerun and their outputs are kept (saved
ones as before; others the rerun reads live until the rerun). Only the other
ops rerun, and only their saved outputs are dropped. With ``MATMUL_OPS`` the
costly products are kept and the cheap ops around them (activations, norms,
dropout, softmax) are rebuilt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from sentinel_hm.trace.model import Kind, Phase, Trace

# The compute-bound ops whose outputs selective checkpointing keeps: products and
# convolutions (their backward would otherwise pay for them twice)
MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
    "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
    "aten::cudnn_convolution", "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_cudnn_attention", "aten::mkldnn_rnn", "aten::_cudnn_rnn",
})


@dataclass(frozen=True)
class LayerPass:
    """One forward pass of a layer and its backward (one micro-batch's)."""

    forward: tuple[int, int]  # first, last op
    backward: tuple[int, int]
    own: frozenset[int]  # storages created in forward, used only by this pass's instances
    saved: frozenset[int]  # of those, the ones saved for backward
    last_op: int  # the last forward op the recomputation reruns


@dataclass(frozen=True)
class RecomputableLayer:
    """A layer whose every pass (one per micro-batch) can be recomputed: a checkpointed
    module reruns in each."""

    passes: tuple[LayerPass, ...]

    @property
    def saved(self) -> frozenset[int]:
        return frozenset().union(*(p.saved for p in self.passes))

    def rerun_s(self, base_s: Sequence[float]) -> float:
        """Seconds of the forward ops the recomputation reruns, over every pass."""
        return sum(sum(base_s[p.forward[0] : p.last_op + 1]) for p in self.passes)


def recomputable_layers(trace: Trace) -> dict[int, RecomputableLayer]:
    """The layers a recomputation can drop saved bytes from (NOTE [Recompute as a trace]):
    each forward instance followed by its backward (several with gradient accumulation),
    and each pass saving something of its own."""
    instances: dict[int, list[tuple[Phase, int, int]]] = {}
    for seg in trace.segments:
        if seg.layer is not None and seg.phase in (Phase.FORWARD, Phase.BACKWARD):
            instances.setdefault(seg.layer, []).append((seg.phase, seg.first_op, seg.last_op))
    out: dict[int, RecomputableLayer] = {}
    accesses = trace.accesses
    for layer, segs in instances.items():
        phases = [phase for phase, _, _ in segs]
        if not phases or phases != [Phase.FORWARD, Phase.BACKWARD] * (len(phases) // 2):
            continue
        passes = []
        for (_, f0, f1), (_, b0, b1) in zip(segs[::2], segs[1::2], strict=True):
            own = set()
            for s in trace.storages:
                if s.created_at is None or not f0 <= s.created_at <= f1:
                    continue
                reads, writes = accesses[s.id]
                if all(f0 <= op <= f1 or b0 <= op <= b1 for op in (*reads, *writes)) and (
                        s.freed_at is not None and s.freed_at <= b1):
                    own.add(s.id)
            saved = frozenset(sid for sid in own
                              if trace.storages[sid].kind is Kind.SAVED_ACTIVATION
                              and any(b0 <= op <= b1 for op in accesses[sid][0]))
            if not saved:
                break
            last = max(trace.storages[sid].created_at or f0 for sid in saved)
            passes.append(LayerPass((f0, f1), (b0, b1), frozenset(own), saved, last))
        else:
            out[layer] = RecomputableLayer(tuple(passes))
    return out


def with_recomputed_layers(trace: Trace, layers: Iterable[int],
                           keeps: Iterable[str] = ()) -> Trace:
    """``trace`` as it would run with ``layers`` recomputed (NOTE [Recompute as a trace]);
    with ``keeps``, selectively: the outputs of ops of those names are kept, not rebuilt."""
    candidates = recomputable_layers(trace)
    kept_names = frozenset(keeps)
    ops = list(trace.ops)
    storages = {s.id: s for s in trace.storages}
    accesses = trace.accesses
    next_id = max(storages, default=-1) + 1
    plans = []  # (layer, pass, forward ops that rerun, saved storages dropped, own storages)
    for i in sorted(set(layers)):
        layer = candidates.get(i)
        if layer is None:
            continue
        for one in layer.passes:
            f0 = one.forward[0]
            kept = {o for op in ops[f0 : one.last_op + 1] if op.name in kept_names
                    for o in op.outputs}
            dropped = one.saved - kept
            if not dropped:  # every save is kept: nothing to rebuild
                continue
            last = max(storages[sid].created_at or f0 for sid in dropped)
            rerun_at = [k for k in range(f0, last + 1) if ops[k].name not in kept_names]
            plans.append((i, one, rerun_at, dropped, one.own - (one.saved & kept)))
    if not plans:
        return trace
    wanted = sorted({i for i, *_ in plans})
    inserted: list[tuple[int, int]] = []  # (backward op, ops inserted there)
    # Latest backward first: an insertion moves only ops after it, so the layers still to
    # do keep their indices.
    for _, one, rerun_at, dropped, own in sorted(plans, key=lambda p: -p[1].backward[0]):
        f0, f1 = one.forward
        b0, b1 = one.backward
        rerun = [ops[k] for k in rerun_at]
        m = len(rerun)
        inserted.append((b0, m))
        at = {k: b0 + n for n, k in enumerate(rerun_at)}  # forward op -> its rerun's index
        made_by_rerun = {o for op in rerun for o in op.outputs if storages[o].created_at in at}
        read_by_rerun = {i for op in rerun for i in op.inputs} - made_by_rerun
        twin = {sid: next_id + k for k, sid in enumerate(sorted(made_by_rerun))}
        next_id += len(twin)
        # the forward keeps none of its own storages beyond their last forward use, but
        # those selective recomputation keeps
        for sid in own:
            old = storages[sid]
            reads, writes = accesses[sid]
            last_fwd = max(op for op in (*reads, *writes, old.created_at or f0) if op <= f1)
            storages[sid] = replace(old, freed_at=last_fwd, saved=False,
                                    kind=Kind.TEMPORARY if old.kind is Kind.SAVED_ACTIVATION
                                    else old.kind)
        # every later index moves by m
        for sid, old in list(storages.items()):
            storages[sid] = replace(old, created_at=_shift(old.created_at, b0, m),
                                    freed_at=_shift(old.freed_at, b0, m))
        # what the rerun reads from before the layer, checkpoint keeps until then
        for sid in read_by_rerun:
            old = storages[sid]
            if old.freed_at is not None and old.freed_at < b0 + m - 1:
                storages[sid] = replace(old, freed_at=b0 + m - 1, saved=True)
        new_ops = [replace(op, index=b0 + k, phase=Phase.BACKWARD,
                           inputs=tuple(twin.get(i, i) for i in op.inputs),
                           outputs=tuple(twin.get(o, o) for o in op.outputs))
                   for k, op in enumerate(rerun)]
        # twins: the saved ones live to their last use in backward (which now reads them),
        # the others to their last use in the rerun
        for sid, tid in twin.items():
            old = storages[sid]
            assert old.created_at is not None
            made = at[old.created_at]
            if sid in dropped:
                last = max(op + m for op in accesses[sid][0] if b0 <= op <= b1)
                storages[tid] = replace(old, id=tid, created_at=made, freed_at=last, saved=True,
                                        kind=Kind.SAVED_ACTIVATION, name=None)
            else:
                uses = [op.index for op in new_ops if tid in op.inputs]
                storages[tid] = replace(old, id=tid, created_at=made, freed_at=max([made, *uses]),
                                        saved=False, kind=Kind.TEMPORARY, name=None)
        saved_twins = {sid: twin[sid] for sid in dropped if sid in twin}
        later = [replace(op, index=op.index + m,
                         inputs=tuple(saved_twins.get(i, i) if b0 <= op.index <= b1 else i
                                      for i in op.inputs))
                 for op in ops[b0:]]
        ops = ops[:b0] + new_ops + later
    meta = dict(trace.meta)
    meta["recomputed_layers"] = wanted  # a plan for this trace names them (Plan.recompute)
    if kept_names:
        meta["recompute_keeps"] = sorted(kept_names)  # and these (Plan.recompute_keeps)
    chunks = trace.meta.get("optimizer_chunks")
    if isinstance(chunks, list):
        meta["optimizer_chunks"] = [int(op) + sum(m for where, m in inserted if int(op) >= where)
                                    for op in chunks]
    return Trace(tuple(ops), tuple(storages[sid] for sid in sorted(storages)), trace.layers,
                 meta)


def recomputed_as(trace: Trace) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The layers ``trace`` already recomputes, and the ops whose outputs it keeps."""
    done, keeps = trace.meta.get("recomputed_layers"), trace.meta.get("recompute_keeps")
    return (tuple(done) if isinstance(done, list) else (),
            tuple(keeps) if isinstance(keeps, list) else ())


def _shift(op: int | None, at: int, by: int) -> int | None:
    return op + by if op is not None and op >= at else op

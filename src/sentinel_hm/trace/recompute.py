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
left as they are. A layer qualifies when it has one forward and one backward
instance and saves something of its own; its inputs are still saved (by the
layer before, or by checkpoint itself), so they need no change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from sentinel_hm.trace.model import Kind, Phase, Trace


@dataclass(frozen=True)
class RecomputableLayer:
    forward: tuple[int, int]  # first, last op
    backward: tuple[int, int]
    own: frozenset[int]  # storages created in forward, used only by the layer's instances
    saved: frozenset[int]  # of those, the ones saved for backward
    last_op: int  # the last forward op the recomputation reruns


def recomputable_layers(trace: Trace) -> dict[int, RecomputableLayer]:
    """The layers a recomputation can drop saved bytes from (NOTE [Recompute as a trace])."""
    instances: dict[int, list[tuple[Phase, int, int]]] = {}
    for seg in trace.segments:
        if seg.layer is not None and seg.phase in (Phase.FORWARD, Phase.BACKWARD):
            instances.setdefault(seg.layer, []).append((seg.phase, seg.first_op, seg.last_op))
    out: dict[int, RecomputableLayer] = {}
    accesses = trace.accesses
    for layer, segs in instances.items():
        phases = [phase for phase, _, _ in segs]
        if phases != [Phase.FORWARD, Phase.BACKWARD]:
            continue
        (_, f0, f1), (_, b0, b1) = segs
        own = set()
        for s in trace.storages:
            if s.created_at is None or not f0 <= s.created_at <= f1:
                continue
            reads, writes = accesses[s.id]
            if all(f0 <= op <= f1 or b0 <= op <= b1 for op in (*reads, *writes)) and (
                    s.freed_at is not None and s.freed_at <= b1):
                own.add(s.id)
        saved = frozenset(sid for sid in own if trace.storages[sid].kind is Kind.SAVED_ACTIVATION
                          and any(b0 <= op <= b1 for op in accesses[sid][0]))
        if saved:
            last = max(trace.storages[sid].created_at or f0 for sid in saved)
            out[layer] = RecomputableLayer((f0, f1), (b0, b1), frozenset(own), saved, last)
    return out


def with_recomputed_layers(trace: Trace, layers: Iterable[int]) -> Trace:
    """``trace`` as it would run with ``layers`` recomputed (NOTE [Recompute as a trace])."""
    candidates = recomputable_layers(trace)
    wanted = sorted(i for i in set(layers) if i in candidates)
    if not wanted:
        return trace
    ops = list(trace.ops)
    storages = {s.id: s for s in trace.storages}
    accesses = trace.accesses
    next_id = max(storages, default=-1) + 1
    # Latest backward first: an insertion moves only ops after it, so the layers still to
    # do keep their indices.
    for layer in sorted((candidates[i] for i in wanted), key=lambda c: -c.backward[0]):
        f0, f1 = layer.forward
        b0, b1 = layer.backward
        rerun = ops[f0 : layer.last_op + 1]
        m = len(rerun)
        made_by_rerun = {o for op in rerun for o in op.outputs
                         if (c := storages[o].created_at) is not None and f0 <= c}
        read_by_rerun = {i for op in rerun for i in op.inputs} - made_by_rerun
        twin = {sid: next_id + k for k, sid in enumerate(sorted(made_by_rerun))}
        next_id += len(twin)
        # the forward keeps none of its own storages beyond their last forward use
        for sid in layer.own:
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
            made = b0 + (old.created_at - f0)
            if sid in layer.saved:
                last = max(op + m for op in accesses[sid][0] if b0 <= op <= b1)
                storages[tid] = replace(old, id=tid, created_at=made, freed_at=last, saved=True,
                                        kind=Kind.SAVED_ACTIVATION, name=None)
            else:
                uses = [op.index for op in new_ops if tid in op.inputs]
                storages[tid] = replace(old, id=tid, created_at=made, freed_at=max([made, *uses]),
                                        saved=False, kind=Kind.TEMPORARY, name=None)
        saved_twins = {sid: twin[sid] for sid in layer.saved if sid in twin}
        later = [replace(op, index=op.index + m,
                         inputs=tuple(saved_twins.get(i, i) if b0 <= op.index <= b1 else i
                                      for i in op.inputs))
                 for op in ops[b0:]]
        ops = ops[:b0] + new_ops + later
    meta = dict(trace.meta)
    meta["recomputed_layers"] = wanted  # a plan for this trace names them (Plan.recompute)
    chunks = trace.meta.get("optimizer_chunks")
    if isinstance(chunks, list):
        inserted = [(c.backward[0], c.last_op - c.forward[0] + 1)
                    for c in (candidates[i] for i in wanted)]
        meta["optimizer_chunks"] = [int(op) + sum(m for at, m in inserted if int(op) >= at)
                                    for op in chunks]
    return Trace(tuple(ops), tuple(storages[sid] for sid in sorted(storages)), trace.layers,
                 meta)


def _shift(op: int | None, at: int, by: int) -> int | None:
    return op + by if op is not None and op >= at else op

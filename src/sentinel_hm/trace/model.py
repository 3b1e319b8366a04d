"""The Trace: one training step at tensor (storage) granularity, as pure data.

A `Trace` holds what the tracer saw and nothing derived from a plan; the
analyses below (live-bytes curve, segments, short-lived vs long-lived, per-layer
figures) are computed from the records on demand, so a trace loaded from disk
and a trace fresh from the tracer answer the same questions the same way.

Clock. Ops are numbered 0..n-1 in execution order. A storage *created* by op i
is live from op i on; a storage *freed* after op j (the last op that started
before it died) is live up to and including op j. Storages that existed before
the step have ``created_at=None``; storages still alive at the end have
``freed_at=None``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from itertools import accumulate


class Phase(StrEnum):
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    OTHER = "other"


class Kind(StrEnum):
    PARAMETER = "parameter"
    BUFFER = "buffer"
    GRADIENT = "gradient"
    OPTIMIZER_STATE = "optimizer_state"
    SAVED_ACTIVATION = "saved_activation"
    TEMPORARY = "temporary"
    INPUT = "input"


@dataclass(frozen=True, slots=True)
class OpRecord:
    """One aten op as it ran.

    ``inputs``: storages the op read; ``outputs``: storages it wrote (created or
    modified in place). Pure aliasing ops (view, transpose, ...) read their
    input and write nothing. ``read_bytes``/``write_bytes`` count tensor bytes
    (a view counts its own elements, not its whole storage).
    """

    index: int
    name: str
    phase: Phase
    layer: int | None
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    start_s: float
    duration_s: float
    read_bytes: int
    write_bytes: int
    flops: int = 0


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """One storage (the unit of memory; tensors are views of storages)."""

    id: int
    nbytes: int
    dtype: str
    device: str
    kind: Kind
    created_at: int | None
    freed_at: int | None
    saved: bool = False
    name: str | None = None


@dataclass(frozen=True, slots=True)
class LayerRecord:
    """A layer: a module found automatically, or a span marked with ``add_layer``."""

    index: int
    name: str
    module_type: str | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """One instance of a layer: a maximal run of ops with the same (phase, layer)."""

    index: int
    phase: Phase
    layer: int | None
    first_op: int
    last_op: int


@dataclass(frozen=True, slots=True)
class LayerStats:
    """Per-layer figures over the whole step (all instances, all phases)."""

    layer: int | None
    saved_bytes: int
    read_bytes: int
    write_bytes: int
    forward_s: float
    backward_s: float


@dataclass(frozen=True)
class Trace:
    """One profiled step. See the module docstring for the clock."""

    ops: tuple[OpRecord, ...]
    storages: tuple[StorageRecord, ...]
    layers: tuple[LayerRecord, ...]
    meta: dict[str, object] = field(default_factory=dict)

    # -- indexes -------------------------------------------------------------------------------

    @cached_property
    def storage_by_id(self) -> dict[int, StorageRecord]:
        return {s.id: s for s in self.storages}

    @cached_property
    def accesses(self) -> dict[int, tuple[tuple[int, ...], tuple[int, ...]]]:
        """storage id -> (ops that read it, ops that wrote it), in op order."""
        reads: dict[int, list[int]] = defaultdict(list)
        writes: dict[int, list[int]] = defaultdict(list)
        for op in self.ops:
            for sid in op.inputs:
                reads[sid].append(op.index)
            for sid in op.outputs:
                writes[sid].append(op.index)
        return {
            s.id: (tuple(reads.get(s.id, ())), tuple(writes.get(s.id, ()))) for s in self.storages
        }

    # -- memory over time ----------------------------------------------------------------------

    @cached_property
    def live_bytes(self) -> tuple[int, ...]:
        """Bytes of all storages live during each op (see the clock above)."""
        return self.live_bytes_of(self.storages)

    def live_bytes_of(self, storages: Iterable[StorageRecord]) -> tuple[int, ...]:
        """Bytes of ``storages`` live during each op."""
        n = len(self.ops)
        delta = [0] * (n + 1)
        for s in storages:
            start = 0 if s.created_at is None else s.created_at
            end = n if s.freed_at is None else s.freed_at + 1
            if start < end:
                delta[start] += s.nbytes
                delta[end] -= s.nbytes
        return tuple(accumulate(delta[:n]))

    @property
    def peak_bytes(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def peak_op(self) -> int | None:
        """Index of the first op at which the live bytes peak."""
        curve = self.live_bytes
        return curve.index(max(curve)) if curve else None

    # -- layers and lifetimes ------------------------------------------------------------------

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        out: list[Segment] = []
        start = 0
        for i in range(1, len(self.ops) + 1):
            if i == len(self.ops) or (self.ops[i].phase, self.ops[i].layer) != (
                self.ops[start].phase,
                self.ops[start].layer,
            ):
                op = self.ops[start]
                out.append(Segment(len(out), op.phase, op.layer, start, i - 1))
                start = i
        return tuple(out)

    @cached_property
    def segment_of_op(self) -> tuple[int, ...]:
        out = [0] * len(self.ops)
        for seg in self.segments:
            for i in range(seg.first_op, seg.last_op + 1):
                out[i] = seg.index
        return tuple(out)

    def is_short_lived(self, storage: StorageRecord) -> bool:
        """Created and freed within one layer instance (segment) of this step."""
        if storage.created_at is None or storage.freed_at is None:
            return False
        seg = self.segments[self.segment_of_op[storage.created_at]]
        return storage.freed_at <= seg.last_op

    @cached_property
    def short_lived_ids(self) -> frozenset[int]:
        return frozenset(s.id for s in self.storages if self.is_short_lived(s))

    def bytes_by_kind(self) -> dict[Kind, int]:
        out = dict.fromkeys(Kind, 0)
        for s in self.storages:
            out[s.kind] += s.nbytes
        return out

    def layer_stats(self) -> list[LayerStats]:
        """Per layer: saved-activation bytes, bytes read and written, time per phase.

        A saved activation is charged to the layer whose op created it.
        """
        keys = [layer.index for layer in self.layers] + [None]
        saved = dict.fromkeys(keys, 0)
        read = dict.fromkeys(keys, 0)
        written = dict.fromkeys(keys, 0)
        fwd = dict.fromkeys(keys, 0.0)
        bwd = dict.fromkeys(keys, 0.0)
        for op in self.ops:
            read[op.layer] += op.read_bytes
            written[op.layer] += op.write_bytes
            if op.phase is Phase.FORWARD:
                fwd[op.layer] += op.duration_s
            elif op.phase is Phase.BACKWARD:
                bwd[op.layer] += op.duration_s
        for s in self.storages:
            if s.kind is Kind.SAVED_ACTIVATION and s.created_at is not None:
                saved[self.ops[s.created_at].layer] += s.nbytes
        return [
            LayerStats(k, saved[k], read[k], written[k], fwd[k], bwd[k]) for k in keys
        ]

    def phase_seconds(self) -> dict[Phase, float]:
        out = dict.fromkeys(Phase, 0.0)
        for op in self.ops:
            out[op.phase] += op.duration_s
        return out

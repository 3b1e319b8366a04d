"""Trace files: versioned JSON, gzip when the name ends in ``.gz``. Schema: docs/trace-schema.md.

Loading parses JSON only (no pickle, nothing executed) and checks every field,
so a malformed or foreign file fails with a message that names the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sentinel_hm.errors import SentinelError
from sentinel_hm.jsonfile import read_json, write_json
from sentinel_hm.trace.model import Kind, LayerRecord, OpRecord, Phase, StorageRecord, Trace

FORMAT = "sentinel-hm/trace"
SCHEMA_VERSION = 1


def trace_to_dict(trace: Trace) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": SCHEMA_VERSION,
        "meta": trace.meta,
        "layers": [
            {"name": layer.name, "module_type": layer.module_type} for layer in trace.layers
        ],
        "storages": [
            {
                "nbytes": s.nbytes,
                "dtype": s.dtype,
                "device": s.device,
                "kind": s.kind.value,
                "created_at": s.created_at,
                "freed_at": s.freed_at,
                "saved": s.saved,
                "name": s.name,
            }
            for s in trace.storages
        ],
        "ops": [
            {
                "name": op.name,
                "phase": op.phase.value,
                "layer": op.layer,
                "inputs": list(op.inputs),
                "outputs": list(op.outputs),
                "start_s": op.start_s,
                "duration_s": op.duration_s,
                "read_bytes": op.read_bytes,
                "write_bytes": op.write_bytes,
                "flops": op.flops,
            }
            for op in trace.ops
        ],
    }


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` (gzip-compressed when it ends in ``.gz``)."""
    return write_json(trace_to_dict(trace), path)


def load_trace(path: str | Path) -> Trace:
    """Read a trace file written by `save_trace`; raises `SentinelError` if it is not one."""
    return trace_from_dict(read_json(path, "trace"), source=str(path))


class _Checker:
    """Type checks that name the field: ``trace.json: ops[3].phase: ...``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> SentinelError:
        return SentinelError(f"{self.source}: {where}: {message}")

    def get(self, obj: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(f"{where}.{key}", "missing")
        value = obj[key]
        if isinstance(value, bool) and bool not in _as_tuple(types):
            raise self.fail(f"{where}.{key}", f"expected {_names(types)}, got a boolean")
        if not isinstance(value, types):
            raise self.fail(f"{where}.{key}", f"expected {_names(types)}, got {value!r:.40}")
        return value

    def index(self, obj: Any, key: str, limit: int, where: str, optional: bool) -> int | None:
        value = self.get(obj, key, (int, type(None)) if optional else int, where)
        if value is not None and not 0 <= value < limit:
            raise self.fail(f"{where}.{key}", f"{value} is out of range 0..{limit - 1}")
        return value

    def enum(self, obj: Any, key: str, enum: type[Phase] | type[Kind], where: str) -> Any:
        value = self.get(obj, key, str, where)
        try:
            return enum(value)
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise self.fail(f"{where}.{key}", f"{value!r} is not one of {allowed}") from None


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in _as_tuple(types))


def trace_from_dict(data: Any, source: str = "trace") -> Trace:
    c = _Checker(source)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SentinelError(f"{source}: not a sentinel-hm trace (no \"format\": \"{FORMAT}\")")
    version = data.get("version")
    if version != SCHEMA_VERSION:
        raise SentinelError(
            f"{source}: trace schema version {version!r} is not supported (this sentinel-hm "
            f"reads version {SCHEMA_VERSION}): profile the step again with this version"
        )
    meta = c.get(data, "meta", dict, "trace")
    raw_layers = c.get(data, "layers", list, "trace")
    raw_storages = c.get(data, "storages", list, "trace")
    raw_ops = c.get(data, "ops", list, "trace")
    n_layers, n_storages, n_ops = len(raw_layers), len(raw_storages), len(raw_ops)

    layers = tuple(
        LayerRecord(
            index=i,
            name=c.get(x, "name", str, f"layers[{i}]"),
            module_type=c.get(x, "module_type", (str, type(None)), f"layers[{i}]"),
        )
        for i, x in enumerate(raw_layers)
    )
    storages = []
    for i, x in enumerate(raw_storages):
        w = f"storages[{i}]"
        storages.append(
            StorageRecord(
                id=i,
                nbytes=c.get(x, "nbytes", int, w),
                dtype=c.get(x, "dtype", str, w),
                device=c.get(x, "device", str, w),
                kind=c.enum(x, "kind", Kind, w),
                created_at=c.index(x, "created_at", n_ops, w, optional=True),
                freed_at=c.index(x, "freed_at", n_ops, w, optional=True),
                saved=c.get(x, "saved", bool, w),
                name=c.get(x, "name", (str, type(None)), w),
            )
        )
    ops = []
    for i, x in enumerate(raw_ops):
        w = f"ops[{i}]"
        ids = []
        for key in ("inputs", "outputs"):
            values = c.get(x, key, list, w)
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_storages:
                    raise c.fail(f"{w}.{key}", f"{v!r} is not a storage index 0..{n_storages - 1}")
            ids.append(tuple(values))
        ops.append(
            OpRecord(
                index=i,
                name=c.get(x, "name", str, w),
                phase=c.enum(x, "phase", Phase, w),
                layer=c.index(x, "layer", n_layers, w, optional=True),
                inputs=ids[0],
                outputs=ids[1],
                start_s=float(c.get(x, "start_s", (int, float), w)),
                duration_s=float(c.get(x, "duration_s", (int, float), w)),
                read_bytes=c.get(x, "read_bytes", int, w),
                write_bytes=c.get(x, "write_bytes", int, w),
                flops=c.get(x, "flops", int, w),
            )
        )
    return Trace(tuple(ops), tuple(storages), layers, dict(meta))

"""`summarize(trace)`: the table that ``sentinel show`` prints."""

from __future__ import annotations

from collections.abc import Sequence

from sentinel_hm.trace.model import Kind, Trace
from sentinel_hm.units import format_bytes


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
    )
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def summarize(trace: Trace) -> str:
    meta = trace.meta
    out = []
    title = str(meta.get("workload", "step"))
    out.append(
        f"trace of {title}: {len(trace.ops)} ops, {len(trace.storages)} storages, "
        f"{len(trace.layers)} layers ({meta.get('layer_source', 'modules')}), "
        f"torch {meta.get('torch_version', '?')}"
    )
    profiled = meta.get("profiled_step_s")
    plain = meta.get("plain_step_s")
    if isinstance(profiled, float):
        timing = f"profiled step {profiled * 1e3:.1f} ms"
        if isinstance(plain, float) and plain > 0:
            timing += f", plain step {plain * 1e3:.1f} ms, overhead x{profiled / plain:.2f}"
        out.append(timing)

    peak_op = trace.peak_op
    if peak_op is not None:
        op = trace.ops[peak_op]
        layer = trace.layers[op.layer].name if op.layer is not None else "-"
        out.append(
            f"peak live {format_bytes(trace.peak_bytes)} at op {peak_op} ({op.name}, "
            f"{op.phase.value}, layer {layer})"
        )

    created = [s for s in trace.storages if s.created_at is not None]
    created_bytes = sum(s.nbytes for s in created)
    short = [s for s in created if s.id in trace.short_lived_ids]
    short_bytes = sum(s.nbytes for s in short)
    share = short_bytes / created_bytes if created_bytes else 0.0
    out.append(
        f"short-lived: {len(short)} of {len(created)} storages created in the step, "
        f"{format_bytes(short_bytes)} of {format_bytes(created_bytes)} ({share:.0%})"
    )

    out.append("")
    by_kind = trace.bytes_by_kind()
    counts = dict.fromkeys(Kind, 0)
    for s in trace.storages:
        counts[s.kind] += 1
    total = sum(by_kind.values()) or 1
    out += _table(
        ("kind", "storages", "bytes", "share"),
        [
            (k.value, str(counts[k]), format_bytes(by_kind[k]), f"{by_kind[k] / total:.1%}")
            for k in Kind
            if counts[k]
        ],
    )

    out.append("")
    rows = []
    for st in trace.layer_stats():
        name = trace.layers[st.layer].name if st.layer is not None else "(no layer)"
        rows.append((
            name,
            format_bytes(st.saved_bytes),
            format_bytes(st.read_bytes),
            format_bytes(st.write_bytes),
            f"{st.forward_s * 1e3:.1f}",
            f"{st.backward_s * 1e3:.1f}",
        ))
    out += _table(("layer", "saved", "read", "written", "fwd ms", "bwd ms"), rows)
    phases = trace.phase_seconds()
    out.append("")
    out.append("op time by phase: " + ", ".join(
        f"{p.value} {t * 1e3:.1f} ms" for p, t in phases.items() if t
    ))
    return "\n".join(out)

"""Hand-built and generated traces for planner and simulator tests (no torch needed)."""

from __future__ import annotations

from sentinel_hm.core.hardware import Access, Hardware, LinkSpec, TierSpec
from sentinel_hm.trace.model import Kind, LayerRecord, OpRecord, Phase, StorageRecord, Trace

MiB = 2**20
GiB = 2**30


def hardware(access: Access, link_bytes_per_s: float = 1 * GiB, slow_ratio: float = 4.0) -> Hardware:
    """Test hardware: measured op times, fast tier 16 GiB/s, slow tier ``slow_ratio`` slower."""
    fast = TierSpec("fast", 64 * GiB, 16 * GiB, 16 * GiB, 0.0)
    slow = TierSpec("slow", 64 * GiB, 16 * GiB / slow_ratio, 16 * GiB / slow_ratio, 0.0)
    link = LinkSpec(link_bytes_per_s, link_bytes_per_s, 0.0, 1)
    return Hardware(f"test-{access.value}", fast, slow, link, access, 1e12, 0.0,
                    measured_op_times=True)


class Builder:
    """Append ops and storages; each op is given its phase, layer and touched storages."""

    def __init__(self) -> None:
        self.ops: list[OpRecord] = []
        self.storages: list[dict] = []
        self.t = 0.0

    def storage(self, nbytes: int, kind: Kind, saved: bool = False, pre: bool = False) -> int:
        self.storages.append(dict(nbytes=nbytes, kind=kind, saved=saved,
                                  created_at=None if pre else -1, freed_at=None))
        return len(self.storages) - 1

    def op(self, phase: Phase, layer: int | None, reads=(), creates=(), frees=(),
           duration_s: float = 1e-3, writes=(), name: str = "aten::test") -> int:
        i = len(self.ops)
        for sid in creates:
            self.storages[sid]["created_at"] = i
        for sid in frees:
            self.storages[sid]["freed_at"] = i
        rb = sum(self.storages[s]["nbytes"] for s in reads)
        out = tuple(dict.fromkeys((*creates, *writes)))
        wb = sum(self.storages[s]["nbytes"] for s in out)
        self.ops.append(OpRecord(i, name, phase, layer, tuple(reads), out, self.t,
                                 duration_s, rb, wb, 0))
        self.t += duration_s
        return i

    def build(self, n_layers: int) -> Trace:
        storages = []
        for sid, s in enumerate(self.storages):
            created = s["created_at"]
            assert created != -1, f"storage {sid} declared but never created"
            storages.append(StorageRecord(sid, s["nbytes"], "float32", "cpu", s["kind"], created,
                                          s["freed_at"], s["saved"]))
        layers = tuple(LayerRecord(i, f"layer{i}") for i in range(n_layers))
        return Trace(tuple(self.ops), tuple(storages), layers)


def chain(n_layers: int = 3, act_bytes: int = MiB, op_s: float = 1e-3) -> Trace:
    """Forward layer i saves activation A_i (one op per layer), backward reads it and frees it."""
    b = Builder()
    acts = [b.storage(act_bytes, Kind.SAVED_ACTIVATION, saved=True) for _ in range(n_layers)]
    for i in range(n_layers):
        b.op(Phase.FORWARD, i, reads=acts[i - 1 : i], creates=[acts[i]], duration_s=op_s)
    for i in reversed(range(n_layers)):
        b.op(Phase.BACKWARD, i, reads=[acts[i]], frees=[acts[i]], duration_s=op_s)
    return b.build(n_layers)


def layered(
    n_layers: int,
    sizes: list[int],
    durations: list[float],
    saved_mask: list[bool],
) -> Trace:
    """A training-like step: parameters, saved activations, temporaries, gradients, optimizer.

    ``sizes``/``durations``/``saved_mask`` are cycled through to size storages, time ops and
    choose which forward outputs are saved for backward.
    """
    b = Builder()
    size = iter(sizes * (8 * n_layers + 8))
    duration = iter(durations * (8 * n_layers + 8))
    saved_iter = iter(saved_mask * (8 * n_layers + 8))
    params = [b.storage(next(size), Kind.PARAMETER, saved=True, pre=True) for _ in range(n_layers)]
    states = [b.storage(next(size), Kind.OPTIMIZER_STATE, pre=True) for _ in range(n_layers)]
    saved: list[list[int]] = []
    x = b.storage(next(size), Kind.INPUT, pre=True)
    for i in range(n_layers):
        tmp = b.storage(next(size), Kind.TEMPORARY)
        b.op(Phase.FORWARD, i, reads=[x, params[i]], creates=[tmp], duration_s=next(duration))
        out = b.storage(next(size), Kind.SAVED_ACTIVATION, saved=True)
        keep = next(saved_iter)
        b.op(Phase.FORWARD, i, reads=[tmp], creates=[out], frees=[tmp], duration_s=next(duration))
        saved.append([out] if keep else [])
        if not keep:
            x_next = b.storage(next(size), Kind.SAVED_ACTIVATION, saved=True)
            b.op(Phase.FORWARD, i, reads=[out], creates=[x_next], frees=[out],
                 duration_s=next(duration))
            out = x_next
            saved[-1].append(out)
        x = out
    grads = []
    for i in reversed(range(n_layers)):
        g = b.storage(b.storages[params[i]]["nbytes"], Kind.GRADIENT)
        b.op(Phase.BACKWARD, i, reads=[*saved[i], params[i]], creates=[g], frees=saved[i],
             duration_s=next(duration))
        grads.append((i, g))
    for i, g in grads:
        b.op(Phase.OPTIMIZER, None, reads=[params[i], states[i], g],
             writes=[params[i], states[i]], duration_s=next(duration))
    last = b.op(Phase.OTHER, None, frees=[g for _, g in grads], duration_s=1e-5)
    del last
    return b.build(n_layers)

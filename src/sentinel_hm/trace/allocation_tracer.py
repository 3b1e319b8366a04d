"""The allocation tracer: records a step that runs compiled code, from torch.profiler's events.

NOTE [Tracing compiled code]
`Tracer` sees aten ops through a dispatch mode, under which dynamo does not
compile (NOTE [Compiled code under the tracer]): its trace is the eager
program's, and a compiled region saves other tensors (fewer, fused, all at the
region's end). This tracer leaves the step as it runs and reads it afterwards
from torch.profiler (``profile_memory``, ``record_shapes``):
- every allocation and free the allocator reports, with its address and size,
  also those of inductor's own buffers inside a compiled graph;
- the aten ops outside compiled code (and inside ``aot_eager`` graphs), with
  the storages their tensor arguments point to;
- a compiled graph's call (``## Call CompiledFxGraph ##``) is one event: it is
  cut into one op per buffer it allocates (a kernel allocates its output just
  before it runs), so a storage's life is known to the kernel;
- its own markers (``record_function("sentinel::k")``), emitted from
  saved-tensor hooks, optimizer hooks and the runtime's clock events, which
  land in the event tree exactly where they happened.

What it cannot see: the tensors a compiled graph reads. A saved tensor is
read where autograd packs and unpacks it (and until its backward node ends);
a parameter read inside a compiled graph is not seen, so a runtime keeps
parameters of compiled models in fast memory. Layers are the compiled regions
(each call of one, in a forward pass, is the next layer; a backward node takes
the layer that saved what it unpacks).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.profiler import ProfilerActivity, record_function
from torch.profiler import profile as torch_profile

from sentinel_hm.trace.model import Kind, LayerRecord, OpRecord, Phase, Trace
from sentinel_hm.trace.sharded import local_tensor
from sentinel_hm.trace.tracer import StorageDraft, storage_records

_MARK = "sentinel::"
_GRAPH_CALL = "## Call CompiledFxGraph"
_REGION = "Torch-Compiled Region"
_BACKWARD_NODE = "autograd::engine::evaluate_function:"

# what a marker carries: ("pack" | "unpack", address, nbytes, dtype, device),
# ("tag", [(address, nbytes, dtype, device, kind, name)]), ("call", fn), ("optimizer", +1 | -1)
_Payload = tuple[Any, ...]


@dataclass(slots=True)
class _Op:
    name: str
    phase: Phase
    layer: int | None
    start_ns: int
    end_ns: int
    inputs: dict[int, None] = field(default_factory=dict)
    outputs: dict[int, None] = field(default_factory=dict)
    read_bytes: int = 0
    write_bytes: int = 0


def _described(t: torch.Tensor) -> tuple[int, int, str, str]:
    storage = local_tensor(t).untyped_storage()
    return (storage.data_ptr(), storage.nbytes(), str(t.dtype).removeprefix("torch."),
            str(t.device))


class AllocationTracer:
    """One profiled step of a program that runs compiled code (NOTE [Tracing compiled code]).

    The same interface as `Tracer` for a runtime: ``start``/``stop``, ``at_next_op``,
    ``mark_optimizer_chunk``, ``tag_external``; ``on_saved`` hears packs and unpacks when the
    step is read, at ``stop``, in the order they happened."""

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        track_saved: bool = True,
        on_saved: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self._model = model
        self._optimizers: list[torch.optim.Optimizer] = [optimizer] if optimizer else []
        self._track_saved = track_saved
        self._on_saved = on_saved
        self._payloads: list[_Payload] = []
        self._handles: list[Any] = []
        self._profiler: Any = None
        self._hooks: Any = None
        self._thread = -1  # the profiler's number for this thread, found at stop()
        self._chunk_ops: list[int] = []
        self._t0_ns = 0
        self._wall_s = time.perf_counter()
        # read back at stop()
        self._ops: list[_Op] = []
        self._storages: list[StorageDraft] = []
        self._live: dict[int, int] = {}  # address -> storage id, while allocated
        self._layer_names: list[str] = []
        self._pack_layer: dict[int, int | None] = {}
        self._in_optimizer = 0
        self._backward = 0
        self._region_depth = 0
        self._forward_layer = -1  # the compiled region being run in this forward pass
        self._layer: int | None = None
        self._pending_reads: list[int] = []

    # -- session -------------------------------------------------------------------------------

    def start(self) -> None:
        self._profiler = torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                       record_shapes=True)
        self._profiler.__enter__()
        self._mark(("tag", self._known()))
        self._wall_s = time.perf_counter()

        def opt_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if optimizer not in self._optimizers:
                self._optimizers.append(optimizer)
            self._mark(("tag", self._known()))
            self._mark(("optimizer", 1))

        def opt_post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._mark(("optimizer", -1))
            self._mark(("tag", self._optimizer_state(optimizer)))

        self._handles = [register_optimizer_step_pre_hook(opt_pre),
                         register_optimizer_step_post_hook(opt_post)]
        if self._track_saved:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(*opaque_to_dynamo(
                self._pack, self._unpack))
            self._hooks.__enter__()

    def stop(self) -> Trace:
        self._wall_s = time.perf_counter() - self._wall_s
        try:
            if self._hooks is not None:
                self._hooks.__exit__(None, None, None)
            for h in self._handles:
                h.remove()
            self._mark(("tag", self._known()))
        finally:
            self._profiler.__exit__(None, None, None)
        roots = self._profiler.profiler.kineto_results.experimental_event_tree()
        # the profiler numbers threads itself: ours is the one that ran the first marker
        first = next((e for e in roots if e.name == f"{_MARK}0"), None)
        self._thread = first.start_tid if first is not None else -1
        roots = sorted((e for e in roots if e.start_tid == self._thread),
                       key=lambda e: e.start_time_ns)
        self._t0_ns = roots[0].start_time_ns if roots else 0
        self._walk(roots)
        self._profiler = None
        return self._build()

    def at_next_op(self, fn: Callable[[int], None]) -> None:
        """Call ``fn`` with the index of the next op (when the step is read, at ``stop``)."""
        self._mark(("call", fn))

    def mark_optimizer_chunk(self) -> None:
        self.at_next_op(self._chunk_ops.append)

    def tag_external(self, t: torch.Tensor, name: str) -> None:
        ptr, nbytes, dtype, device = _described(t)
        self._mark(("tag", [(ptr, nbytes, dtype, device, Kind.INPUT, name)]))

    # -- while the step runs -------------------------------------------------------------------

    def _mark(self, payload: _Payload) -> None:
        with record_function(f"{_MARK}{len(self._payloads)}"):
            self._payloads.append(payload)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._mark(("pack", *_described(t)))
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        self._mark(("unpack", *_described(t)))
        return t

    def _known(self) -> list[tuple[Any, ...]]:
        """Parameters, buffers, gradients and optimizer state as they stand now."""
        out: list[tuple[Any, ...]] = []

        def add(t: torch.Tensor, kind: Kind, name: str | None) -> None:
            out.append((*_described(t), kind, name))

        if self._model is not None:
            for name, p in self._model.named_parameters(remove_duplicate=False):
                add(p, Kind.PARAMETER, name)
                if p.grad is not None:
                    add(p.grad, Kind.GRADIENT, f"{name}.grad")
            for name, b in self._model.named_buffers(remove_duplicate=False):
                add(b, Kind.BUFFER, name)
        for opt in self._optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    add(p, Kind.PARAMETER, None)
                    if p.grad is not None:
                        add(p.grad, Kind.GRADIENT, None)
            out.extend(self._optimizer_state(opt))
        return out

    @staticmethod
    def _optimizer_state(opt: torch.optim.Optimizer) -> list[tuple[Any, ...]]:
        """``state[i].key``, as `Tracer` names it."""
        params = [p for group in opt.param_groups for p in group["params"]]
        return [(*_described(value), Kind.OPTIMIZER_STATE, f"state[{i}].{key}")
                for i, p in enumerate(params)
                for key, value in opt.state.get(p, {}).items()
                if isinstance(value, torch.Tensor)]

    # -- reading the events --------------------------------------------------------------------

    def _walk(self, events: Iterable[Any], op: int | None = None) -> None:
        """Events in time order; ``op`` is the op they run inside, if any."""
        for e in sorted(events, key=lambda e: e.start_time_ns):
            if e.start_tid != self._thread:
                continue
            name = e.name
            if "Allocation" in str(e.tag):
                self._allocation(e.typed[1], op)
            elif name.startswith(_MARK):
                self._marker(int(name[len(_MARK):]), op)
            elif op is not None:
                self._walk(e.children, op)  # inside an op: its allocations and markers
            elif name.startswith(_GRAPH_CALL):
                self._graph_call(e)
            elif name.startswith("aten::") or not _has_ops(e):
                index = self._new_op(name, e.start_time_ns, e.end_time_ns)  # as Tracer names
                self._reads(index, e)
                self._walk(e.children, index)
            elif name.startswith(_REGION):
                self._region(e)
            elif name.startswith(_BACKWARD_NODE):
                self._backward_node(e)
            else:
                self._walk(e.children)

    def _new_op(self, name: str, start_ns: int, end_ns: int) -> int:
        if self._in_optimizer:
            phase, layer = Phase.OPTIMIZER, None
        elif self._backward:
            phase, layer = Phase.BACKWARD, self._layer
        else:
            phase = Phase.FORWARD
            layer = self._forward_layer if self._region_depth else None
        op = _Op(name, phase, layer, start_ns, end_ns)
        index = len(self._ops)
        self._ops.append(op)
        for sid in self._pending_reads:
            self._read(index, sid, self._storages[sid].nbytes)
        self._pending_reads.clear()
        return index

    def _graph_call(self, e: Any) -> None:
        """A compiled graph: one op per buffer it allocates (NOTE above)."""
        children = sorted(e.children, key=lambda c: c.start_time_ns)
        cuts = [c.start_time_ns for c in children
                if "Allocation" in str(c.tag) and c.typed[1].alloc_size > 0]
        bounds = [e.start_time_ns, *cuts, e.end_time_ns]
        first = len(self._ops)
        for start, end in itertools.pairwise(bounds):
            self._new_op("compiled_graph", start, end)
        piece = first
        for c in children:
            if "Allocation" in str(c.tag) and c.typed[1].alloc_size > 0:
                piece += 1
            self._walk([c], piece)

    def _region(self, e: Any) -> None:
        if self._region_depth == 0 and not self._backward and not self._in_optimizer:
            self._forward_layer += 1
            while len(self._layer_names) <= self._forward_layer:
                self._layer_names.append(f"compiled region {len(self._layer_names)}")
        self._region_depth += 1
        try:
            self._walk(e.children)
        finally:
            self._region_depth -= 1

    def _backward_node(self, e: Any) -> None:
        """A backward node runs in the layer that saved what it unpacks; the tensors it
        unpacked are read until it ends."""
        self._backward += 1
        outer = self._layer
        unpacked = [self._live.get(self._payloads[k][1]) for k in _markers(e)
                    if self._payloads[k][0] == "unpack"]
        self._layer = next((self._pack_layer[s] for s in unpacked if s in self._pack_layer),
                           None)
        try:
            self._walk(e.children)
        finally:
            self._backward -= 1
            self._layer = outer
            if self._backward == 0:
                self._forward_layer = -1  # the next forward pass starts at the first region
        last = len(self._ops) - 1
        for sid in unpacked:
            if sid is not None and last >= 0 and self._storages[sid].freed_at is None:
                self._read(last, sid, self._storages[sid].nbytes)

    def _allocation(self, f: Any, op: int | None) -> None:
        ptr, size = f.ptr, f.alloc_size
        if size > 0:
            self._live[ptr] = len(self._storages)
            created = op if op is not None else len(self._ops)
            self._storages.append(StorageDraft(nbytes=size, dtype="uint8", device=str(f.device),
                                           created_at=created, first_seen=created))
            if op is not None:
                self._ops[op].outputs[self._live[ptr]] = None
                self._ops[op].write_bytes += size
            return
        sid = self._live.pop(ptr, None)
        if sid is None:  # allocated before the step: it was live until now
            sid = self._existing(ptr, -size, "uint8", str(f.device))
            self._live.pop(ptr, None)
        self._storages[sid].freed_at = len(self._ops) - 1 if op is None else op

    def _existing(self, ptr: int, nbytes: int, dtype: str, device: str) -> int:
        """The storage at ``ptr``, registered as one from before the step if new."""
        sid = self._live.get(ptr)
        if sid is None:
            sid = len(self._storages)
            self._storages.append(StorageDraft(nbytes=nbytes, dtype=dtype, device=device,
                                           created_at=None, before_forward=True))
            self._live[ptr] = sid
        elif self._storages[sid].created_at is None and nbytes > self._storages[sid].nbytes:
            self._storages[sid].nbytes = nbytes  # seen before through a smaller view
        return sid

    def _marker(self, k: int, op: int | None) -> None:
        payload = self._payloads[k]
        what = payload[0]
        if what in ("pack", "unpack"):
            ptr, nbytes, dtype, device = payload[1:]
            sid = self._existing(ptr, nbytes, dtype, device)
            s = self._storages[sid]
            s.dtype = dtype
            if what == "pack":
                s.saved = True
                clock = op if op is not None else len(self._ops) - 1
                self._pack_layer.setdefault(
                    sid, self._forward_layer if self._region_depth else None)
                if clock >= 0:
                    self._read(clock, sid, nbytes)
                if self._on_saved is not None:
                    self._on_saved("pack", sid, max(clock, 0))
            else:
                self._pending_reads.append(sid)
                if self._on_saved is not None:
                    self._on_saved("unpack", sid, len(self._ops))
        elif what == "tag":
            for ptr, nbytes, dtype, device, kind, name in payload[1]:
                s = self._storages[self._existing(ptr, nbytes, dtype, device)]
                s.dtype = dtype
                if s.kind is None or (s.kind is Kind.GRADIENT and kind is not Kind.GRADIENT) \
                        or kind is Kind.INPUT:
                    s.kind = kind
                if s.name is None or kind is Kind.INPUT:
                    s.name = name
        elif what == "call":
            payload[1](len(self._ops))
        elif what == "optimizer":
            self._in_optimizer += payload[1]

    def _reads(self, index: int, e: Any) -> None:
        """The storages an aten op's tensor arguments point to (record_shapes)."""
        args = list(getattr(e.typed[1], "inputs", ()))
        tensors = []
        while args:
            a = args.pop(0)
            if isinstance(a, list):
                args[:0] = a
            elif hasattr(a, "storage_data_ptr"):
                tensors.append(a)
        for n, t in enumerate(tensors):
            ptr = t.storage_data_ptr
            if not ptr:
                continue
            itemsize = t.dtype.itemsize if t.dtype is not None else 1
            numel = 1
            for d in t.sizes:
                numel *= d
            extent = itemsize * (1 + sum((d - 1) * s for d, s in zip(t.sizes, t.strides,
                                                                     strict=False) if d > 0))
            sid = self._existing(ptr, extent, str(t.dtype).removeprefix("torch."),
                                 str(t.device))
            self._read(index, sid, numel * itemsize)
            if n == 0 and self._ops[index].name.endswith("_"):  # in place: writes its self
                self._ops[index].outputs.setdefault(sid, None)

    def _read(self, index: int, sid: int, nbytes: int) -> None:
        op = self._ops[index]
        if sid not in op.inputs:
            op.inputs[sid] = None
            op.read_bytes += nbytes

    def _build(self) -> Trace:
        last = len(self._ops) - 1
        if last >= 0:  # the trace's clock (model.py): within the step's ops
            for s in self._storages:
                if s.created_at is not None and s.created_at > last:
                    s.created_at = last  # allocated after the last op
                if s.freed_at is not None:
                    s.freed_at = min(max(s.freed_at, s.created_at or 0), last)
        ops = tuple(
            OpRecord(index=i, name=op.name, phase=op.phase, layer=op.layer,
                     inputs=tuple(op.inputs), outputs=tuple(op.outputs),
                     start_s=(op.start_ns - self._t0_ns) * 1e-9,
                     duration_s=max(op.end_ns - op.start_ns, 0) * 1e-9,
                     read_bytes=op.read_bytes, write_bytes=op.write_bytes)
            for i, op in enumerate(self._ops))
        layers = tuple(LayerRecord(i, name, "compiled region")
                       for i, name in enumerate(self._layer_names))
        meta: dict[str, object] = {
            "torch_version": torch.__version__,
            "profiled_step_s": self._wall_s,
            "layer_source": "compiled regions",
            "tracer": "allocations",
        }
        if self._chunk_ops:
            meta["optimizer_chunks"] = list(self._chunk_ops)
        return Trace(ops, storage_records(self._storages), layers, meta)


def opaque_to_dynamo(*hooks: Callable[..., Any]) -> tuple[Callable[..., Any], ...]:
    """Hooks that run eagerly when called from compiled code: a saved-tensor hook runs inside
    a compiled region's autograd function, where dynamo would compile its frame too (one more
    region per call, graph breaks, and a recompilation whenever the hook's object changes)."""
    return tuple(torch.compiler.disable(hook) for hook in hooks)


def _has_ops(e: Any) -> bool:
    return any("TorchOp" in str(c.tag) and not c.name.startswith(_MARK) for c in e.children)


def _markers(e: Any) -> list[int]:
    """Our markers in ``e``'s subtree, in time order."""
    out: list[tuple[int, int]] = []
    stack = [e]
    while stack:
        x = stack.pop()
        if x.name.startswith(_MARK):
            out.append((x.start_time_ns, int(x.name[len(_MARK):])))
        stack.extend(x.children)
    return [k for _, k in sorted(out)]

"""The tracer: records one training step at storage granularity.

How it sees the step:
- a `TorchDispatchMode` sees every aten op with its real tensors: name, the
  storages it reads and writes, its duration (and FLOPs where torch's flop
  counter knows the op);
- `weakref.finalize` on each untyped storage tells when it dies; frees happen
  between ops, so the op counter is an exact clock (see ``model.py``);
- saved-tensor hooks tell which storages autograd keeps for backward;
- optimizer step hooks delimit the optimizer phase and find gradients and
  optimizer state; module hooks delimit the forward pass and the layers.

NOTE [Backward layer attribution]
Backward ops run inside autograd nodes, not modules. When a layer finishes its
forward, every autograd node reachable from its outputs that no earlier layer
claimed was created by it, so it is claimed for that layer (the walk stops at
claimed nodes, so the whole step costs one pass over the graph). In backward,
``torch._C._current_autograd_node()`` names the node an op runs in, and its
claim gives the layer. Nodes created outside every layer are claimed for
"no layer" when the next layer starts or when backward begins.

Known limitations: storages created by other threads or outside any op (a
DataLoader worker's batch, ``AccumulateGrad`` adopting a gradient buffer) are
seen when first used; kernel scratch buffers are invisible; the gradient seed
(``ones_like`` in ``loss.backward()``) runs before autograd's engine and is
recorded in the forward phase; on CUDA each op is timed between two device
synchronisations (kernel time; the profiled step runs slower).

NOTE [Compiled code under the tracer]
Dynamo does not compile under a dispatch mode: it marks each code object it
meets then as "skip", for the rest of the process, and a compiled model runs
eagerly ever after. The tracer runs its step under
``torch.compiler.set_stance("force_eager")``, which runs compiled functions
eagerly without asking dynamo (so nothing is marked), and restores the
program's stance when it stops: compiled code runs compiled again afterwards.
The trace is then that of the eager program, which saves other tensors than
the compiled one: a runtime traces compiled models with the allocation tracer
instead (NOTE [Tracing compiled code]).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from sentinel_hm.errors import SentinelError
from sentinel_hm.trace.layers import find_layers
from sentinel_hm.trace.model import Kind, LayerRecord, OpRecord, Phase, StorageRecord, Trace
from sentinel_hm.trace.sharded import GATHERED, has_sharded_parameters, local_tensor

_ACTIVE: Tracer | None = None


def active_tracer() -> Tracer | None:
    return _ACTIVE


@dataclass(slots=True)
class StorageDraft:
    """Mutable record of a storage while a tracer reads the step (both tracers)."""

    nbytes: int
    dtype: str
    device: str
    created_at: int | None
    freed_at: int | None = None
    saved: bool = False
    kind: Kind | None = None
    name: str | None = None
    before_forward: bool = False
    first_seen: int = 0  # the op at which the tracer first saw it


@dataclass(frozen=True, slots=True)
class _OpInfo:
    """What the tracer needs to know about an op overload, computed once per overload."""

    name: str
    skip: bool  # profiler markers (record_function) are not aten ops of the step
    written_args: tuple[tuple[int, str], ...]  # (position, name): in-place self, out=
    count_flops: Any

    @staticmethod
    def of(func: Any) -> _OpInfo:
        schema = func._schema
        return _OpInfo(
            name=str(schema.name),
            skip=func.namespace == "profiler",
            written_args=tuple(
                (i, a.name)
                for i, a in enumerate(schema.arguments)
                if a.alias_info is not None and a.alias_info.is_write
            ),
            count_flops=flop_registry.get(func._overloadpacket),
        )


def _in_backward() -> bool:
    """True inside an autograd node (e.g. a checkpointed layer recomputing its forward)."""
    return torch._C._current_autograd_node() is not None


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Tensors in an op's arguments or results (nested tuples, lists and dicts).

    Written out rather than `torch.utils._pytree`: this runs three times per op
    and aten arguments nest at most one level (``Tensor[]``).
    """
    out: list[torch.Tensor] = []
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list | tuple):
            stack.extend(reversed(x))
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
    return out


class _Mode(TorchDispatchMode):
    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self._tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._tracer._on_op(func, args, kwargs or {})


class Tracer:
    """One profiling session. Use `profile`, or `start_profile` / `end_profile`."""

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        layers: str | Sequence[nn.Module] | None = "auto",
        *,
        track_saved: bool = True,
        on_saved: Callable[[str, int, int], None] | None = None,
    ) -> None:
        """``track_saved=False`` leaves saved tensors to hooks of the caller's (a runtime being
        audited). ``on_saved(event, storage id, op clock)`` hears each ``"pack"`` and
        ``"unpack"`` of a saved tensor, so a runtime can learn where they happen."""
        self._model = model
        self._optimizers: list[torch.optim.Optimizer] = [optimizer] if optimizer else []
        self._ops: list[OpRecord] = []
        self._storages: list[StorageDraft] = []
        self._live: dict[int, int] = {}  # StorageImpl address -> storage id, while alive
        self._finalizers: dict[int, weakref.finalize] = {}
        self._op_info: dict[Any, _OpInfo] = {}
        self._clock = 0
        self._stage = Phase.OTHER  # forward / backward / other, as the step goes
        self._in_optimizer = 0
        self._forward_seen = False
        # layers: module layers, or explicit add_layer marks
        self._layer_names: list[tuple[str, str | None]] = []
        self._layer_stack: list[int | None] = [None]
        self._explicit = False
        self._node_layer: dict[Any, int | None] = {}
        self._handles: list[Any] = []
        self._mode = _Mode(self)
        self._on_saved = on_saved
        self._saved_hooks = (
            torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            if track_saved
            else contextlib.nullcontext()
        )
        self._resolve_layers(layers)
        if model is None:
            self._enter_forward()
        self._t0 = 0.0
        self._wall_s = 0.0
        self._stance: Any = None
        self._chunk_ops: list[int] = []  # first op of each optimizer chunk a runtime ran
        # NOTE [FSDP2]: gathered parameters' storages (address -> the parameter, its name)
        self._watched: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._watched_params: set[int] = set()
        self._module_names: dict[nn.Module, str] = {}
        # on CUDA an op's duration is taken around a synchronisation (kernel time, not launch
        # time); asking whether CUDA is initialised does not initialise it
        self._sync_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        device = next((p.device for p in model.parameters()), None) if model else None
        self._cuda_device = device if device is not None and device.type == "cuda" else None

    # -- session -------------------------------------------------------------------------------

    def start(self) -> None:
        global _ACTIVE
        if _ACTIVE is not None:
            raise SentinelError(
                "a profile is already running: call sh.end_profile() before starting another"
            )
        self._register_known_storages()
        self._install_hooks()
        _ACTIVE = self
        # NOTE [Compiled code under the tracer]
        self._stance = torch.compiler.set_stance("force_eager")
        self._saved_hooks.__enter__()
        self._mode.__enter__()
        self._t0 = time.perf_counter()

    def stop(self) -> Trace:
        global _ACTIVE
        self._wall_s = time.perf_counter() - self._t0
        self._stance.__exit__(None, None, None)  # the stance the program had
        if self._watched:
            self._poll_watched()  # FSDP2 frees the last gathered parameters after the step
        try:
            self._mode.__exit__(None, None, None)
        finally:
            self._saved_hooks.__exit__(None, None, None)
            _ACTIVE = None
            for h in self._handles:
                h.remove()
            self._handles.clear()
        self._register_known_storages()  # grads and optimizer state as they stand now
        for fin in self._finalizers.values():
            fin.detach()
        self._finalizers.clear()
        self._live.clear()
        self._node_layer.clear()
        return self._build()

    @property
    def next_op(self) -> int:
        """Index of the next op to be recorded: the clock for events between ops."""
        return len(self._ops)

    def at_next_op(self, fn: Callable[[int], None]) -> None:
        """Call ``fn`` with the index of the next op (a runtime's clock event)."""
        fn(len(self._ops))

    def mark_optimizer_chunk(self) -> None:
        """A runtime streaming the optimizer starts a chunk of parameters at the next op
        (``meta["optimizer_chunks"]``: the planner cuts the optimizer phase there)."""
        self._chunk_ops.append(len(self._ops))

    # -- layers --------------------------------------------------------------------------------

    def _resolve_layers(self, layers: str | Sequence[nn.Module] | None) -> None:
        if layers is None:
            return
        if isinstance(layers, str):
            if layers != "auto":
                raise SentinelError(
                    f"layers={layers!r} is not understood: use 'auto', a list of modules, "
                    "or None (layers marked with sh.add_layer only)"
                )
            if self._model is None:
                return
            found = find_layers(self._model)
        else:
            names = {}
            if self._model is not None:
                names = {id(m): n for n, m in self._model.named_modules()}
            found = [(names.get(id(m), type(m).__name__), m) for m in layers]
        for index, (name, module) in enumerate(found):
            self._layer_names.append((name, type(module).__name__))
            self._handles.append(module.register_forward_pre_hook(self._layer_pre_hook(index)))
            self._handles.append(module.register_forward_hook(self._layer_post_hook(index)))

    def _layer_pre_hook(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            if self._explicit or _in_backward():
                return
            self._enter_forward()
            self._claim(_tensors(args), self._layer_stack[-1])
            self._layer_stack.append(index)

        return hook

    def _layer_post_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._explicit or _in_backward():
                return
            self._claim(_tensors(output), index)
            if len(self._layer_stack) > 1:
                self._layer_stack.pop()

        return hook

    def mark_layer(self, x: torch.Tensor) -> None:
        """An ``add_layer`` mark: close the current layer, open the next."""
        if not self._explicit:
            self._switch_to_explicit()
        self._enter_forward()
        current = self._layer_stack[-1]
        assert current is not None
        self._claim([x], current)
        self._layer_stack[-1] = current + 1
        while len(self._layer_names) <= current + 1:
            self._layer_names.append((f"layer{len(self._layer_names)}", None))

    def _switch_to_explicit(self) -> None:
        """First ``add_layer`` mark: explicit marks replace automatic layers.

        Ops of the current forward pass so far belong to layer 0.
        """
        self._explicit = True
        self._layer_names = [("layer0", None)]
        self._layer_stack = [0]
        for k, op in enumerate(self._ops):
            if op.layer is not None or op.phase is Phase.FORWARD:
                self._ops[k] = replace(op, layer=0 if op.phase is Phase.FORWARD else None)
        for node in self._node_layer:
            self._node_layer[node] = 0

    def _claim(self, tensors: Iterable[torch.Tensor], layer: int | None) -> None:
        """Claim unclaimed autograd nodes reachable from ``tensors`` (NOTE above)."""
        self._claim_nodes([t.grad_fn for t in tensors if t.grad_fn is not None], layer)

    def _claim_nodes(self, stack: list[Any], layer: int | None) -> None:
        if not self._layer_names:
            return
        claimed = self._node_layer
        while stack:
            node = stack.pop()
            if node in claimed:
                continue
            claimed[node] = layer
            stack.extend(n for n, _ in node.next_functions if n is not None and n not in claimed)

    # -- phases --------------------------------------------------------------------------------

    def _enter_forward(self) -> None:
        if self._stage is not Phase.FORWARD:
            self._stage = Phase.FORWARD
            self._forward_seen = True
            if self._explicit:
                self._layer_stack = [0]  # a new micro-batch starts again at layer 0

    def _install_hooks(self) -> None:
        def forward_pre(module: nn.Module, args: Any) -> None:
            if not self._in_optimizer and not _in_backward():
                self._enter_forward()

        if self._model is not None:
            self._handles.append(self._model.register_forward_pre_hook(forward_pre))
            if has_sharded_parameters(self._model):  # NOTE [FSDP2]
                self._watched_params = {id(p) for p in self._model.parameters()}
                for name, module in self._model.named_modules():
                    self._module_names[module] = name
                    if module._parameters:
                        self._handles.append(
                            module.register_forward_pre_hook(self._watch_gathered))
        else:
            self._handles.append(nn.modules.module.register_module_forward_pre_hook(forward_pre))

        def opt_pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if optimizer not in self._optimizers:
                self._optimizers.append(optimizer)
            self._register_known_storages()
            self._in_optimizer += 1

        def opt_post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._in_optimizer -= 1
            self._register_optimizer(optimizer)

        self._handles.append(register_optimizer_step_pre_hook(opt_pre))
        self._handles.append(register_optimizer_step_post_hook(opt_post))

    def _context(self) -> tuple[Phase, int | None]:
        if self._in_optimizer:
            return Phase.OPTIMIZER, None
        node = torch._C._current_autograd_node()
        if node is not None:
            if self._stage is not Phase.BACKWARD:
                # Backward begins: what forward left unclaimed belongs to the current context.
                self._claim_nodes([node], self._layer_stack[-1] if self._explicit else None)
                self._stage = Phase.BACKWARD
            return Phase.BACKWARD, self._node_layer.get(node)
        if self._stage is Phase.BACKWARD:
            # Without a model to mark the forward pass, all that is not backward or the
            # optimizer belongs to the forward pass (of the next micro-batch, here).
            self._stage = Phase.OTHER
            if self._model is None:
                self._enter_forward()
        if self._stage is Phase.FORWARD:
            return Phase.FORWARD, self._layer_stack[-1]
        return Phase.OTHER, None

    # -- storages ------------------------------------------------------------------------------

    def _storage_id(self, t: torch.Tensor, created_at: int | None) -> int | None:
        """Our id for ``t``'s storage, registering it (created by op ``created_at``) if new."""
        try:
            storage = local_tensor(t).untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested, functional wrappers
            return None
        key = storage._cdata
        sid = self._live.get(key)
        if sid is not None:
            return sid
        sid = len(self._storages)
        self._storages.append(
            StorageDraft(
                nbytes=storage.nbytes(),
                dtype=str(t.dtype).removeprefix("torch."),
                device=str(t.device),
                created_at=created_at,
                before_forward=not self._forward_seen,
                first_seen=self._clock,
            )
        )
        self._live[key] = sid
        self._finalizers[key] = weakref.finalize(storage, self._on_free, key, sid)
        return sid

    def _on_free(self, key: int, sid: int) -> None:
        self._storages[sid].freed_at = self._clock
        self._live.pop(key, None)
        self._finalizers.pop(key, None)

    def _watch_gathered(self, module: nn.Module, args: Any) -> None:
        """NOTE [FSDP2]: a parameter on a running module that the model did not have when
        the step began is a gathered one; its storage is watched for resizes."""
        for pname, p in module._parameters.items():
            if p is None or id(p) in self._watched_params:
                continue
            self._watched_params.add(id(p))
            name = f"{self._module_names.get(module, '?')}.{pname}{GATHERED}"
            key = local_tensor(p).untyped_storage()._cdata
            self._watched[key] = (weakref.ref(p), name)
            self._poll_watched()
            sid = self._live.get(key)
            if sid is not None:
                # first seen before this hook (FSDP2 gathers ahead): it was allocated then
                record = self._storages[sid]
                if record.created_at is None and self._forward_seen:
                    record.created_at, record.before_forward = record.first_seen, False
                self._tag(p, Kind.PARAMETER, name)

    def _poll_watched(self) -> None:
        """NOTE [FSDP2]: gathered parameters' storages resized since the last op."""
        for key, (ref, name) in self._watched.items():
            p = ref()
            if p is None:
                continue
            nbytes = local_tensor(p).untyped_storage().nbytes()
            sid = self._live.get(key)
            if sid is not None and nbytes != self._storages[sid].nbytes:
                self._finalizers[key].detach()
                self._on_free(key, sid)
                sid = None
            if sid is None and nbytes:
                self._storage_id(p, self._clock)
                self._tag(p, Kind.PARAMETER, name)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        sid = self._storage_id(t, None)
        if sid is not None:
            self._storages[sid].saved = True
            if self._on_saved is not None:
                self._on_saved("pack", sid, self._clock)
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        if self._on_saved is not None:
            sid = self._storage_id(t, None)
            if sid is not None:
                self._on_saved("unpack", sid, len(self._ops))
        return t

    def _register_known_storages(self) -> None:
        """Name parameters, buffers, gradients and optimizer state that exist now."""
        if self._model is not None:
            for name, p in self._model.named_parameters(remove_duplicate=False):
                self._tag(p, Kind.PARAMETER, name)
                if p.grad is not None:
                    self._tag(p.grad, Kind.GRADIENT, f"{name}.grad")
            for name, b in self._model.named_buffers(remove_duplicate=False):
                self._tag(b, Kind.BUFFER, name)
        for opt in self._optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    self._tag(p, Kind.PARAMETER, None)
                    if p.grad is not None:
                        self._tag(p.grad, Kind.GRADIENT, None)
            self._register_optimizer(opt)

    def _register_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Name optimizer state ``state[i].key``: i counts parameters over the param groups,
        so a runtime finds the same tensor in a later step."""
        params = [p for group in opt.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    self._tag(value, Kind.OPTIMIZER_STATE, f"state[{i}].{key}")

    def tag_external(self, t: torch.Tensor, name: str) -> None:
        """Name a storage that exists before the step (e.g. a runtime's slow-tier arena),
        whatever else it holds (optimizer state kept in the arena, say)."""
        sid = self._storage_id(t, None)
        if sid is not None:
            self._storages[sid].kind = Kind.INPUT
            self._storages[sid].name = name

    def _tag(self, t: torch.Tensor, kind: Kind, name: str | None) -> None:
        sid = self._storage_id(t, None)
        if sid is None:
            return
        s = self._storages[sid]
        if s.kind is None or (s.kind is Kind.GRADIENT and kind is not Kind.GRADIENT):
            s.kind = kind  # a parameter's storage stays a parameter even if seen as a grad
        if s.name is None:
            s.name = name

    # -- the op hook ---------------------------------------------------------------------------

    def _on_op(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        info = self._op_info.get(func)
        if info is None:
            info = self._op_info[func] = _OpInfo.of(func)
        if info.skip:
            return func(*args, **kwargs)
        index = len(self._ops)
        self._clock = index
        if self._watched:
            self._poll_watched()
        phase, layer = self._context()
        if self._sync_cuda:  # device time, not launch time: a profile may be slower
            torch.cuda.synchronize(self._cuda_device)  # the model's GPU (None: current)
        written_args = [args[position] if position < len(args) else kwargs.get(name)
                        for position, name in info.written_args]
        written = _tensors(written_args)
        # NOTE [Versions under the tracer]: under a dispatch mode, ops that write a list of
        # tensors in place (``_foreach_mul_``, as clip_grad_norm_ and optimizers use) leave
        # their version counters unchanged (single-tensor in-place ops are counted after this
        # handler returns), which would blind autograd's check and the runtime's (a stale
        # copy would be swapped in): count those writes here
        listed = [t for arg in written_args if isinstance(arg, list | tuple) for t in arg
                  if isinstance(t, torch.Tensor)]
        versions = [t._version for t in listed]
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if self._sync_cuda:
            torch.cuda.synchronize(self._cuda_device)  # the model's GPU (None: current)
        duration = time.perf_counter() - start
        stale = [t for t, v in zip(listed, versions, strict=True) if t._version == v]
        if stale:
            torch.autograd.graph.increment_version(stale)

        reads: dict[int, None] = {}
        read_bytes = 0
        for t in _tensors((args, kwargs)):
            sid = self._storage_id(t, None)
            if sid is not None:
                reads[sid] = None
                read_bytes += t.numel() * t.element_size()
        writes: dict[int, None] = {}
        write_bytes = 0
        n_known = len(self._storages)
        for t in _tensors(out):
            sid = self._storage_id(t, index)
            if sid is not None and sid >= n_known:
                writes[sid] = None
                write_bytes += t.numel() * t.element_size()
        for t in written:
            sid = self._storage_id(t, None)
            if sid is not None and sid not in writes:
                writes[sid] = None
                write_bytes += t.numel() * t.element_size()

        flops = 0
        if info.count_flops is not None:
            try:
                flops = int(info.count_flops(*args, **kwargs, out_val=out))
            except Exception:  # an unusual signature: FLOPs are optional
                flops = 0
        self._ops.append(
            OpRecord(
                index=index,
                name=info.name,
                phase=phase,
                layer=layer,
                inputs=tuple(reads),
                outputs=tuple(writes),
                start_s=start - self._t0,
                duration_s=duration,
                read_bytes=read_bytes,
                write_bytes=write_bytes,
                flops=flops,
            )
        )
        return out

    # -- result --------------------------------------------------------------------------------

    def _build(self) -> Trace:
        storages = storage_records(self._storages)
        layers = tuple(
            LayerRecord(i, name, module_type)
            for i, (name, module_type) in enumerate(self._layer_names)
        )
        meta: dict[str, object] = {
            "torch_version": torch.__version__,
            "profiled_step_s": self._wall_s,
            "layer_source": "add_layer" if self._explicit else "modules",
        }
        if self._chunk_ops:
            meta["optimizer_chunks"] = list(self._chunk_ops)
        return Trace(tuple(self._ops), storages, layers, meta)


def storage_records(storages: Iterable[StorageDraft]) -> tuple[StorageRecord, ...]:
    """The records of a step's storages; a storage nothing named is saved for backward, an
    input (there before the step, or the forward pass), or a temporary."""
    out = []
    for sid, s in enumerate(storages):
        if s.kind is not None:
            kind = s.kind
        elif s.saved:
            kind = Kind.SAVED_ACTIVATION
        elif s.created_at is None or s.before_forward:
            kind = Kind.INPUT
        else:
            kind = Kind.TEMPORARY
        out.append(StorageRecord(id=sid, nbytes=s.nbytes, dtype=s.dtype, device=s.device,
                                 kind=kind, created_at=s.created_at, freed_at=s.freed_at,
                                 saved=s.saved, name=s.name))
    return tuple(out)

"""FSDP2 (``fully_shard``) under Sentinel: what the runtime moves is each rank's local shards,
and where FSDP2 reads them itself they are fast first. See NOTE [FSDP2] in
``trace/sharded.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from sentinel_hm.errors import SentinelError
from sentinel_hm.runtime.steady import SteadyStep
from sentinel_hm.trace.sharded import local_tensor, with_local


def refuse_offload(model: nn.Module) -> None:
    """With its CPUOffloadPolicy, FSDP2 keeps the shards, their gradients and the optimizer
    state in host memory and updates them there itself; refused before anything runs."""
    from torch.distributed.fsdp import FSDPModule

    for name, module in model.named_modules():
        if isinstance(module, FSDPModule) and any(
                fp.offload_to_cpu for group in module._get_fsdp_state()._fsdp_param_groups
                for fp in group.fsdp_params):
            raise SentinelError(
                f"{name or 'the model'} is sharded by fully_shard with a CPUOffloadPolicy: "
                "FSDP2 then keeps the parameter shards, their gradients and the optimizer "
                "state in host memory and updates them there itself, the tensors Sentinel "
                "would move. Give fully_shard no offload_policy and let Sentinel move them "
                "ahead of need, or train with FSDP2's offloading and without Sentinel")


def groups(model: nn.Module) -> dict[int, set[int]]:
    """id() of each sharded parameter -> id() of every parameter of its FSDP2 group (their
    gradients are views of one reduce-scatter output)."""
    from torch.distributed.fsdp import FSDPModule

    out: dict[int, set[int]] = {}
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                members = {id(fp.sharded_param) for fp in group.fsdp_params}
                out.update(dict.fromkeys(members, members))
    return out


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """A sharded parameter's gradient, by its local shard (a view of its group's
    reduce-scatter output)."""
    return None if param.grad is None else local_tensor(param.grad)


def local_of(state: dict[str, Any], key: str) -> torch.Tensor | None:
    """A sharded state tensor moves by its local shard."""
    value = state.get(key)
    return local_tensor(value) if isinstance(value, torch.Tensor) else None


def put_local(state: dict[str, Any], key: str, local: torch.Tensor) -> None:
    """The state's DTensor again, over ``local`` (its shard's new place)."""
    state[key] = with_local(state[key], local)


def gathered_hooks(model: nn.Module, remember: Callable[[torch.Tensor], None]) -> list[Any]:
    """The parameters FSDP2 gathers onto a module as it runs are parameters too (the profile
    saw them so): ``remember`` marks each as never copied when its module starts."""

    def gathered(module: nn.Module, _args: Any) -> None:
        for p in module._parameters.values():
            if p is not None:
                remember(p)

    return [m.register_forward_pre_hook(gathered) for m in model.modules() if m._parameters]


def guards(model: nn.Module, run: SteadyStep, shard_sid: dict[int, int],
           grad_sid: dict[int, int]) -> list[Any]:
    """FSDP2 reads a group's shards when it gathers them, and its gradients when it
    accumulates into them (after a second backward pass) or when backward ends (a clip of
    the gradients may follow): moved in place, they are complete in fast memory first.
    FSDP2 calls these methods on its objects, so a wrapper set on the object sees every
    call; removing it leaves FSDP2 as it was. ``shard_sid``/``grad_sid``: id() of a
    parameter -> the trace storage of its moving shard / gradient."""
    from torch.distributed.fsdp import FSDPModule

    undo: list[Any] = []

    def wrap(obj: Any, method: str, before: Callable[[], None] | None,
             after: Callable[[], None] | None = None) -> None:
        original = getattr(obj, method)

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if before is not None:
                before()
            try:
                return original(*args, **kwargs)
            finally:
                if after is not None:
                    after()

        setattr(obj, method, guarded)
        undo.append(_Unwrap(obj, method))

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        for group in state._fsdp_param_groups:
            params = [id(fp.sharded_param) for fp in group.fsdp_params]
            shards = [shard_sid[p] for p in params if p in shard_sid]
            grads = [grad_sid[p] for p in params if p in grad_sid]
            if shards:
                wrap(group, "unshard", partial(run.module_pre_forward, shards))
            if grads:
                wrap(group, "post_backward", partial(run.hold, grads),
                     partial(run.let_go, grads))
        if module is model and grad_sid:
            wrap(state, "_root_post_backward_final_callback", None,
                 run.restore_resized)  # after: it may run groups' post_backward
    return undo


@dataclass
class _Unwrap:
    """Removes a wrapper set on an object (`guards`), as a hook handle does."""

    obj: Any
    method: str

    def remove(self) -> None:
        self.obj.__dict__.pop(self.method, None)

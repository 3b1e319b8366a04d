"""Sharded tensors (FSDP2's DTensors): their bytes are their local shards.

A DTensor is a wrapper subclass: its own storage is a placeholder without data
(``data_ptr()`` raises), and its bytes on this rank are those of its local shard.
Everything that counts or copies bytes uses `local_tensor`.

NOTE [FSDP2]
``fully_shard`` keeps each parameter as a DTensor (its shard) between
forward and backward, and registers a gathered, unsharded parameter on the
module while the module runs. The gathered parameter's storage is allocated
and freed by resizing it (``UntypedStorage.resize_``), which no dispatch mode
sees: the tracer polls those storages before each op (a resize to zero frees
them, a resize back is a new storage). FSDP2 owns them, as it owns the shards
and their gradients: a runtime moves none of them. It moves the saved
activations and the optimizer state's local shards (a state DTensor is rebuilt
over its shard's new place, `with_local`); the update then runs unstreamed.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes on this rank: the local shard of a DTensor, else ``t``.

    ``DTensor._local_tensor``, not ``to_local()``: the latter is an autograd function, which
    would itself dispatch ops (into the tracer, when one is running)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def is_sharded(t: object) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def with_local(t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """A DTensor like ``t`` (mesh, placements, global shape and stride) over ``local``."""
    assert DTensor is not None and isinstance(t, DTensor)
    with torch.no_grad():
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded DTensors (FSDP2's ``fully_shard``)."""
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())

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
them, a resize back is a new storage). FSDP2 owns them: a runtime moves none
of them. It moves the saved activations, the optimizer state's local shards (a
state DTensor is rebuilt over its shard's new place, `with_local`), and the
parameter shards and gradients in place (`ResizedEntry`): FSDP2 keeps views of
a shard (``_sharded_param_data``, the DTensor's local tensor), and a group's
gradients are views of one reduce-scatter output, so their storage is copied
out and resized to nothing, and resized and filled when it comes back. The
runtime wraps, on FSDP2's own objects and for one step, the methods that read
them: a group's ``unshard`` (the all-gather reads the shards; they come back
first), its ``post_backward`` (it adds a second micro-batch's gradients into
the kept ones, and hands out views one by one: nothing leaves meanwhile) and
the root's end-of-backward callback (everything comes back for a gradient clip
or the update, which streams chunk by chunk). Between steps every shard and
gradient is back in fast memory. A read by other code of a storage resized to
nothing would fail (or crash in a kernel): the wrapped methods are the reads
FSDP2 makes. ``CPUOffloadPolicy`` is refused: FSDP2 then moves these tensors
itself.
"""

from __future__ import annotations

import torch
from torch import nn

GATHERED = " (gathered)"  # the suffix of a gathered parameter's storage name in a trace

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

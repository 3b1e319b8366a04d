"""Layers found in a model's module tree (marks made with ``add_layer`` are in marks.py).

Automatic detection (`find_layers`). A *block container* is an ``nn.ModuleList``
or ``nn.Sequential`` with at least two non-leaf entries of the same class (the
repeated blocks of a transformer or ResNet stage). The layers are the model's
top-level children, where each block container is replaced by its entries and
each module that holds a block container further down is replaced by its own
children, recursively. Entries of a block container are not split further, unless an entry is itself a
block container (a sequence of stages, each a sequence of blocks): then its
entries are layers.
So a GPT gives ``[tok_emb, pos_emb, drop, blocks.0, ..., blocks.N-1, ln_f,
head]`` and a ResNet gives its stem modules, every residual block, then the
pool and the classifier. A model with no block container gives its top-level
children; a model without children is one layer.
"""

from __future__ import annotations

from collections import Counter

from torch import nn


def _is_block_container(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList | nn.Sequential):
        return False
    classes = Counter(type(m) for m in module.children() if next(m.children(), None) is not None)
    return any(count >= 2 for count in classes.values())


def _holds_block_container(module: nn.Module) -> bool:
    return any(_is_block_container(m) for m in module.modules())


def find_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers as ``(qualified name, module)``, in registration order."""

    def entries(prefix: str, container: nn.Module) -> list[tuple[str, nn.Module]]:
        """A block container's entries; an entry that is itself a block container (a ResNet
        kept as a Sequential of stages, each a Sequential of blocks) gives its entries."""
        out: list[tuple[str, nn.Module]] = []
        for name, entry in container.named_children():
            qualified = f"{prefix}.{name}"
            out.extend(entries(qualified, entry) if _is_block_container(entry)
                       else [(qualified, entry)])
        return out

    def expand(prefix: str, module: nn.Module) -> list[tuple[str, nn.Module]]:
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if _is_block_container(child):
                out.extend(entries(qualified, child))
            elif _holds_block_container(child):
                out.extend(expand(f"{qualified}.", child))
            else:
                out.append((qualified, child))
        return out

    layers = expand("", model)
    return layers or [(type(model).__name__, model)]

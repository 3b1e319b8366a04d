"""A model that marks its own layers with ``sh.add_layer`` (the original Sentinel's API), and a
profile of one step without any model hooks: ``sh.start_profile()`` / ``sh.end_profile()``.

    python examples/custom_layers.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import sentinel_hm as sh
from sentinel_hm.report import summarize


class Tower(torch.nn.Module):
    """Layers are not modules here, so they are marked in forward."""

    def __init__(self, width: int = 256, depth: int = 6) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(width, width) / width**0.5) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for i, w in enumerate(self.weights):
            if i:
                x = sh.add_layer(x)  # the boundary between layer i-1 and layer i
            x = torch.tanh(x @ w)
        return F.mse_loss(x, y)


def main() -> None:
    torch.manual_seed(0)
    model = Tower()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(1024, 256), torch.randn(1024, 256)

    sh.start_profile()  # seed-style: profile whatever runs until end_profile()
    model(x, y).backward()
    optimizer.step()
    optimizer.zero_grad()
    trace = sh.end_profile()
    print(summarize(trace))

    # the same model under Sentinel: add_layer marks give it its layers
    sentinel = sh.Sentinel(model, optimizer, fast_memory="min")
    for _ in range(8):
        with sentinel.step():
            model(x, y).backward()
            optimizer.step()
            optimizer.zero_grad()
    stats = sentinel.stats()
    print(f"\nwith Sentinel: layers from {sentinel.trace.meta['layer_source']}, budget "
          f"{stats['budget_bytes']:,} B of {stats['all_fast_peak_bytes']:,} B, measured peak "
          f"{stats['audited_peak_fast_bytes']:,} B")
    sentinel.close()


if __name__ == "__main__":
    main()

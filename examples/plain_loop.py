"""Train the reference GPT with Sentinel in an ordinary training loop.

    python examples/plain_loop.py [--size small] [--steps 20] [--fast-memory 25%]
"""

from __future__ import annotations

import argparse

import torch

import sentinel_hm as sh
from sentinel_hm.workloads import make_workload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fast-memory", default="min", help='bytes, "512MiB", "25%%" or "min"')
    args = p.parse_args()

    torch.manual_seed(0)
    wl = make_workload("gpt", size=args.size)  # model(*batch) returns the loss
    model, optimizer = wl.model, wl.optimizer
    sentinel = sh.Sentinel(model, optimizer, fast_memory=args.fast_memory)
    for step in range(args.steps):
        batch = wl.make_batch()
        with sentinel.step():
            loss = model(*batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        print(f"step {step:3d}  loss {loss.item():.4f}  phase {sentinel.stats()['phase']}")
    stats = sentinel.stats()
    print(f"budget {stats['budget_bytes']:,} B of a {stats['all_fast_peak_bytes']:,} B peak; "
          f"measured peak {stats['audited_peak_fast_bytes']:,} B")
    sentinel.close()


if __name__ == "__main__":
    main()

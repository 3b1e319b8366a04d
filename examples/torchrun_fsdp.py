"""Train a small transformer with FSDP2 (``fully_shard``) and Sentinel, one process per rank.

    torchrun --nproc-per-node 2 examples/torchrun_fsdp.py [--steps 12] [--fast-memory 50%]

On CPUs the ranks talk over gloo; with one GPU per rank, over NCCL. FSDP2 shards the
parameters, gradients and optimizer state; Sentinel moves each rank's saved activations
and the local shards of parameters, gradients and optimizer state (NOTE [FSDP2] in
sentinel_hm/trace/sharded.py), with a budget of its own per rank.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import sentinel_hm as sh


class Classifier(nn.Module):
    def __init__(self, width: int = 128, layers: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width,
                                       dropout=0.0, batch_first=True)
            for _ in range(layers))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return nn.functional.cross_entropy(self.head(x.mean(dim=1)), y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--fast-memory", default="50%", help='bytes, "512MiB", "50%%" or "min"')
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun: torchrun --nproc-per-node 2 "
                         "examples/torchrun_fsdp.py")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    torch.manual_seed(0)  # the same initial weights on every rank, then sharded
    model = Classifier().to(device)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():  # the one that says what FSDP2 keeps: printed below
        warnings.simplefilter("ignore")
        sentinel = sh.Sentinel(model, optimizer, fast_memory=args.fast_memory)
    gen = torch.Generator().manual_seed(rank)  # each rank its own data
    for step in range(args.steps):
        x = torch.randn(args.batch, 64, 128, generator=gen).to(device)
        y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        if step == args.steps - 1:
            sentinel.audit()  # measure the last step's peak of fast memory
        with sentinel.step():
            loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  phase {sentinel.stats()['phase']}")
    stats = sentinel.stats()
    print(f"rank {rank}: budget {stats['budget_bytes']:,} B of a "
          f"{stats['all_fast_peak_bytes']:,} B peak; measured peak "
          f"{stats['audited_peak_fast_bytes']:,} B; moved "
          f"{stats['bytes_to_slow_per_step']:,} B out per step", flush=True)
    sentinel.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""``numa`` tiers: the seed's setting, fast memory on one NUMA node and slow on another.

The slow arena is an anonymous mmap bound to the slow node with ``mbind``
before any page is touched, then faulted in; tensors over it are zero-copy
views (``torch.frombuffer``). Ops read slow data in place (direct access).
Fast-tier buffers are ordinary allocations, which the kernel places on the
node the process runs on (run the job bound to the fast node, e.g. with
``numactl --cpunodebind=0 --membind=0``). Syscalls go through ``ctypes``;
``pages_nodes`` asks ``move_pages`` where pages are, so placement can be
verified. See PITFALLS.md for what single-node machines answer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import platform
from pathlib import Path

import torch

from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.errors import SentinelError
from sentinel_hm.tiers.host import HostTiers

# syscall numbers: x86-64 (arch/x86/entry/syscalls/syscall_64.tbl) and the generic table
# used by aarch64 (include/uapi/asm-generic/unistd.h)
_SYSCALLS = {
    "x86_64": {"mbind": 237, "move_pages": 279},
    "aarch64": {"mbind": 235, "move_pages": 239},
}
_MPOL_BIND = 2
_MPOL_MF_STRICT = 1
_NODE_ROOT = Path("/sys/devices/system/node")


def numa_nodes(root: Path = _NODE_ROOT) -> list[int]:
    """The NUMA nodes this machine has (``[0]`` where the kernel shows none)."""
    nodes = sorted(int(p.name[4:]) for p in root.glob("node[0-9]*") if p.name[4:].isdigit())
    return nodes or [0]


def _syscall(name: str, *args: object) -> int:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise SentinelError(f"numa tiers know the syscalls of {', '.join(_SYSCALLS)}, not "
                            f"{platform.machine()}: use tiers='host'")
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(numbers[name], *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def bind(buffer: mmap.mmap, node: int) -> None:
    """Bind the (untouched) pages of ``buffer`` to ``node``."""
    mask = (ctypes.c_ulong * 2)(0, 0)
    mask[node // 64] |= 1 << (node % 64)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    _syscall("mbind", ctypes.c_void_p(address), ctypes.c_ulong(len(buffer)),
             ctypes.c_int(_MPOL_BIND), mask, ctypes.c_ulong(128 + 1),
             ctypes.c_uint(_MPOL_MF_STRICT))


def pages_nodes(t: torch.Tensor) -> list[int]:
    """The node of each page under ``t`` (negative: -errno, e.g. -ENOENT for untouched)."""
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    addresses = list(range(start, end, page))
    n = len(addresses)
    pages = (ctypes.c_void_p * n)(*addresses)
    status = (ctypes.c_int * n)()
    _syscall("move_pages", ctypes.c_int(0), ctypes.c_ulong(n), pages, None, status,
             ctypes.c_int(0))
    return list(status)


class NumaTiers(HostTiers):
    def __init__(self, fast_node: int, slow_node: int, nodes: list[int] | None = None) -> None:
        super().__init__(Access.DIRECT)
        nodes = numa_nodes() if nodes is None else nodes
        for node in (fast_node, slow_node):
            if node not in nodes:
                others = "numa:0,0 (both tiers on node 0)" if nodes == [0] else \
                    f"numa:{nodes[0]},{nodes[-1]}"
                raise SentinelError(
                    f"tiers='numa:{fast_node},{slow_node}' needs NUMA node {node}, but this "
                    f"machine has {len(nodes)} node{'s' if len(nodes) > 1 else ''} "
                    f"({', '.join(map(str, nodes))}): use tiers='host' (two arenas in ordinary "
                    f"memory) or tiers='{others.split(' ')[0]}'"
                )
        self.fast_node, self.slow_node = fast_node, slow_node
        self.name = f"numa (fast node {fast_node}, slow node {slow_node}, direct access)"
        self._map: mmap.mmap | None = None

    @staticmethod
    def parse(options: str) -> NumaTiers:
        """``fast,slow`` node numbers, e.g. ``0,1``."""
        parts = options.split(",")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise SentinelError(f"tiers='numa:{options}' is not understood: give the fast node "
                                "then the slow node, e.g. tiers='numa:0,1'")
        return NumaTiers(int(parts[0]), int(parts[1]))

    def reserve(self, nbytes: int) -> None:
        size = max(nbytes, 1)
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, size)
        bind(self._map, self.slow_node)  # before the first touch: pages are born on the node
        self._arena = torch.frombuffer(self._map, dtype=torch.uint8)
        self._arena.zero_()  # fault every page in now, on the slow node

    def hardware(self) -> Hardware:
        return dataclasses.replace(super().hardware(), name=self.name, access=Access.DIRECT)

    def close(self) -> None:
        self._arena = None
        # the mmap closes once no tensor views it any more
        self._map = None

"""NUMA tiers: what a one-node machine can check, and training on numa:0,0."""

from __future__ import annotations

import errno
import mmap
import platform

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.tiers import open_tiers
from sentinel_hm.tiers.numa import NumaTiers, bind, numa_nodes, pages_nodes

from ..runtime.test_sentinel import assert_same, train

linux_x86_or_arm = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"),
    reason="NUMA syscalls through ctypes are wired for Linux on x86-64 and aarch64",
)


def test_nodes_are_read_from_sysfs(tmp_path):
    for name in ("node0", "node1", "node3", "has_cpu"):
        (tmp_path / name).mkdir()
    assert numa_nodes(tmp_path) == [0, 1, 3]
    assert numa_nodes(tmp_path / "missing") == [0]  # no sysfs: one node
    assert 0 in numa_nodes()


def test_a_missing_node_is_refused_with_what_to_use():
    with pytest.raises(sh.SentinelError,
                       match=r"needs NUMA node 1, but this machine has 1 node \(0\): use "
                             r"tiers='host' .* or tiers='numa:0,0'"):
        NumaTiers(0, 1, nodes=[0])
    with pytest.raises(sh.SentinelError, match="numa:0,3"):
        NumaTiers(0, 2, nodes=[0, 1, 3])
    for bad in ("numa:0", "numa:a,b", "numa:0,1,2"):
        with pytest.raises(sh.SentinelError, match="fast node then the slow node"):
            open_tiers(bad)


@linux_x86_or_arm
def test_arena_pages_live_on_the_bound_node():
    tiers = open_tiers("numa:0,0")
    tiers.reserve(3 * mmap.PAGESIZE + 1)
    arena = tiers.arena()
    assert arena is not None
    assert set(pages_nodes(arena)) == {0}
    tiers.close()


@linux_x86_or_arm
def test_untouched_pages_and_absent_nodes():
    buffer = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    view = torch.frombuffer(buffer, dtype=torch.uint8)
    assert set(pages_nodes(view)) == {-errno.ENOENT}  # not faulted in yet
    if 1 not in numa_nodes():
        with pytest.raises(OSError):
            bind(buffer, 1)  # the kernel refuses a node that does not exist
    del view


@linux_x86_or_arm
def test_training_on_numa_0_0_is_bitwise_equal():
    plain = train("cnn", None)
    ours = train("cnn", "min", tiers="numa:0,0")
    assert_same(plain[0], ours[0])
    assert_same(plain[1], ours[1])
    stats = ours[2].stats()
    assert stats["tiers"].startswith("numa (fast node 0, slow node 0")
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    assert stats["bytes_to_slow_per_step"] > 0


def test_auto_never_picks_numa():
    assert not open_tiers("auto").name.startswith("numa")

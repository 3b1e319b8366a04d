"""NOTE [Allocator peak]: the GPU audit's peak from the caching allocator's trace entries (the
arithmetic runs anywhere; reading the entries needs a GPU: tests/gpu)."""

from __future__ import annotations

from sentinel_hm.tiers.cuda import active_peak


def _e(action: str, addr: int, size: int) -> dict:
    return {"action": action, "addr": addr, "size": size}


def test_a_block_counts_until_its_free_completes_not_when_it_is_requested():
    # freed by the program while a side stream still copies from it (record_stream): the
    # block is active until the free completes, and the next allocation comes on top
    entries = [_e("alloc", 1, 1000), _e("alloc", 2, 600), _e("free_requested", 1, 1000),
               _e("alloc", 3, 2048), _e("free_completed", 1, 1000), _e("alloc", 4, 512)]
    # 4096 + 1024 + 1024 + 2048 at the third allocation
    assert active_peak(entries, 4096) == 4096 + 1024 + 1024 + 2048


def test_sizes_round_to_blocks_and_frees_of_older_blocks_count():
    entries = [_e("free_completed", 9, 3000), _e("alloc", 1, 1), _e("segment_alloc", 7, 1 << 21)]
    # the older block (3072 rounded) leaves; the 1-byte allocation takes a 512-byte block;
    # segments are reserved memory, not active bytes
    assert active_peak(entries, 10_000) == 10_000
    assert active_peak([_e("alloc", 1, 1)], 0) == 512

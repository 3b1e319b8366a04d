"""The host-overhead benchmark (benchmarks/bench_overhead.py) in its quick mode (one timed and
one counted steady step per row), on one budget, both kinds of tiers and a 4-layer model, so that a broken benchmark is caught here: every row measured (calls,
wall and optimizer time of steady steps, top functions), and the report written with its
targets. It checks that the figures exist and are sane, not that the targets are met (the
benchmark measures the runtime; issue 23 decides its targets)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_overhead_benchmark_quick(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_overhead as bench
    from _common import environment

    rows = bench.run_all(steps=1, count_steps=1, tiers=("host", "racing"), budgets=("50%",),
                         layers=4)  # the benchmark's 12, cut to keep the test short
    assert [(r["tiers"], r["budget"]) for r in rows] == [("host", "50%"), ("racing", "50%")]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["phase"] == "steady" and r["mismatches"] == 0
        assert r["steady_pairs"] == 1 and r["counted_steps"] == 1
        assert 1000 < r["plain_calls"] < r["calls"]  # Sentinel's hooks add calls
        assert r["plain_py_calls"] < r["plain_calls"] and r["py_calls"] < r["calls"]
        assert r["step_s"] > 0 and r["plain_step_s"] > 0
        assert r["optimizer_s"] > 0 and r["plain_optimizer_s"] > 0
        assert len(r["top"]) == bench.TOP and len(r["plain_top"]) == bench.TOP
        assert r["top_runtime"] and all("sentinel_hm" in t["function"] for t in r["top_runtime"])
        assert r["bytes_to_slow_per_step"] > 0  # 50% binds: something moves
    args = argparse.Namespace(steps=1, count_steps=1, quick=True)
    env = environment(transformers="test", commit="test")
    lines = bench.report(args, env, rows)
    text = "\n".join(lines)
    assert "| host | 50% |" in text and "| racing | 50% |" in text
    assert text.count("calls per steady step at most x3") == 2
    assert "## Where the calls go" in text
    # the racing tiers' patch is undone: a later Sentinel opens the host tiers again
    from sentinel_hm.runtime import manager

    assert manager.open_tiers.__name__ == "open_tiers"
    assert manager.open_tiers.__module__ != bench.__name__

"""``sentinel plan``, ``simulate`` and ``min-budget``, run through the real entry point."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import sentinel_hm
from sentinel_hm.cli.main import main
from sentinel_hm.cli.min_budget_cmd import parse_share
from sentinel_hm.cli.simulate_cmd import expand_budgets
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.planner import context, min_budget
from sentinel_hm.planning.policies import POLICIES
from sentinel_hm.units import format_bytes
from sentinel_hm.workloads import make_workload


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One profiled step of the tiny MLP, shared by every test here (profiling is the slow part)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        wl = make_workload("mlp", "tiny")
        wl.step()
        trace = sentinel_hm.profile(wl.step, model=wl.model, optimizer=wl.optimizer)
    finally:
        torch.set_num_threads(threads)
    return sentinel_hm.save_trace(trace, tmp_path_factory.mktemp("trace") / "t.json")


def _table(out: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the slowdown table (columns are 2+ spaces apart)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("------"))
    split = [re.split(r"\s{2,}", line.strip()) for line in lines[rule - 1:]]
    header = split[0]
    rows = []
    for cells in split[2:]:
        if len(cells) != len(header):
            break  # the notes under the table
        rows.append(cells)
    return header, rows


# --- plan ---------------------------------------------------------------------------------


def test_plan_writes_a_loadable_plan_and_a_summary(trace_path, tmp_path, capsys):
    out, chrome = tmp_path / "plan.json", tmp_path / "sim.json"
    code = main(["plan", str(trace_path), "--hardware", "h100-sxm", "--budget", "80%",
                 "--out", str(out), "--chrome", str(chrome)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = sentinel_hm.load_plan(out)
    trace = sentinel_hm.load_trace(trace_path)
    assert plan.policy == "sentinel" and plan.hardware == "h100-sxm"
    assert plan.budget_bytes == round(trace.peak_bytes * 0.8)
    assert json.loads(chrome.read_text())["traceEvents"]
    summary = captured.out
    for needle in ("policy sentinel", "h100-sxm", f"{plan.budget_bytes:,} B", "80.0% of the peak",
                   f"moves: {len(plan.moves)}", "to fast", "to slow", "simulated step",
                   "over all-fast", "peak fast", *(f"{key}:" for key in plan.info)):
        assert needle in summary, needle
    result = sentinel_hm.simulate(trace, plan, "h100-sxm")
    assert f"peak fast {format_bytes(result.peak_fast_bytes)}" in summary
    assert f"wrote {out}" in captured.err


def test_plan_with_a_baseline_policy_and_gzip(trace_path, tmp_path, capsys):
    out = tmp_path / "plan.json.gz"
    assert main(["plan", str(trace_path), "--hardware", "dram-optane", "--budget", "50%",
                 "--policy", "first-touch", "--out", str(out)]) == 0
    assert sentinel_hm.load_plan(out).policy == "first-touch"
    assert "policy first-touch on dram-optane" in capsys.readouterr().out


def test_plan_names_the_recomputed_layers_with_their_bytes_and_rerun_time(tmp_path, capsys):
    from tests.planning.test_recompute import blocks  # layers whose saves only they use
    from tests.planning.tracegen import MiB

    trace_path = sentinel_hm.save_trace(blocks(3, [MiB], 64 * 1024, [1e-4]), tmp_path / "t.json")
    out = tmp_path / "plan.json"
    assert main(["plan", str(trace_path), "--hardware", "h100-sxm", "--budget", "100%",
                 "--policy", "checkpoint-all", "--out", str(out)]) == 0
    plan = sentinel_hm.load_plan(out)
    assert plan.recompute
    line = next(x for x in capsys.readouterr().out.splitlines()
                if x.startswith("recomputed layers"))
    assert line.count("saved, rerun") == len(plan.recompute), line


def test_plan_says_where_the_plan_peaks_and_refusals_where_the_smallest_does(trace_path,
                                                                            tmp_path, capsys):
    trace = sentinel_hm.load_trace(trace_path)

    def where(op: int) -> str:
        record = trace.ops[op]
        layer = "no layer" if record.layer is None else f"layer {trace.layers[record.layer].name}"
        return f"op {op} ({record.name}, {record.phase.value}, {layer}): "

    out = tmp_path / "plan.json"
    assert main(["plan", str(trace_path), "--hardware", "h100-sxm", "--budget", "60%",
                 "--out", str(out)]) == 0
    result = sentinel_hm.simulate(trace, sentinel_hm.load_plan(out), "h100-sxm")
    peak_op = result.fast_bytes.index(result.peak_fast_bytes)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("peak: "))
    assert line.startswith(f"peak: {where(peak_op)}{format_bytes(result.peak_fast_bytes)} fast = ")
    assert " is activations: " in line or " is model state: " in line

    assert main(["plan", str(trace_path), "--hardware", "h100-sxm", "--budget", "1KiB",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    need = min_budget(context(trace, "h100-sxm"), "sentinel")
    smallest = sentinel_hm.simulate(trace, sentinel_hm.plan(trace, "h100-sxm", need), "h100-sxm")
    op = smallest.fast_bytes.index(smallest.peak_fast_bytes)
    peak = format_bytes(smallest.peak_fast_bytes)
    assert f"the smallest plan peaks at {where(op)}{peak} fast = " in err[0]


# --- simulate -----------------------------------------------------------------------------


def test_simulate_table(trace_path, capsys):
    budgets = ["10%", "50%", "90%", "100%"]
    assert main(["simulate", str(trace_path), "--hardware", "h100-sxm",
                 "--budgets", ",".join(budgets), "--policies", "all"]) == 0
    out = capsys.readouterr().out
    header, rows = _table(out)
    assert header == ["budget", "fast bytes", *POLICIES]
    assert [r[0] for r in rows] == budgets
    col = {p: header.index(p) for p in POLICIES}
    assert rows[-1][col["all-fast"]] == "1.00"
    assert all(r[col["all-fast"]] == "refused" for r in rows[:-1])
    assert all(r[col["first-touch"]] == "n/a" for r in rows)  # h100-sxm migrates
    assert rows[-1][col["sentinel"]] == "1.00"  # sentinel at the peak is all-fast
    for r in rows:
        for cell in r[2:]:
            assert cell in ("refused", "n/a") or float(cell) >= 0.99


def test_simulate_expands_a_range_and_keeps_the_policies_given(trace_path, capsys):
    assert main(["simulate", str(trace_path), "--hardware", "dram-optane",
                 "--budgets", "20%,40%,...,100%", "--policies", "sentinel,all-fast"]) == 0
    header, rows = _table(capsys.readouterr().out)
    assert header[2:] == ["sentinel", "all-fast"]
    assert [r[0] for r in rows] == ["20%", "40%", "60%", "80%", "100%"]


def test_expand_budgets():
    assert expand_budgets("10%,20%,...,100%") == [f"{p}%" for p in range(10, 101, 10)]
    assert expand_budgets("5%, 10%,20%,...,40%,75%") == ["5%", "10%", "20%", "30%", "40%", "75%"]
    assert expand_budgets("0.5%,1%,...,2%") == ["0.5%", "1%", "1.5%", "2%"]
    assert expand_budgets("1GiB,2GiB,...,4GiB") == ["1GiB", "2GiB", str(3 * 2**30), "4GiB"]
    for bad in ("10%,...,100%", "10%,20%,...,95%", "20%,10%,...,100%", "10%,1GiB,...,2GiB",
                "10%,,20%", "10%,20%,..."):
        with pytest.raises(SentinelError):
            expand_budgets(bad)


def test_simulate_json(trace_path, tmp_path, capsys):
    path = tmp_path / "table.json"
    assert main(["simulate", str(trace_path), "--hardware", "h100-sxm", "--budgets", "10%,100%",
                 "--policies", "all-fast,first-touch,sentinel", "--json", str(path)]) == 0
    capsys.readouterr()
    data = json.loads(path.read_text())
    trace = sentinel_hm.load_trace(trace_path)
    assert data["hardware"] == "h100-sxm"
    assert data["policies"] == ["all-fast", "first-touch", "sentinel"]
    assert data["all_fast_peak_bytes"] == trace.peak_bytes and data["all_fast_step_s"] > 0
    assert [r["budget"] for r in data["rows"]] == ["10%", "100%"]
    low, full = data["rows"]
    assert full["budget_bytes"] == trace.peak_bytes
    assert low["cells"]["all-fast"]["status"] == "refused"
    assert "cannot honour" in low["cells"]["all-fast"]["reason"]
    assert low["cells"]["first-touch"]["status"] == "n/a"
    cell = full["cells"]["all-fast"]
    assert cell["status"] == "ok" and cell["slowdown"] == 1.0
    assert cell["peak_fast_bytes"] == trace.peak_bytes
    assert full["cells"]["sentinel"]["slowdown"] == pytest.approx(1.0)


def test_simulate_plot(trace_path, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "slowdown.png"
    assert main(["simulate", str(trace_path), "--hardware", "dram-optane", "--budgets",
                 "25%,50%,...,100%", "--plot", str(png), "--log-y"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in capsys.readouterr().err


def test_simulate_plot_without_matplotlib(trace_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    png = tmp_path / "slowdown.png"
    assert main(["simulate", str(trace_path), "--hardware", "h100-sxm",
                 "--plot", str(png)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'sentinel-hm[plot]'" in err[0]
    assert not png.exists()


# --- min-budget ---------------------------------------------------------------------------


@pytest.mark.parametrize("hardware", ["h100-sxm", "dram-optane"])
def test_min_budget(trace_path, hardware, capsys):
    assert main(["min-budget", str(trace_path), "--hardware", hardware,
                 "--max-slowdown", "5%"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"budget: .*\(([\d,]+) B, ([\d.]+)% of the peak\), slowdown x([\d.]+)", out)
    assert m, out
    budget, slowdown = int(m[1].replace(",", "")), float(m[3])
    trace = sentinel_hm.load_trace(trace_path)
    assert 0 < budget <= trace.peak_bytes
    assert slowdown <= 1.05
    # the answer holds: a plan at that budget is within the limit
    plan = sentinel_hm.plan(trace, hardware, budget)
    result = sentinel_hm.simulate(trace, plan, hardware)
    all_fast = sentinel_hm.simulate(trace, sentinel_hm.plan(trace, hardware, "100%", "all-fast"),
                                    hardware)
    assert result.step_s / all_fast.step_s == pytest.approx(slowdown, abs=1e-3)


def test_min_budget_not_reached(trace_path, capsys):
    # all-slow ignores the budget: no budget brings it within 1% of all-fast on a GPU
    assert main(["min-budget", str(trace_path), "--hardware", "h100-sxm",
                 "--max-slowdown", "0.01", "--policy", "all-slow"]) == 1
    assert "not reached" in capsys.readouterr().out


def test_parse_share():
    assert parse_share("5%") == pytest.approx(0.05)
    assert parse_share("0.05") == pytest.approx(0.05)
    assert parse_share("0") == 0
    for bad in ("-5%", "-0.1", "abc", "5", "nan%", ""):
        with pytest.raises(SentinelError):
            parse_share(bad)


# --- errors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def old_trace(trace_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same trace, claiming a schema version this sentinel-hm does not read."""
    data = json.loads(trace_path.read_text())
    data["version"] = 99
    path = tmp_path_factory.mktemp("old") / "old.json.gz"
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "{trace}", "--hardware", "h200-nvl", "--budget", "20%"], "h200-nvl"),
        (["plan", "{trace}", "--hardware", "h100-sxm", "--budget", "20%", "--policy", "lru"],
         "unknown policy 'lru'"),
        (["plan", "{trace}", "--hardware", "h100-sxm", "--budget", "abc%"], "abc%"),
        (["plan", "{trace}", "--hardware", "h100-sxm", "--budget", "150%"], "150%"),
        (["plan", "{trace}", "--hardware", "h100-sxm", "--budget", "20%",
          "--policy", "first-touch"], "direct access"),
        (["plan", "{trace}", "--hardware", "h100-sxm", "--budget", "1KiB"], "cannot honour"),
        (["plan", "{missing}", "--hardware", "h100-sxm", "--budget", "20%"], "no such file"),
        (["plan", "{old}", "--hardware", "h100-sxm", "--budget", "20%"], "version 99"),
        (["plan", "{trace}", "--hardware", "h100-sxm", "--budget", "100%",
          "--out", "{missing_dir}/plan.json"], "cannot write"),
        (["simulate", "{trace}", "--hardware", "nosuch"], "nosuch"),
        (["simulate", "{trace}", "--hardware", "h100-sxm", "--policies", "sentinel,lru"],
         "unknown policy 'lru'"),
        (["simulate", "{trace}", "--hardware", "h100-sxm", "--budgets", "10%,abc%"], "abc%"),
        (["simulate", "{trace}", "--hardware", "h100-sxm", "--budgets", "10%,20%,...,95%"],
         "95%"),
        (["simulate", "{missing}", "--hardware", "h100-sxm"], "no such file"),
        (["simulate", "{old}", "--hardware", "h100-sxm"], "version 99"),
        (["min-budget", "{trace}", "--hardware", "nosuch", "--max-slowdown", "5%"], "nosuch"),
        (["min-budget", "{trace}", "--hardware", "h100-sxm", "--max-slowdown=-5%"], "negative"),
        (["min-budget", "{trace}", "--hardware", "h100-sxm", "--max-slowdown", "-0.05"],
         "negative"),
        (["min-budget", "{trace}", "--hardware", "h100-sxm", "--max-slowdown", "abc"], "abc"),
        (["min-budget", "{trace}", "--hardware", "h100-sxm", "--max-slowdown", "5%",
          "--policy", "lru"], "unknown policy"),
        (["min-budget", "{missing}", "--hardware", "h100-sxm", "--max-slowdown", "5%"],
         "no such file"),
        (["min-budget", "{old}", "--hardware", "h100-sxm", "--max-slowdown", "5%"],
         "version 99"),
    ],
)
def test_errors_are_one_line_with_status_2(argv, message, trace_path, old_trace, tmp_path,
                                           capsys):
    paths = {"trace": trace_path, "old": old_trace, "missing": tmp_path / "nosuch.json",
             "missing_dir": tmp_path / "nosuch"}
    code = main([a.format(**paths) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"sentinel {argv[0]}: error: "), err
    assert message in err[0]


def test_plan_says_what_the_link_carries_and_when_it_alone_exceeds_the_step(trace_path,
                                                                           tmp_path, capsys):
    slow = "h100-sxm,h2d=0.05GB/s,d2h=0.05GB/s"
    out = tmp_path / "plan.json"
    assert main(["plan", str(trace_path), "--hardware", slow, "--budget", "60%",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    plan = sentinel_hm.load_plan(out)
    assert plan.moves
    by_kind = next(x for x in lines if x.startswith("planned to fast by kind: "))
    assert "nothing" not in by_kind
    step = next(x for x in lines if x.startswith("simulated step: "))
    assert re.search(r"stalls [\d.]+ ms \((forward|backward|optimizer) [\d.]+ ms", step), step
    bound = next(x for x in lines if x.startswith("link-bound: "))
    result = sentinel_hm.simulate(sentinel_hm.load_trace(trace_path), plan, slow)
    assert f"to fast {result.bytes_to_fast / 0.05e9 * 1e3:.2f} ms" in bound, bound

    capsys.readouterr()
    assert main(["plan", str(trace_path), "--hardware", "h100-sxm", "--budget", "60%",
                 "--out", str(out)]) == 0
    assert "link-bound" not in capsys.readouterr().out  # PCIe carries it within the step

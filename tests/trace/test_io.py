"""Trace files: round trip, gzip, version and malformed-file errors, Chrome export."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.trace import SCHEMA_VERSION, Phase, save_chrome_trace
from sentinel_hm.trace.io import trace_to_dict

from .models import Stack


@pytest.fixture(scope="module")
def trace() -> sh.Trace:
    model = Stack()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        model(torch.randn(4, 16), torch.randint(0, 4, (4,))).backward()
        opt.step()
        opt.zero_grad()

    step()
    return sh.profile(step, model=model, optimizer=opt)


@pytest.mark.parametrize("name", ["t.json", "t.json.gz"])
def test_round_trip(trace, tmp_path, name):
    path = sh.save_trace(trace, tmp_path / name)
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    loaded = sh.load_trace(path)
    assert loaded.ops == trace.ops
    assert loaded.storages == trace.storages
    assert loaded.layers == trace.layers
    assert loaded.live_bytes == trace.live_bytes
    assert all(isinstance(op.phase, Phase) for op in loaded.ops)


def _write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_other_version_is_refused(trace, tmp_path):
    data = trace_to_dict(trace)
    data["version"] = SCHEMA_VERSION + 1
    with pytest.raises(sh.SentinelError, match=r"version 2 is not supported.*profile the step again"):
        sh.load_trace(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("ops"), r"trace\.ops: missing"),
        (lambda d: d["ops"][3].update(phase="sideways"), r"ops\[3\]\.phase: 'sideways' is not one of"),
        (lambda d: d["ops"][0].update(inputs=[10**6]), r"ops\[0\]\.inputs: 1000000 is not a storage"),
        (lambda d: d["storages"][1].update(nbytes="big"), r"storages\[1\]\.nbytes: expected int"),
        (lambda d: d["storages"][1].update(saved=1), r"storages\[1\]\.saved: expected bool"),
        (lambda d: d["storages"][2].update(created_at=-1), r"created_at: -1 is out of range"),
        (lambda d: d.update(format="something-else"), r"not a sentinel-hm trace"),
    ],
)
def test_malformed_files_name_the_field(trace, tmp_path, mutate, message):
    data = trace_to_dict(trace)
    mutate(data)
    with pytest.raises(sh.SentinelError, match=message):
        sh.load_trace(_write(tmp_path, data))


def test_unreadable_files(tmp_path):
    with pytest.raises(sh.SentinelError, match="no such file"):
        sh.load_trace(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(sh.SentinelError, match="invalid JSON"):
        sh.load_trace(tmp_path / "junk.json")
    (tmp_path / "cut.json.gz").write_bytes(gzip.compress(b'{"a": 1}')[:12])
    with pytest.raises(sh.SentinelError, match="cannot read"):
        sh.load_trace(tmp_path / "cut.json.gz")


def test_chrome_trace_has_ops_layers_and_live_bytes(trace, tmp_path):
    path = save_chrome_trace(trace, tmp_path / "timeline.json")
    events = json.loads(path.read_text())["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    ops = [e for e in slices if e["tid"] == 1]
    layers = [e for e in slices if e["tid"] == 2]
    counters = [e for e in events if e["ph"] == "C"]
    assert len(ops) == len(trace.ops) and len(counters) == len(trace.ops)
    assert len(layers) == len(trace.segments)
    assert max(e["args"]["bytes"] for e in counters) == trace.peak_bytes
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)
    assert {"forward blocks.1", "backward blocks.1"} <= {e["name"] for e in layers}

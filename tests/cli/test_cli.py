"""The ``sentinel`` command, run through its real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from sentinel_hm.cli.main import main


def test_profile_then_show(tmp_path, capsys):
    out = tmp_path / "trace.json.gz"
    chrome = tmp_path / "timeline.json"
    code = main(["profile", "--workload", "mlp", "--size", "tiny", "--out", str(out),
                 "--chrome", str(chrome), "--quiet"])
    assert code == 0 and out.exists()
    assert json.loads(chrome.read_text())["traceEvents"]
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    for needle in ("trace of mlp/tiny", "peak live", "short-lived", "saved_activation",
                   "blocks.0", "overhead x", "op time by phase"):
        assert needle in shown


def test_user_factory_in_current_directory(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_factory.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

            def forward(self, x, y):
                return nn.functional.mse_loss(self.layers(x), y)

        def build():
            net = Net()
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            return net, opt, lambda: (torch.randn(4, 8), torch.randn(4, 1))
    """))
    monkeypatch.chdir(tmp_path)  # found in the current directory, as `python -m` would
    out = tmp_path / "t.json"
    assert main(["profile", "--workload", "my_factory:build", "--out", str(out)]) == 0
    assert "trace of my_factory:build" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["profile", "--workload", "nosuch"], "nosuch"),
        (["profile", "--workload", "no_such_module_xyz:build"], "no_such_module_xyz"),
        (["show", "/nonexistent/trace.json"], "no such file"),
    ],
)
def test_errors_are_one_line_with_status_2(argv, message, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "sentinel_hm.cli.main", *argv],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert message in lines[0] and lines[0].startswith("sentinel ")


def test_show_refuses_a_file_that_is_not_a_trace(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2, 3]")
    assert main(["show", str(bad)]) == 2
    assert "not a sentinel-hm trace" in capsys.readouterr().err


def test_demo_trains_with_and_without_sentinel(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["demo", "--size", "tiny", "--steps", "9", "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "losses bitwise equal" in printed and "yes" in printed
    assert "within" in printed
    assert (out / "trace.json.gz").exists() and (out / "plan.json").exists()
    assert (out / "steady_step.chrome.json").exists()

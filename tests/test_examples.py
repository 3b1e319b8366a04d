"""The examples run as written (small settings)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv",
    [["examples/plain_loop.py", "--size", "tiny", "--steps", "8"], ["examples/custom_layers.py"]],
)
def test_example_runs(argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "measured peak" in proc.stdout


@pytest.mark.slow
def test_torchrun_fsdp_example_runs():
    """The README's torchrun line, on two CPU ranks (``--standalone``: a free port)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "examples/torchrun_fsdp.py", "--steps", "9"]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "measured peak" in line]
    assert len(lines) == 2, proc.stdout  # one per rank
    assert "phase steady" in proc.stdout

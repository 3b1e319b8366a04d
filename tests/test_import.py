"""`import sentinel_hm` must stay lean: no CUDA initialisation."""

import subprocess
import sys


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, sentinel_hm, sentinel_hm.cli.main, sentinel_hm.workloads; "
        "assert not torch.cuda.is_initialized(); print(sorted(sentinel_hm.__all__))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "profile" in proc.stdout and "add_layer" in proc.stdout

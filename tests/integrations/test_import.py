"""``import sentinel_hm.integrations`` imports no framework: torch is the only core
dependency, and each integration module imports its own framework when it is imported."""

import subprocess
import sys


def test_integrations_package_imports_no_framework():
    code = ("import sys, sentinel_hm, sentinel_hm.integrations; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'lightning', "
            "'pytorch_lightning') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"

#!/usr/bin/env bash
# The GPU checks, for a machine with CUDA (run from the repository root, no install needed):
# the GPU tests, then the GPU benchmark in quick mode. Prints a one-line verdict at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.cuda.get_device_name(0), torch.__version__)" || exit 2
timeout 240 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider; tests=$?
timeout 300 python3 benchmarks/bench_gpu.py --quick; bench=$?
if [ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]; then
  echo "gpu_check: PASS (tests and benchmark; results in benchmarks/results/gpu_*)"
else
  echo "gpu_check: FAIL (tests exit $tests, benchmark exit $bench)"
  exit 1
fi

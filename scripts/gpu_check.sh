#!/usr/bin/env bash
# The GPU checks in one command, on a machine with CUDA, from the source tree (nothing to
# install beyond torch, pytest, and transformers + accelerate for the Hugging Face parts): the
# GPU tests (tests/gpu), the GPU benchmark in quick mode, then the Hugging Face benchmark
# (GPT-2 and Llama from configs, batch 4 x 1024). Under 6 minutes on one GPU: each part has a
# time limit (tests 95 s, quick benchmark 60 s, Hugging Face benchmark 180 s: 335 s, 350 s
# with the kill grace; the device probe, about 5 s, takes the rest). The benchmarks
# keep inside theirs themselves (per-row limits, rows not started late fail as not run) and
# write their results; the outer timeouts are a backstop.
#
#   scripts/gpu_check.sh            (PYTHON=... to use another interpreter)
#
# Results, named with the device and the UTC date, in benchmarks/results/:
#   gpu_<device>_quick_<date>.md/.json   the benchmark's table and data
#   gpu_<device>_quick_<date>.log        its console output (tracebacks of failed rows)
#   gpu_<device>_hf_<date>.md/.json/.log the Hugging Face benchmark's, the same
#   gpu_<device>_tests_<date>.xml/.txt   pytest's JUnit report and console output
# Prints "gpu_check: PASS" only if every GPU test ran (none skipped) and passed, and every
# row of both benchmarks passed (no crash, bitwise, within budget); otherwise
# "gpu_check: FAIL ..." and exit 1 (2: no CUDA).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: read when CUDA starts
PY=${PYTHON:-python3}
OUT=benchmarks/results

slug=$(PYTHONPATH="$PYTHONPATH:benchmarks" "$PY" -c '
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False here")
from bench_gpu import device_slug
print(device_slug())
') || { echo "gpu_check: FAIL (no CUDA, or torch or the benchmark does not import)"; exit 2; }
"$PY" -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)'
day=$(date -u +%F)
mkdir -p "$OUT"
tests="$OUT/gpu_${slug}_tests_${day}"
bench="$OUT/gpu_${slug}_quick_${day}"
hf="$OUT/gpu_${slug}_hf_${day}"
start=$SECONDS

timeout -k 5 95 "$PY" -m pytest -q -rA --durations=0 -m gpu tests/gpu -p no:cacheprovider \
  --junitxml="$tests.xml" 2>&1 | tee "$tests.txt"
tests_rc=${PIPESTATUS[0]}
# a run in which the tests were skipped (CUDA not seen by pytest) is not a pass
tests_ran=$("$PY" - "$tests.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET

try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    print(f"no JUnit report ({e})")
    raise SystemExit(0)
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "skipped", "failures", "errors")}
ok = count["tests"] > 0 and not any(count[k] for k in ("skipped", "failures", "errors"))
print("ok" if ok else ", ".join(f"{v} {k}" for k, v in count.items()))
EOF
)

echo "gpu_check: tests took $((SECONDS - start)) s"

t=$SECONDS
timeout -k 5 60 "$PY" benchmarks/bench_gpu.py --quick --time-limit-s 45 --row-limit-s 12 \
  --out-dir "$OUT" 2>&1 | tee "$bench.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: quick benchmark took $((SECONDS - t)) s"

t=$SECONDS
timeout -k 5 180 "$PY" benchmarks/bench_gpu_hf.py --time-limit-s 150 --row-limit-s 25 \
  --out-dir "$OUT" 2>&1 | tee "$hf.log"
hf_rc=${PIPESTATUS[0]}
echo "gpu_check: Hugging Face benchmark took $((SECONDS - t)) s; all parts $((SECONDS - start)) s"

if [ "$tests_rc" -eq 0 ] && [ "$tests_ran" = "ok" ] && [ "$bench_rc" -eq 0 ] \
    && [ "$hf_rc" -eq 0 ]; then
  echo "gpu_check: PASS (every GPU test passed; every benchmark row passed: $bench.md, $hf.md)"
else
  echo "gpu_check: FAIL (tests: exit $tests_rc, $tests_ran; quick benchmark: exit $bench_rc;" \
       "Hugging Face benchmark: exit $hf_rc (1: a row failed, 124: out of time); see" \
       "$tests.txt, $bench.md, $bench.log, $hf.md, $hf.log)"
  exit 1
fi

#!/usr/bin/env bash
# The benchmark's fast-path checks (bench/checks.py) on a GPU, where the fast paths are the real
# kernels: the training rows they guard, PyTorch (eager and compiled) and JAX, tiny and bench
# presets, one process per framework; then the table and every row's check line (the excess of
# each figure over bf16 noise, which docs/performance.md's thresholds are to be confirmed against).
#
#   scripts/gpu_bench_checks.sh                 # results in $OUT (default runs/bench-checks)
#
# About 8 minutes on one H200 (two compiles of the bench preset dominate).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/bench-checks}
status=0  # a failed check still shows the table and the check lines; the exit status says it
$PY -m pytest -q tests/test_bench_checks.py -k "not jax" || status=1
$PY -m bench --what train --framework torch --torch-compile both --preset both --steps 10 --warmup 3 --out "$OUT" --table none || status=1
$PY -m bench --what train --framework jax --preset both --steps 10 --warmup 3 --out "$OUT" --table none || status=1
$PY -m bench --what report --out "$OUT" --table compact
$PY - "$OUT/bench_results.json" <<'PYEOF'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"{r['framework']} {r['workload']} {r['variant']}: {'pass' if r['check_ok'] else 'FAIL'}: {r['check'] or r['error']}")
PYEOF
exit $status

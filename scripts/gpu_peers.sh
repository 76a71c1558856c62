#!/usr/bin/env bash
# Blues against its strongest peers on one GPU, in one call of at most 8 minutes:
#
#   scripts/gpu_peers.sh                     # from the repository root or anywhere; results in $OUT
#   scripts/gpu_peers.sh titan-train kernels # only these of scripts/gpu_bench.sh's sections
#
# 1. installs the wheels of .whl/ (torchtitan and the packages it imports that the GPU image lacks,
#    liger-kernel, cut-cross-entropy, DeepSpeed; built here with /work/shared/tools/device-wheels,
#    see bench/peer_torchtitan.py) into /tmp/site;
# 2. runs scripts/gpu_bench.sh's sections, most wanted first, inside its time budget: the dense bf16
#    8192^3 rate (the MFU denominator), torchtitan with its per-block compile, transformers' Mixtral
#    under torch.compile, Blues compiled PyTorch, the library kernels against Blues' (bench/
#    library_kernels.py), the eager Mixtral, then what time is left for JAX and torchtitan eager;
#    every row at the tiny and the bench preset, the same batch and shapes (estimated on an H200:
#    dense 25 s, torchtitan 80 s, compiled Mixtral 75 s with a 41 s first step at bench, Blues
#    compiled 180 s with its compiled-gradient check, kernels 45 s: the eager Mixtral may not fit);
# 3. prints the compact table; $OUT holds bench_results.json (every row), bench_table.md (the table
#    with notes) and log.txt (everything).
#
# Every row fails soft: an error or a time limit leaves an error row and the next section runs; a
# package that did not install makes its rows "skipped" with the reason. Environment: OUT (default
# runs/peers-<UTC time>), PEERS_BUDGET_S (default 430: the benchmark's share of the 8 minutes),
# BENCH_STEPS / BENCH_WARMUP (default 5 / 2), BENCH_QUICK=1 for a dry run on a CPU (toy shapes).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export OUT=${OUT:-runs/peers-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.txt" 2>&1 || echo "gpu_peers: pip install of .whl/ failed (see $OUT/pip.txt); rows that need it will be skipped"
else
  echo "gpu_peers: no .whl/ here; torchtitan, liger-kernel and cut-cross-entropy rows will be skipped unless installed"
fi
if [ -d /tmp/site ]; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export BENCH_BUDGET_S=${PEERS_BUDGET_S:-430} BENCH_STEPS=${BENCH_STEPS:-5} BENCH_WARMUP=${BENCH_WARMUP:-2}
exec scripts/gpu_bench.sh ${*:-dense titan-train peer-compile compile kernels peer-train jax-train titan-eager}

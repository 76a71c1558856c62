#!/usr/bin/env bash
# The whole Blues benchmark on one GPU, one process per section, inside a time budget.
#
#   scripts/gpu_bench.sh                      # every section, in priority order
#   scripts/gpu_bench.sh jax-train decode-jax # only these sections (names below)
#   OUT=/some/dir BENCH_BUDGET_S=300 scripts/gpu_bench.sh
#   BENCH_QUICK=1 BENCH_STEPS=2 BENCH_WARMUP=1 scripts/gpu_bench.sh   # dry run on a CPU (toy shapes)
#
# Sections, in the order they run (most wanted first):
#   dense        dense bf16 8192^3 rate, torch and JAX (the MFU denominator)
#   torch-train  PyTorch training, tiny then bench preset (eager)
#   jax-train    JAX training, tiny then bench preset
#   jax-scan     (named only) JAX training with the blocks unrolled and scanned, tiny then bench
#   peer-train   Hugging Face Mixtral training, tiny then bench
#   deepspeed    DeepSpeed ZeRO-2 bf16 training, tiny then bench (skips with a line if not importable)
#   torch-misc   PyTorch loss (chunked vs plain) and grouped GEMM
#   jax-misc     JAX loss and expert GEMMs
#   decode-torch greedy decoding b1 / b64, tiny preset, eager and torch.compile'd step (both CUDA graphs)
#   decode-jax
#   parity       torch vs JAX on converted weights, bf16
#   peer-decode  Mixtral generate, dynamic and static cache (slow: ~20 tokens/s at b1)
#   compile      PyTorch training under torch.compile, tiny then bench preset
#   trainer      train_torch.py (eager, compiled) and train_jax.py runs at the bench preset: their own tokens/s
#   deepspeed-compile  DeepSpeed ZeRO-2 with the engine's compile (train_torch.py --deepspeed --compile)
#   peer-compile Hugging Face Mixtral training under torch.compile(model), tiny then bench
#   titan-train  torchtitan's Qwen3-MoE with its per-block compile, tiny then bench (bench/peer_torchtitan.py)
#   titan-eager  the same without compile
#   kernels      liger-kernel and cut-cross-entropy against Blues' loss, gated GeLU and RMSNorm kernels
#   (the last four need wheels carried to the GPU: scripts/gpu_peers.sh)
#
# Each section runs under `timeout` with the smaller of its own cap and what is left of
# BENCH_BUDGET_S (default 450 s, so the whole script ends inside 8 minutes); a section that
# would start with under 20 s left is skipped and listed. A failing or killed section leaves an
# error row; the others still run. Results accumulate in $OUT/bench_results.json (every row as
# soon as it exists), full logs in $OUT/log.txt; the table is printed last (compact) and written
# in full to $OUT/bench_table.md. Two calls' results merge with
#   python -m bench --what report --out DIR1 --merge DIR2 [--table compact]
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/bench-$(date -u +%Y%m%d-%H%M%S)}
PY=${PYTHON:-python3}
BUDGET_S=${BENCH_BUDGET_S:-450}
STEPS=${BENCH_STEPS:-10}
WARMUP=${BENCH_WARMUP:-3}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed (and anything else) carried as wheels and installed with `pip install --target /tmp/site`.
if [ -d /tmp/site ]; then
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
fi

ALL="dense torch-train jax-train peer-train deepspeed torch-misc jax-misc decode-torch decode-jax parity peer-decode compile trainer deepspeed-compile peer-compile titan-train kernels"
SECTIONS=${*:-$ALL}
START=$(date +%s)
COMMON=(--out "$OUT" --steps "$STEPS" --warmup "$WARMUP" --table none)  # --dense auto: only if the results lack it
QUICK=()
if [ "${BENCH_QUICK:-0}" = 1 ]; then QUICK=(--quick); COMMON+=(--quick); fi  # a dry run of this script on a CPU

note() { echo "[gpu_bench +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run NAME CAP_SECONDS ARGS...: one `python -m bench` process; console shows progress lines only
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    note "SKIPPED $name: ${left}s of the ${BUDGET_S}s budget left"
    echo "$name" >> "$OUT/skipped_sections.txt"
    return
  fi
  local limit=$(( cap < left ? cap : left ))
  note "=== $name (limit ${limit}s; ${left}s of budget left)"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" -m bench "$@" >> "$LOG" 2>&1
  local rc=$?
  # the section's one-line results and errors, from the log
  sed -n "/=== $name /,\$p" "$LOG" | grep -E '^\[bench .*(->|== | dense )|Error|error:' | grep -v '^\[gpu_bench' | tail -n 40
  note "$name: exit $rc after $(( $(date +%s) - t0 ))s$([ "$rc" = 124 ] && echo ' (TIME LIMIT)')"
}

note "GPU: $(nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
note "python: $($PY -c 'import sys; print(sys.version.split()[0])'); out: $OUT; sections: $SECTIONS"
$PY - >> "$LOG" 2>&1 <<'EOF'
import importlib.metadata as m
for p in ("torch", "jax", "jaxlib", "flax", "optax", "transformers", "deepspeed", "flash-attn", "numpy",
          "torchtitan", "liger-kernel", "cut-cross-entropy", "datasets", "pyarrow"):
    try:
        print(f"{p} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"{p} not installed")
EOF
grep -E '^(torch|jax|flax|optax|transformers|deepspeed|flash-attn|torchtitan|liger-kernel|cut-cross-entropy) ' "$LOG" | tr '\n' ';' | sed 's/;/; /g'; echo

for s in $SECTIONS; do
  case $s in
    dense)        run dense        60  --what dense --framework both --out "$OUT" --table none ${QUICK[@]+"${QUICK[@]}"} ;;
    torch-train)  run torch-train  150 --what train --framework torch --preset both "${COMMON[@]}" ;;
    jax-train)    run jax-train    240 --what train --framework jax --preset both "${COMMON[@]}" ;;
    jax-scan)     run jax-scan     300 --what train --framework jax --preset both --jax-scan both "${COMMON[@]}" ;;
    peer-train)   run peer-train   150 --what peer-train --preset both "${COMMON[@]}" ;;
    deepspeed)    run deepspeed    150 --what deepspeed --framework torch --preset both "${COMMON[@]}" ;;
    torch-misc)   run torch-misc   90  --what loss,gemm --framework torch "${COMMON[@]}" ;;
    jax-misc)     run jax-misc     150 --what loss,gemm --framework jax "${COMMON[@]}" ;;
    decode-torch) run decode-torch 150 --what decode --framework torch --torch-compile both "${COMMON[@]}" ;;
    decode-jax)   run decode-jax   150 --what decode --framework jax "${COMMON[@]}" ;;
    parity)       run parity       90  --what parity "${COMMON[@]}" ;;
    peer-decode)  run peer-decode  150 --what peer-decode "${COMMON[@]}" ;;
    compile)      run compile      240 --what train --framework torch --preset both --torch-compile on "${COMMON[@]}" ;;
    trainer)      run trainer      300 --what trainer --framework both --preset bench --torch-compile both "${COMMON[@]}" ;;
    deepspeed-compile) run deepspeed-compile 240 --what deepspeed --framework torch --preset both --torch-compile on "${COMMON[@]}" ;;
    peer-compile) run peer-compile 200 --what peer-train --preset both --torch-compile on "${COMMON[@]}" ;;
    titan-train)  run titan-train  200 --what titan-train --preset both --torch-compile on "${COMMON[@]}" ;;
    titan-eager)  run titan-eager  120 --what titan-train --preset both "${COMMON[@]}" ;;
    kernels)      run kernels      150 --what kernels --preset both "${COMMON[@]}" ;;
    *) note "unknown section '$s'; known: $ALL" ;;
  esac
done

note "done in $(( $(date +%s) - START ))s; full table: $OUT/bench_table.md; rows: $OUT/bench_results.json"
echo
"$PY" -m bench --what report --out "$OUT" --table compact

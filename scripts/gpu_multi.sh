#!/usr/bin/env bash
# Blues on several GPUs of one host: DeepSpeed, torchrun expert parallelism and the JAX expert
# mesh, each against the same launcher on one GPU, in one call.
#
#   scripts/gpu_multi.sh                       # every part, N = the GPUs nvidia-smi lists
#   scripts/gpu_multi.sh ds-dp jax-data report # only these parts (names below)
#   PRESET=small STEPS=30 OUT=/some/dir scripts/gpu_multi.sh
#   DRY=1 scripts/gpu_multi.sh                 # CPU dry run: 2 CPU ranks / 2 host devices, tiny, 6 steps
#
# Parts, in the order they run:
#   ds-dp        deepspeed --num_gpus N train_torch.py --deepspeed ds_config.json (ZeRO-2, bf16; data parallel)
#   ds-ep        the same with --expert_parallel N
#   torchrun-ep  torchrun --nproc_per_node N train_torch.py --expert_parallel N --compile
#   jax-data     train_jax.py --mesh data=N         (one process, N local devices)
#   jax-expert   train_jax.py --mesh expert=N       (the compiled HLO must hold an all-to-all)
#   jax-2d       train_jax.py --mesh data=2,expert=N/2 (N >= 4)
#   resume       a mid-run checkpoint of N devices resumes on 1 and one of 1 resumes on N, both frameworks
#   report       the table (scripts/multi_gpu_report.py)
#   clean        delete the runs' checkpoints (the metrics are the record)
#
# Weak scaling: every N-device run has BATCH sequences (of the preset's length) per device. Each
# part's 1-device baseline trains on the same global batch in one micro-batch (--batch_size N x
# BATCH): its per-step losses are what the N-device run must reproduce (up to reduction order; the
# bf16 tolerance), and its tokens/s is the scaling reference. Gradient accumulation would not do as
# the reference: the load-balancing loss's statistics are per micro-batch, so N micro-batches of
# BATCH give other losses than one batch of N x BATCH split over N devices.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0 ...): the device README says why.
set -u
cd "$(dirname "$0")/.."

DRY=${DRY:-0}
PY=${PYTHON:-python3}
OUT=${OUT:-runs/multi-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false BLUES_CACHE=${BLUES_CACHE:-/tmp/blues-cache}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ! $PY -c "import deepspeed" 2>/dev/null; then  # DeepSpeed carried as wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 \
    || { echo "pip install of .whl failed"; tail -3 "$OUT/pip.log"; }
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's fused Adam cannot parse the image's "9.0a"

if [ "$DRY" = 1 ]; then
  N=2 PRESET=${PRESET:-tiny} STEPS=${STEPS:-6} BATCH=${BATCH:-2}
  PREC=fp32
  CONFIG='{"num_layers": 2, "router_noise_std": 0, "dropout": 0}'
  export DS_ACCELERATOR=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$N ${XLA_FLAGS:-}"
  DS=(deepspeed --num_accelerators)
  JAX_ONE=(env XLA_FLAGS="--xla_force_host_platform_device_count=1")
else
  N=${N:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
  PRESET=${PRESET:-bench} STEPS=${STEPS:-25} BATCH=${BATCH:-8}
  PREC=bf16
  CONFIG='{"router_noise_std": 0, "dropout": 0}'
  DS=(deepspeed --num_gpus)
  JAX_ONE=(env CUDA_VISIBLE_DEVICES=0)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/gpu: /'
fi
[ "$N" -ge 2 ] || { echo "error: gpu_multi.sh needs 2 or more devices, found $N"; exit 2; }
COMMON=(--preset "$PRESET" --precision "$PREC" --batch_size "$BATCH" --max_steps "$STEPS" --eval_every 100000
        --save_every "$((STEPS / 2))" --keep_checkpoints 3 --config "$CONFIG")
ALL="ds-dp ds-ep torchrun-ep jax-data jax-expert jax-2d resume report clean"
PARTS=${*:-$ALL}
START=$(date +%s)
port=29700

note() { echo "[gpu_multi +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# launch NAME DEVICES BASELINE CMD...: one training run in $OUT/NAME, its run.json for the report
launch() {
  local name=$1 devices=$2 baseline=$3; shift 3
  local dir="$OUT/$name"
  mkdir -p "$dir"
  printf '{"name": "%s", "devices": %d, "baseline": "%s"}\n' "$name" "$devices" "$baseline" > "$dir/run.json"
  echo "$* --out_dir $dir" > "$dir/command.txt"
  note "$name: $*"
  if "$@" --out_dir "$dir" > "$dir/stdout.log" 2> "$dir/run.log"; then
    note "$name: $(grep -E '^done:' "$dir/stdout.log" | cut -c1-160)"
  else
    note "$name: FAILED (exit $?): $(grep -E 'error' "$dir/stdout.log" "$dir/run.log" | tail -1 | cut -c1-300)"
  fi
}

# The launchers; each sets CMD (a new rendezvous port for every distributed launch).
ds_cmd() { port=$((port + 1)); CMD=("${DS[@]}" "$1" --master_port $port train_torch.py --deepspeed ds_config.json); }
tr_cmd() { port=$((port + 1)); CMD=(torchrun --nproc_per_node "$1" --master_port $port train_torch.py); }
jax_cmd() { if [ "$1" = 1 ]; then CMD=("${JAX_ONE[@]}" "$PY" train_jax.py); else CMD=("$PY" train_jax.py); fi; }
COMPILE=(--compile); [ "$DRY" = 1 ] && COMPILE=()  # inductor on 2 CPU cores would take minutes
ckpt() { echo "$OUT/$1/checkpoints/$(printf 'step_%08d' $((STEPS / 2)))"; }  # the mid-run checkpoint

for part in $PARTS; do
  case "$part" in
    ds-dp)
      ds_cmd 1;    launch ds-1 1 "" "${CMD[@]}" "${COMMON[@]}" --batch_size "$((N * BATCH))"
      ds_cmd "$N"; launch "ds-$N" "$N" ds-1 "${CMD[@]}" "${COMMON[@]}" ;;
    ds-ep)
      ds_cmd "$N"; launch "ds-ep$N" "$N" ds-1 "${CMD[@]}" "${COMMON[@]}" --expert_parallel "$N" ;;
    torchrun-ep)
      tr_cmd 1;    launch torchrun-1 1 "" "${CMD[@]}" "${COMMON[@]}" "${COMPILE[@]}" --batch_size "$((N * BATCH))"
      tr_cmd "$N"; launch "torchrun-ep$N" "$N" torchrun-1 "${CMD[@]}" "${COMMON[@]}" "${COMPILE[@]}" --expert_parallel "$N" ;;
    jax-data)
      jax_cmd 1;   launch jax-1 1 "" "${CMD[@]}" "${COMMON[@]}" --batch_size "$((N * BATCH))"
      jax_cmd "$N"; launch "jax-data$N" "$N" jax-1 "${CMD[@]}" "${COMMON[@]}" --mesh "data=$N" ;;
    jax-expert)
      hlo="$OUT/jax-expert$N-hlo"
      launch "jax-expert$N" "$N" jax-1 env XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$hlo" "$PY" train_jax.py \
        "${COMMON[@]}" --mesh "expert=$N"
      count=$(grep -l "all-to-all" "$hlo"/*after_optimizations*.txt 2>/dev/null | wc -l)
      if [ "$count" -gt 0 ]; then note "jax-expert$N: $count compiled modules hold an all-to-all"
      else note "jax-expert$N: FAILED: no all-to-all in the compiled HLO"; fi
      tar czf "$OUT/jax-expert$N-hlo.tgz" -C "$OUT" "jax-expert$N-hlo" 2>/dev/null && rm -rf "$hlo" ;;
    jax-2d)
      if [ "$N" -ge 4 ]; then
        jax_cmd "$N"; launch "jax-2d$N" "$N" jax-1 "${CMD[@]}" "${COMMON[@]}" --mesh "data=2,expert=$((N / 2))"
      else note "jax-2d: skipped (needs 4 or more devices)"; fi ;;
    resume)
      # N devices -> 1 and 1 -> N from the mid-run checkpoints of the runs above; each resumed run's
      # losses are compared with those of the run it came from (the report's baseline column).
      if [ -d "$(ckpt "ds-$N")" ]; then
        ds_cmd 1; launch "ds-${N}to1" 1 "ds-$N" "${CMD[@]}" "${COMMON[@]}" --batch_size "$((N * BATCH))" --resume "$(ckpt "ds-$N")"
      fi
      if [ -d "$(ckpt ds-1)" ]; then
        ds_cmd "$N"; launch "ds-1to$N" "$N" ds-1 "${CMD[@]}" "${COMMON[@]}" --resume "$(ckpt ds-1)"
      fi
      if [ -d "$(ckpt "jax-data$N")" ]; then
        jax_cmd 1; launch "jax-${N}to1" 1 "jax-data$N" "${CMD[@]}" "${COMMON[@]}" --batch_size "$((N * BATCH))" \
          --resume "$(ckpt "jax-data$N")"
      fi
      if [ -d "$(ckpt jax-1)" ]; then
        jax_cmd "$N"; launch "jax-1to$N" "$N" jax-1 "${CMD[@]}" "${COMMON[@]}" --mesh "data=$N" --resume "$(ckpt jax-1)"
      fi ;;
    report)
      skip=5; [ "$DRY" = 1 ] && skip=1
      $PY scripts/multi_gpu_report.py "$OUT" --json "$OUT/multi_gpu.json" --skip "$skip" | tee "$OUT/multi_gpu_table.md" ;;
    clean) rm -rf "$OUT"/*/checkpoints ;;
    *) echo "error: unknown part '$part' (parts: $ALL)"; exit 2 ;;
  esac
done

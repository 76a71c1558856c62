#!/usr/bin/env bash
# Training runs on one GPU, side by side (issue 6): how good the model gets, and the GPU paths of
# both trainers (`train_jax.py --preset small`, `deepspeed --num_gpus=1 train_torch.py --deepspeed
# ds_config.json --preset small`, plain `train_torch.py`) exercised end to end in bf16.
#
#   scripts/gpu_train.sh sweep1   # 7 runs at once (tiny x5, small x2), each stopped by --max_minutes
#   scripts/gpu_train.sh sweep2   # 8 runs: weight decay and dropout (docs/training.md says why)
#   scripts/gpu_train.sh final    # the tuned tiny and small runs
#   OUT=/some/dir MINUTES=7 PACK=1 scripts/gpu_train.sh sweep2   # PACK=1: the run dirs as one runs.tgz
#
# The runs share the GPU (time-sliced), so each one's wall-clock time is an upper bound on what it
# needs alone: a `tiny` run that reaches the target here in M minutes reaches it in at most M alone.
# Each run's directory ($OUT/NAME) keeps metrics.jsonl, loss.png, experts.png, stdout.log, run.log;
# the last thing printed is a table (scripts/summarize_runs.py) with the bigram baseline beside it.
# DeepSpeed: carried as wheels in .whl/ (../shared/tools/device-wheels), installed here into /tmp/site.
set -u
cd "$(dirname "$0")/.."
SET=${1:-final}
OUT=${OUT:-runs/gpu-train-$(date -u +%Y%m%d-%H%M%S)}
MINUTES=${MINUTES:-7.5}
PY=${PYTHON:-python3}
BIGRAM=${BIGRAM:-534}  # docs/training.md: the interpolated bigram's validation perplexity (the hash split)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false BLUES_CACHE=${BLUES_CACHE:-/tmp/blues-cache}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several JAX processes share the one GPU
if [ -d .whl ] && ! $PY -c "import deepspeed" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 \
    || { echo "pip install of .whl failed"; tail -3 "$OUT/pip.log"; }
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed 0.19.8 cannot parse the image's "9.0a"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'

# Tokenize once, before the runs start, so that they do not race to write the token cache.
$PY -c "from blues.data import prepare_data; s = prepare_data(seq_len=256, show_progress=False); \
print(f'corpus: {len(s.train):,} train / {len(s.val):,} val tokens')" || exit 1

# name | launcher | flags (every run: bf16, full validation split at each evaluation)
TINY="--preset tiny --precision bf16 --eval_batches 1000 --save_every 100000"
SMALL="--preset small --precision bf16 --eval_batches 1000 --save_every 100000"
case "$SET" in
  sweep1) RUNS=(
    "tiny-a|jax|$TINY --batch_size 32 --max_steps 1500 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --config {\"dropout\":0.1} --eval_every 100"
    "tiny-b|jax|$TINY --batch_size 32 --max_steps 2500 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --config {\"dropout\":0.2} --eval_every 100"
    "tiny-c|jax|$TINY --batch_size 16 --max_steps 3000 --lr 1e-3 --min_lr 1e-4 --warmup_steps 100 --config {\"dropout\":0.1} --eval_every 150"
    "tiny-d|jax|$TINY --batch_size 64 --max_steps 800 --lr 3e-3 --min_lr 3e-4 --warmup_steps 50 --eval_every 50"
    "tiny-a-torch|torch|$TINY --batch_size 32 --max_steps 1500 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --config {\"dropout\":0.1} --eval_every 100"
    "small-jax|jax|$SMALL --batch_size 16 --max_steps 1500 --lr 1e-3 --min_lr 1e-4 --warmup_steps 100 --config {\"dropout\":0.1} --eval_every 100"
    "small-ds|deepspeed|$SMALL --batch_size 16 --max_steps 2000 --lr 1e-3 --min_lr 1e-4 --warmup_steps 100 --config {\"dropout\":0.2} --eval_every 100"
  ) ;;
  sweep2) RUNS=(
    "t1-wd0.1-d0.1|jax|$TINY --batch_size 32 --max_steps 800 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 0.1 --config {\"dropout\":0.1} --eval_every 50"
    "t2-wd1-d0.1|jax|$TINY --batch_size 32 --max_steps 1000 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 1.0 --config {\"dropout\":0.1} --eval_every 50"
    "t3-wd2-d0.1|jax|$TINY --batch_size 32 --max_steps 1000 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 2.0 --config {\"dropout\":0.1} --eval_every 50"
    "t4-wd0.1-d0.3|jax|$TINY --batch_size 32 --max_steps 1000 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 0.1 --config {\"dropout\":0.3} --eval_every 50"
    "t5-wd1-d0.3|jax|$TINY --batch_size 32 --max_steps 1200 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 1.0 --config {\"dropout\":0.3} --eval_every 50"
    "t6-b16-wd1-d0.2|jax|$TINY --batch_size 16 --max_steps 2000 --lr 1e-3 --min_lr 1e-4 --warmup_steps 100 --weight_decay 1.0 --config {\"dropout\":0.2} --eval_every 100"
    "t7-b64-wd1-d0.2|jax|$TINY --batch_size 64 --max_steps 600 --lr 4e-3 --min_lr 4e-4 --warmup_steps 50 --weight_decay 1.0 --config {\"dropout\":0.2} --eval_every 25"
    "s1-wd1-d0.2|jax|$SMALL --batch_size 16 --max_steps 1000 --lr 1e-3 --min_lr 1e-4 --warmup_steps 100 --weight_decay 1.0 --config {\"dropout\":0.2} --eval_every 50"
  ) ;;
  final) RUNS=(
    "tiny-wd2|jax|$TINY --batch_size 32 --max_steps 1500 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 2.0 --config {\"dropout\":0.1} --eval_every 50"
    "tiny-wd3|jax|$TINY --batch_size 32 --max_steps 1500 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 3.0 --config {\"dropout\":0.1} --eval_every 50"
    "tiny-wd2-lr3e-3|jax|$TINY --batch_size 32 --max_steps 1200 --lr 3e-3 --min_lr 3e-4 --warmup_steps 100 --weight_decay 2.0 --config {\"dropout\":0.1} --eval_every 50"
    "tiny-wd2-torch|torch|$TINY --batch_size 32 --max_steps 1200 --lr 2e-3 --min_lr 2e-4 --warmup_steps 100 --weight_decay 2.0 --config {\"dropout\":0.1} --eval_every 50"
    "small-wd2|jax|$SMALL --batch_size 16 --max_steps 1000 --lr 1e-3 --min_lr 1e-4 --warmup_steps 100 --weight_decay 2.0 --config {\"dropout\":0.1} --eval_every 50"
  ) ;;
  *) echo "unknown set '$SET' (sweep1, sweep2 or final)"; exit 2 ;;
esac

port=29600
names=()
for spec in "${RUNS[@]}"; do
  IFS='|' read -r name how flags <<< "$spec"
  dir="$OUT/$name"; mkdir -p "$dir"; names+=("$dir")
  read -r -a argv <<< "$flags"
  case "$how" in
    jax)   cmd=($PY train_jax.py) ;;
    torch) cmd=($PY train_torch.py) ;;
    deepspeed) port=$((port + 1)); cmd=(deepspeed --num_gpus=1 --master_port $port train_torch.py --deepspeed ds_config.json) ;;
  esac
  echo "start $name: ${cmd[*]} ${argv[*]} --max_minutes $MINUTES" | tee "$dir/command.txt"
  "${cmd[@]}" "${argv[@]}" --max_minutes "$MINUTES" --out_dir "$dir" > "$dir/stdout.log" 2> "$dir/run.log" &
done
wait
for dir in "${names[@]}"; do
  echo "== $(basename "$dir"): $(grep -E '^done:|error' "$dir/stdout.log" "$dir/run.log" | tail -1 | cut -c1-300)"
done
rm -rf "$OUT"/*/checkpoints  # tens of MB each; the metrics and plots are the record
$PY scripts/summarize_runs.py "${names[@]}" --bigram "$BIGRAM" --json "$OUT/summary.json"
if [ "${PACK:-0}" = 1 ]; then  # one archive instead of the directories (a remote machine's $OUT)
  tar czf "$OUT/runs.tgz" -C "$OUT" $(cd "$OUT" && ls -d */) && rm -rf "${names[@]}"
fi

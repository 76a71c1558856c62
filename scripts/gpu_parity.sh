#!/usr/bin/env bash
# Parity on one GPU: a short torch run, `python -m parity.check` on it in float32 and bfloat16, and the
# run converted mid-training to JAX, continued there, with its losses compared to torch's.
#
#   scripts/gpu_parity.sh                 # OUT=/tmp/gpu_parity, about 3 minutes on an H200
#   OUT=/some/dir STEPS=40 scripts/gpu_parity.sh
#
# What it measures (the CPU test suite cannot): whether the float32 tolerances of parity.check hold
# on GPU kernels (cuBLAS / XLA GPU, no TF32), how far bf16 is by KL, and whether a converted run's next
# losses match on GPU (float32: ~1e-5 relative expected). Logs in $OUT/*.log, a summary on stdout.
set -u
OUT=${OUT:-/tmp/gpu_parity}
STEPS=${STEPS:-40}
HALF=$((STEPS / 2))
PY=${PY:-python}
mkdir -p "$OUT"
rm -rf "$OUT/torch" "$OUT/jax"
# Router noise off: its random streams are framework-specific (a converted run restarts them).
CFG='{"router_noise_std": 0.0}'
FLAGS=(--preset tiny --config "$CFG" --max_steps "$STEPS" --save_every "$HALF" --eval_every 1000 --eval_batches 2
       --batch_size 8 --precision fp32)

echo "== torch run ($STEPS steps, checkpoint at $HALF)"
$PY train_torch.py "${FLAGS[@]}" --stop_after $((HALF + 2)) --out_dir "$OUT/torch" > "$OUT/torch.log" 2>&1 \
    || { tail -5 "$OUT/torch.log"; exit 1; }

for dtype in float32 bfloat16; do
    echo "== parity.check $dtype"
    $PY -m parity.check --checkpoint "$OUT/torch" --dtype "$dtype" --rows 8 2>&1 | tee "$OUT/check_$dtype.log" | tail -12
done

echo "== convert step $HALF to JAX and continue 2 steps"
$PY -m parity.convert_checkpoint "$OUT/torch/checkpoints/step_$(printf %08d "$HALF")" "$OUT/jax" --to jax \
    > "$OUT/convert.log" 2>&1 || { tail -5 "$OUT/convert.log"; exit 1; }
$PY train_jax.py "${FLAGS[@]}" --stop_after $((HALF + 2)) --out_dir "$(realpath "$OUT/jax")" --resume auto \
    > "$OUT/jax.log" 2>&1 || { tail -5 "$OUT/jax.log"; exit 1; }
$PY - "$OUT" "$HALF" <<'EOF'
import json, sys
out, half = sys.argv[1], int(sys.argv[2])
def losses(run):
    recs = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl") if '"loss"' in l]
    return {r["step"]: r for r in recs}
t, j = losses("torch"), losses("jax")
for step in (half + 1, half + 2):
    for key in ("loss", "lm_loss", "aux_loss", "z_loss"):
        a, b = t[step][key], j[step][key]
        print(f"step {step} {key:8s} torch {a:.7f} jax {b:.7f} rel diff {abs(a - b) / abs(a):.2e}")
EOF

#!/usr/bin/env bash
# Round 9 on the H200 (docs/performance.md): the PyTorch loss's Triton kernels, one part per device call.
# A: their GPU tests, the kernel probe, compiled tiny training steps by loss chunk. B: the harness's
# tiny rows and bench row, the training probe with the kernels on and off. C: the compiled-gradient
# GPU test, the PyTorch loss rows, DeepSpeed compiled (needs .whl, carried; its compiled PyTorch row, cut by
# a 170 s limit in call 3, moved to D). D: compiled PyTorch at
# bench and tiny. E: the kernel probe with the aten form, compiled PyTorch at tiny (the final launch).
# F: the PyTorch loss kernels' GPU tests at the final launch, JAX at tiny (the new default chunk).
#   bash scripts/round9_gpu.sh A|B|C|D|E|F   (writes $OUT/logs/*.txt and $OUT/<part>/bench_results.json)
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT/logs"
case "$1" in
A)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/logs/a0_gpu.txt"
  timeout 200 python3 -m pytest -q -ra tests/test_gpu.py -k "torch_loss_kernel or chunked_loss or compiled_training" \
    > "$OUT/logs/a1_tests.txt" 2>&1
  timeout 120 python3 scripts/loss_kernel_probe.py --framework torch --rows 1024 > "$OUT/logs/a2_probe.txt" 2>&1
  timeout 100 python3 scripts/loss_kernel_probe.py --framework torch --rows 4096 >> "$OUT/logs/a2_probe.txt" 2>&1
  timeout 200 python3 scripts/loss_kernel_probe.py --framework --train-chunks 4096 1024 16384 8192 --kernels on \
    > "$OUT/logs/a3_train.txt" 2>&1
  ;;
B)
  timeout 150 python3 -m bench --table none --what train --framework torch --torch-compile on --preset tiny \
    --out "$OUT/tiny" --steps 20 --warmup 2 > "$OUT/logs/b1_tiny.txt" 2>&1
  timeout 120 python3 -m bench --table none --what train --framework jax --preset tiny \
    --out "$OUT/tiny_jax" --steps 20 --warmup 2 > "$OUT/logs/b2_tiny_jax.txt" 2>&1
  timeout 200 python3 -m bench --table none --what train --framework torch --torch-compile on --preset bench \
    --out "$OUT/bench" --steps 20 --warmup 2 > "$OUT/logs/b3_bench.txt" 2>&1
  timeout 170 python3 scripts/loss_kernel_probe.py --framework torch --train-chunks 8192 16384 --kernels on off \
    > "$OUT/logs/b4_train.txt" 2>&1
  ;;
C)
  timeout 150 python3 -m pytest -q -ra tests/test_gpu.py -k "compiled_training" > "$OUT/logs/c1_tests.txt" 2>&1
  timeout 100 python3 -m bench --table none --what loss --framework torch --out "$OUT/loss" > "$OUT/logs/c3_loss.txt" 2>&1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 170 python3 -m bench --table none --what deepspeed --framework torch --torch-compile on --preset bench \
    --out "$OUT/ds" --steps 20 --warmup 2 > "$OUT/logs/c4_ds.txt" 2>&1
  ;;
D)
  timeout 270 python3 -m bench --table none --what train --framework torch --torch-compile on --preset bench \
    --out "$OUT/bench" --steps 20 --warmup 2 > "$OUT/logs/d1_bench.txt" 2>&1
  timeout 130 python3 -m bench --table none --what train --framework torch --torch-compile on --preset tiny \
    --out "$OUT/tiny" --steps 20 --warmup 2 > "$OUT/logs/d2_tiny.txt" 2>&1
  ;;
E)
  for rows in 1024 4096; do
    timeout 100 python3 scripts/loss_kernel_probe.py --framework torch --rows $rows >> "$OUT/logs/e1_probe.txt" 2>&1
  done
  timeout 130 python3 -m bench --table none --what train --framework torch --torch-compile on --preset tiny \
    --out "$OUT/tiny" --steps 20 --warmup 2 > "$OUT/logs/e2_tiny.txt" 2>&1
  ;;
F)
  timeout 60 python3 -m pytest -q tests/test_gpu.py -k "torch_loss_kernel or chunked_loss_matches" > "$OUT/logs/f1_tests.txt" 2>&1
  timeout 100 python3 -m bench --table none --what train --framework jax --preset tiny \
    --out "$OUT/tiny_jax" --steps 20 --warmup 2 > "$OUT/logs/f2_tiny_jax.txt" 2>&1
  ;;
esac
rm -f "$OUT"/*/bench_table.md   # the device returns at most 8 files; the tables are rebuilt from the results

#!/usr/bin/env bash
# Round 10 on the H200 (docs/performance.md, issue 26), one part per device call.
# A: DeepSpeed ZeRO-2 compiled at `bench` with ds_config.json and with DeepSpeed's torch_autocast
#    (float32 module, no bf16 master copy), beside plain compiled PyTorch in the same process;
#    PyTorch's time to first step, cold and repeated, with timestamped logs.
# B: the JAX step's compile at `bench`: the shared block trace against every block traced inline
#    (trace + lower seconds, tokens/s: within 2%?) and XLA without autotuning (compile seconds).
# C: JAX's time to first step, cold and repeated (the step compiling beside the initialisation).
# D: time to quality with the eager rows beside the compiled ones (torchtitan from .whl), each row
#    stopping at its target; PyTorch's compiled row no longer recompiles after its first evaluation,
#    and its evaluation samples run at one padded shape.
# E: greedy decoding of `tiny`, both frameworks (JAX reads its stop test once per 8 steps and runs a
#    decode step's experts densely), and
#    JAX's decode profile (kernels and host gaps per token).
# F: where `train_torch.py --compile` spends the seconds before its first step at `bench`, cold and
#    repeated (scripts/startup_profile.py, cProfile: its overhead slows dynamo's trace), and the
#    compiled PyTorch decode step (E's PyTorch rows are the eager step's); an eager `tiny` run of the
#    time-to-quality recipe, cold, profiled through its first step and three evaluations.
# G: the image's packages ship no bytecode and the image writes none (F: ~3,000 modules compiled
#    from source by every process); with it compiled first, as a pip install leaves it: PyTorch's
#    time to first step (cold and repeated), then the eager `tiny` start profiled with callers.
# H: time to quality, every Blues row and the peers' eager rows, with the bytecode compiled first.
# I: where the DeepSpeed engine's ~9-11 ms a step at `bench` go: the compiled engine against compiled
#    plain PyTorch by phase, their GPU kernels, and DeepSpeed's host time by function.
# K: the training loop queueing one step ahead of the one it reads (blues/loop.py), against reading
#    every step before launching the next, both frameworks at tiny and bench, same process.
# L: the tiny rows against the peers, every row timed as the training loop now runs (LOOP_REPS steps
#    back to back): Blues compiled PyTorch and JAX, compiled transformers, torchtitan per-block compile.
# M: the trainers themselves, queued one ahead against reading every step (the second made by setting
#    the trainers' run_ahead to False in this machine's copy), alternating, at the time-to-quality
#    recipe for 300 steps (eager PyTorch twice each way): median tokens/s of each run's metrics.jsonl
#    (steps 51-300) and wall time.
# N: DeepSpeed's ZeRO step deciding its skip on the device (blues_torch/deepspeed_skip.py): its tests
#    and deepspeed_norms' on the GPU, then `scripts/ds_variants.py --compile --plain` at `bench` in one
#    process: plain compiled PyTorch, ds_config.json with the device step (one step queued, as the
#    trainer runs it) and DeepSpeed's own step (each step read), 12 timed samples of 4 steps each.
# O: the end of ZeRO's backward ordered on the device (deepspeed_skip's epilogue: the compute stream
#    waits on the reduction stream; DeepSpeed synchronises the device): the tests on the GPU, the GPU
#    test again with the epilogue left DeepSpeed's (must fail), then ds_variants at `bench`, twice:
#    plain compiled, ds_config.json, the device step with DeepSpeed's epilogue, DeepSpeed's own step.
# P: `train_torch.py --cuda_graph` (blues_torch/step_graph.py): its tests on the GPU; the bench's `tiny`
#    rows, compiled PyTorch without and with the graph beside compiled transformers (one call); then the
#    time-to-quality recipe for 300 steps compiled, without and with the graph: median tokens/s of steps
#    51-300 (metrics.jsonl) and the validation perplexities.
# Q: the decode step's kernels (blues_*/greedy_head.py, blues_*/decode_attention.py): their GPU tests,
#    the torch tests with the head's tie rule and the attention's padding rule planted wrong (each
#    must fail), then scripts/decode_probe.py at `tiny`: both frameworks with both kernels, without
#    the fused head, without the attention kernel (tokens/s, replay and kernel time, kernels).
# R: P's tests and Q whole in one call (both branches' correctness on the GPU, and the decode probe).
# S: the step's CUDA graph, compiled and eager: the bench's `tiny` rows (PyTorch eager and compiled, each
#    without and with the graph, beside compiled transformers), then time to quality with the graph rows
#    beside the plain ones and torchtitan's eager row (the fastest peer of the last call).
#   bash scripts/round10_gpu.sh A|B|C|D|E|F|G|H|I|K|L|M|N|O|P|Q|R|S   (writes $OUT/logs/*.txt)
set -uo pipefail
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT/logs"
case "$1" in
A)
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/logs/a0_gpu.txt"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 280 python3 scripts/ds_variants.py --compile --plain --presets bench --steps 12 --warmup 3 \
    --variants ds_config.json torch_autocast > "$OUT/logs/a1_ds.txt" 2>&1
  timeout 250 python3 scripts/time_to_first_step.py --frameworks torch --steps 4 --warmup 1 --out /tmp/ttfs \
    > "$OUT/logs/a2_ttfs_torch.txt" 2>&1
  cp /tmp/ttfs/logs/*.log "$OUT/logs/" 2>/dev/null
  ;;
B)
  timeout 560 python3 scripts/jax_compile_probe.py --variants default inline-blocks no-autotune --steps 10 \
    --warmup 3 > "$OUT/logs/b1_compile.txt" 2>&1
  ;;
C)
  timeout 560 python3 scripts/time_to_first_step.py --frameworks jax --steps 4 --warmup 1 --out /tmp/ttfs \
    > "$OUT/logs/c1_ttfs_jax.txt" 2>&1
  cp /tmp/ttfs/logs/*.log "$OUT/logs/" 2>/dev/null
  ;;
D)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  # five rows of at most 1.2 min + 30 s each (JAX's row, unchanged, was 83.8 s on 2026-12-04)
  timeout 560 python3 -m bench --what quality --rows torch-eager,torch,hf-eager,titan-eager,titan \
    --stop-at-target --max-minutes 1.2 --out /tmp/ttq > "$OUT/logs/d1_quality.txt" 2>&1
  cp /tmp/ttq/time_to_quality.* "$OUT/logs/" 2>/dev/null
  ;;
E)
  timeout 300 python3 -m bench --what decode --out /tmp/dec > "$OUT/logs/e1_decode.txt" 2>&1
  cp /tmp/dec/bench_table.md "$OUT/logs/e1_decode_table.md" 2>/dev/null
  timeout 200 python3 scripts/profile_gpu.py jax-decode > "$OUT/logs/e2_profile_jax_decode.txt" 2>&1
  ;;
F)
  export BLUES_CACHE=/tmp/f_cache TRITON_CACHE_DIR=/tmp/f_cache/triton CUDA_CACHE_PATH=/tmp/f_cache/cuda
  for run in cold repeated; do
    timeout 120 python3 scripts/startup_profile.py train_torch.py --preset bench --precision bf16 --batch_size 8 \
      --compile --out_dir /tmp/f_run_$run > "$OUT/logs/f1_startup_$run.txt" 2>&1
  done
  TRITON_CACHE_DIR=/tmp/f_tiny_triton \
    timeout 60 python3 scripts/startup_profile.py --evaluations 3 train_torch.py --preset tiny --precision bf16 \
    --batch_size 32 --eval_batches 1000 --config '{"dropout": 0.1}' --out_dir /tmp/f_tiny > "$OUT/logs/f3_tiny_eval.txt" 2>&1
  timeout 200 python3 -m bench --what decode --framework torch --torch-compile on --out /tmp/dec \
    > "$OUT/logs/f2_decode_compiled.txt" 2>&1
  ;;
G|H)
  { env | grep -i "^PYTHON" ; python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode)"; } \
    > "$OUT/logs/${1,,}0_bytecode.txt" 2>&1
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  began=$SECONDS
  python3 -m compileall -q -j 16 "$site" . > /dev/null 2>&1
  echo "compileall of $site and the checkout: $((SECONDS - began)) s" >> "$OUT/logs/${1,,}0_bytecode.txt"
  ;;&
G)
  timeout 200 python3 scripts/time_to_first_step.py --frameworks torch --steps 4 --warmup 1 --out /tmp/ttfs \
    > "$OUT/logs/g1_ttfs_torch.txt" 2>&1
  TRITON_CACHE_DIR=/tmp/g_triton timeout 60 python3 scripts/startup_profile.py --evaluations 2 --top 25 \
    train_torch.py --preset tiny --precision bf16 --batch_size 32 --eval_batches 1000 --config '{"dropout": 0.1}' \
    --out_dir /tmp/g_tiny > "$OUT/logs/g2_tiny_profile.txt" 2>&1
  ;;
H)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl  # with bytecode
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 480 python3 -m bench --what quality --rows torch-eager,torch,jax,titan-eager,hf-eager \
    --stop-at-target --max-minutes 1.2 --out /tmp/ttq > "$OUT/logs/h1_quality.txt" 2>&1
  cp /tmp/ttq/time_to_quality.* "$OUT/logs/" 2>/dev/null
  ;;
I)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 500 python3 scripts/profile_gpu.py deepspeed-train --preset bench --steps 5 > "$OUT/logs/i1_ds_profile.txt" 2>&1
  ;;
L)
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 540 python3 -m bench --what dense,train,peer-train,titan-train --preset tiny --framework both \
    --torch-compile on --steps 6 --warmup 2 --table compact --out /tmp/l > "$OUT/logs/l1_tiny_peers.txt" 2>&1
  cp /tmp/l/bench_table.md "$OUT/logs/l1_tiny_table.md" 2>/dev/null
  ;;
M)
  python3 -m compileall -q -j 16 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" . > /dev/null 2>&1
  recipe=(--preset tiny --precision bf16 --batch_size 32 --max_steps 300 --lr 0.003 --min_lr 0.0003 --warmup_steps 100
          --weight_decay 2 --config '{"dropout": 0.1}' --eval_every 50 --eval_batches 1000 --save_every 300)
  cp blues_torch/train.py /tmp/torch_train.py; cp blues_jax/train.py /tmp/jax_train.py
  for round in 1 2; do
    for way in queued each; do
      if [ $way = each ]; then
        sed -i 's/self.run_ahead = .*/self.run_ahead = False/' blues_torch/train.py blues_jax/train.py
      else
        cp /tmp/torch_train.py blues_torch/train.py; cp /tmp/jax_train.py blues_jax/train.py
      fi
      runs="torch-eager"; [ $round = 1 ] && runs="torch-eager torch jax"
      for row in $runs; do
        case $row in
          torch-eager) cmd=(python3 train_torch.py) ;; torch) cmd=(python3 train_torch.py --compile) ;; jax) cmd=(python3 train_jax.py) ;;
        esac
        dir=/tmp/m/$row-$way-$round; began=$SECONDS
        timeout 150 "${cmd[@]}" "${recipe[@]}" --out_dir $dir > "$OUT/logs/m_$row-$way-$round.txt" 2>&1
        python3 -c "import json,statistics,sys; r=[json.loads(l) for l in open('$dir/metrics.jsonl')]; t=[x['tokens_per_s'] for x in r if 'tokens_per_s' in x and x['step']>50]; print('$row $way round $round: median tokens/s %.0f over %d steps, wall %d s' % (statistics.median(t), len(t), $SECONDS-$began))" >> "$OUT/logs/m1_ab.txt" 2>&1
      done
    done
  done
  cp /tmp/torch_train.py blues_torch/train.py; cp /tmp/jax_train.py blues_jax/train.py
  ;;
N)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_deepspeed_skip.py tests/test_deepspeed_norms.py \
    > "$OUT/logs/n1_tests.txt" 2>&1
  timeout 400 python3 scripts/ds_variants.py --compile --plain --presets bench --steps 12 --warmup 3 \
    --variants ds_config.json "host skip (DeepSpeed step)" > "$OUT/logs/n2_ds.txt" 2>&1
  ;;
O)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/logs/o0_gpu.txt"
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_deepspeed_skip.py tests/test_deepspeed_norms.py \
    > "$OUT/logs/o1_tests.txt" 2>&1
  cp blues_torch/deepspeed_skip.py /tmp/deepspeed_skip.py  # planted: the epilogue left DeepSpeed's
  sed -i 's/^_REPLACEMENTS = .*/_REPLACEMENTS = {"step": step}/' blues_torch/deepspeed_skip.py
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_deepspeed_skip.py -k on_a_gpu \
    > "$OUT/logs/o2_planted.txt" 2>&1
  cp /tmp/deepspeed_skip.py blues_torch/deepspeed_skip.py
  for round in 1 2; do
    timeout 200 python3 scripts/ds_variants.py --compile --plain --presets bench --steps 20 --warmup 3 \
      --variants ds_config.json "DeepSpeed epilogue" "host skip (DeepSpeed step)" >> "$OUT/logs/o3_ds.txt" 2>&1
  done
  ;;
P)
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_step_graph.py > "$OUT/logs/p1_tests.txt" 2>&1
  timeout 200 python3 -m bench --what dense,train,peer-train --preset tiny --framework torch --torch-compile on \
    --torch-cuda-graph both --steps 6 --warmup 3 --table compact --out /tmp/p_bench > "$OUT/logs/p0_bench.txt" 2>&1
  cp /tmp/p_bench/bench_table.md "$OUT/logs/p0_bench_table.md" 2>/dev/null
  recipe=(--preset tiny --precision bf16 --batch_size 32 --max_steps 300 --lr 0.003 --min_lr 0.0003 --warmup_steps 100
          --weight_decay 2 --config '{"dropout": 0.1}' --eval_every 50 --eval_batches 1000 --save_every 300 --compile)
  for round in 1; do
    for way in plain graph; do
      extra=(); [ $way = graph ] && extra=(--cuda_graph)
      dir=/tmp/p/$way-$round; began=$SECONDS
      timeout 100 python3 train_torch.py "${recipe[@]}" "${extra[@]}" --out_dir $dir > "$OUT/logs/p_$way-$round.txt" 2>&1
      python3 -c "import json,statistics; r=[json.loads(l) for l in open('$dir/metrics.jsonl')]; t=[x['tokens_per_s'] for x in r if 'tokens_per_s' in x and x['step']>50]; v=[round(x['val_perplexity'],3) for x in r if 'val_perplexity' in x]; print('$way round $round: median tokens/s %.0f, wall %d s, val ppl %s' % (statistics.median(t), $SECONDS-$began, v))" >> "$OUT/logs/p2_ab.txt" 2>&1
    done
  done
  ;;
R)
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_step_graph.py > "$OUT/logs/p1_tests.txt" 2>&1
  ;;&
Q|R)
  nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/logs/q0_gpu.txt"
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "greedy or decode_attention" \
    > "$OUT/logs/q1_tests.txt" 2>&1
  cp blues_torch/greedy_head.py /tmp/greedy_head.py; cp blues_torch/decode_attention.py /tmp/decode_attention.py
  sed -i 's/tl.min(tl.where(logits == best/tl.max(tl.where(logits == best/' blues_torch/greedy_head.py  # ties to the higher id
  sed -i 's/allowed = (slot <= index) & ((slot >= start) | (slot == index))/allowed = slot <= index/' \
    blues_torch/decode_attention.py  # padding attended
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    -k "fused_greedy_head_is_argmax or decode_attention_matches_reference_gpu" > "$OUT/logs/q2_planted.txt" 2>&1
  cp /tmp/greedy_head.py blues_torch/greedy_head.py; cp /tmp/decode_attention.py blues_torch/decode_attention.py
  timeout ${PROBE_S:-260} python3 scripts/decode_probe.py --torch base unfused-head no-decode-attention \
    --jax cudnn unfused-head no-decode-attention --calls 3 > "$OUT/logs/q3_decode.txt" 2>&1
  ;;
S)
  nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/logs/s0_gpu.txt"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
  timeout 230 python3 -m bench --what dense,train,peer-train --preset tiny --framework torch --torch-compile both \
    --torch-cuda-graph both --steps 6 --warmup 3 --table compact --out /tmp/s_bench > "$OUT/logs/s1_bench.txt" 2>&1
  cp /tmp/s_bench/bench_table.md "$OUT/logs/s1_bench_table.md" 2>/dev/null
  timeout 330 python3 -m bench --what quality --rows torch-eager-graph,torch-eager,torch-graph,torch,titan-eager \
    --stop-at-target --max-minutes 1 --out /tmp/s_ttq > "$OUT/logs/s2_quality.txt" 2>&1
  cp /tmp/s_ttq/time_to_quality.* "$OUT/logs/" 2>/dev/null
  ;;
K)
  timeout 560 python3 scripts/run_ahead_probe.py --frameworks torch,jax --presets tiny,bench --steps 30 \
    > "$OUT/logs/k1_run_ahead.txt" 2>&1
  ;;
esac

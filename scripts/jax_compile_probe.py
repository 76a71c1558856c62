"""Where JAX's compile of the training step goes: the bench's step compiled under XLA flag variants.

    python scripts/jax_compile_probe.py                              # every variant, bench preset
    python scripts/jax_compile_probe.py --variants default no-autotune --layers 12 2

Each variant runs in a fresh child process (XLA_FLAGS is read when the backend starts) with no
persistent compilation cache: blues_jax.training's state and step at the preset's shapes (bench/
train_step.py's make_jax_train_step, bf16, one device), then tracing + lowering, XLA's compile, and
`--steps` timed steps after `--warmup`. One table: seconds to trace and lower, seconds to compile,
tokens/s and the first loss (the same weights and batch in every row, so a variant that changed the
step's numbers shows there). `inline-blocks` traces every block where it is called instead of
the shared block trace (blues_jax.model._block_call). `--layers`: the same at other depths, to split the compile into a
per-layer slope and a fixed part. Needs a GPU for the figures that matter; runs anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> XLA_FLAGS added for the variant
VARIANTS = {
    "default": "",
    # each block traced where it is called (blues_jax.model.blocks_traced_inline), not one shared trace
    "inline-blocks": "",
    # no autotuning: cuBLAS and the default Triton tile configurations as XLA's heuristics pick them
    "no-autotune": "--xla_gpu_autotune_level=0",
    # dots to cuBLAS only (XLA's Triton GEMM fusions and their autotuning off)
    "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",
}


def child(preset: str, quick: bool, layers: int, steps: int, warmup: int, inline: bool) -> dict:
    import contextlib

    import jax
    import numpy as np

    from bench.train_step import jax_step_inputs, make_jax_train_step, train_workload
    from blues_jax.model import blocks_traced_inline

    wl = train_workload(preset, quick)
    config = dataclasses.replace(wl.config, num_layers=layers)
    state, step_fn, sharding = make_jax_train_step(config)
    inputs = jax_step_inputs(config, wl.batch, wl.seq, sharding)
    t0 = time.perf_counter()
    with blocks_traced_inline() if inline else contextlib.nullcontext():
        lowered = step_fn.lower(*state, *inputs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    losses, times = [], []
    for i in range(warmup + steps):
        s = time.perf_counter()
        *state, out = compiled(*state, *inputs)
        losses.append(float(np.asarray(out["losses"])[0]))
        times.append(time.perf_counter() - s)
    step_s = sorted(times[warmup:])[len(times[warmup:]) // 2]
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "tokens_per_s": wl.batch * wl.seq / step_s,
            "first_loss": losses[0], "backend": jax.default_backend()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--layers", nargs="+", type=int, default=[0], help="depths to run (0: the preset's)")
    p.add_argument("--quick", action="store_true", help="the bench's toy shapes (a CPU smoke test)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "LAYERS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from bench.train_step import train_workload
        layers = int(args.child[1]) or train_workload(args.preset, args.quick).config.num_layers
        inline = args.child[0] == "inline-blocks"
        print("RESULT " + json.dumps(child(args.preset, args.quick, layers, args.steps, args.warmup, inline)),
              flush=True)
        return
    print(f"{'variant':<16} {'layers':>6} {'trace+lower s':>13} {'compile s':>9} {'tokens/s':>10} {'first loss':>10}")
    for layers in args.layers:
        for name in args.variants:
            env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip()}
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
            cmd = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--child", name, str(layers)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"{name:<16} {layers:>6} failed: {tail}", flush=True)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            print(f"{name:<16} {layers or 'preset':>6} {r['lower_s']:>13.1f} {r['compile_s']:>9.1f} "
                  f"{r['tokens_per_s']:>10,.0f} {r['first_loss']:>10.5f}", flush=True)


if __name__ == "__main__":
    main()

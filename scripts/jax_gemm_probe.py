"""Tile sweep for blues_jax.grouped_matmul's Mosaic GPU kernels at the bench preset's expert shapes.

    python scripts/jax_gemm_probe.py [--preset bench] [--budget-s 240]

The six grouped GEMMs of one expert layer's forward and backward (M = 32,768 assignments of 8 x
2048 tokens to top-2 of 8 experts, d 1024, F 4096), on random (unbalanced) group sizes: each tile
configuration is checked against `jax.lax.ragged_dot` (relative error < 1e-2, bf16 operands) and
timed; the best per GEMM kind is printed with its TFLOP/s and the share of a dense matmul of the
same size. Then the whole expert MLP, forward + backward, in the blocks form and the sorted
Mosaic form. Needs a Hopper GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from blues_jax import grouped_matmul as gm  # noqa: E402
from blues_jax.experts import expert_mlp  # noqa: E402

from bench.timing import jax_sync, time_steps  # noqa: E402
from bench.train_step import _rel as rel, train_workload  # noqa: E402

M = D = F = E = K = 0  # assignments, d, F, experts, top-k: set by main() from --preset


def timed(fn, *args, reps=20) -> float:
    """Seconds per call: the bench's timer, `reps` calls queued back to back per sample."""
    return time_steps(lambda: fn(*args), jax_sync, warmup=2, steps=3, reps=reps).median_s


def group_sizes(seed: int) -> jax.Array:
    """Random top-2-of-8 loads: a multinomial over a skewed distribution (sizes not multiples of 64)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 4.0))
    return jnp.asarray(rng.multinomial(M, p), jnp.int32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--preset", default="bench", help="shapes of this preset's benchmark batch")
    ap.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="the tile sweep")
    args = ap.parse_args()
    global M, D, F, E, K
    wl = train_workload(args.preset, quick=False)
    cfg = wl.config
    D, F, E, K = cfg.hidden_size, cfg.expert_hidden_size, cfg.tot_num_experts, cfg.chosen_num_experts
    M = wl.batch * wl.seq * K
    deadline = time.perf_counter() + args.budget_s
    print(f"jax {jax.__version__}; {jax.devices()[0].device_kind}; M {M}, d {D}, F {F}, E {E}", flush=True)
    keys = iter(jax.random.split(jax.random.key(0), 64))
    bf16 = jnp.bfloat16
    gs = group_sizes(1)
    print(f"group sizes {np.asarray(gs).tolist()}", flush=True)

    def dense_rate(m, k, n):
        a = jax.random.normal(next(keys), (m, k), bf16)
        b = jax.random.normal(next(keys), (k, n), bf16)
        return 2 * m * k * n / timed(jax.jit(jnp.matmul), a, b) / 1e12

    # (name, kind, lhs shape, rhs shape, transpose_rhs): kind "product" (ragged_dot_mgpu) or "wgrad"
    gemms = [
        ("w_in forward", "product", (M, D), (E, D, 2 * F), False),
        ("w_out forward", "product", (M, F), (E, F, D), False),
        ("x grad (w_in^T)", "product", (M, 2 * F), (E, D, 2 * F), True),
        ("act grad (w_out^T)", "product", (M, D), (E, F, D), True),
        ("w_in grad", "wgrad", (M, D), (M, 2 * F), None),
        ("w_out grad", "wgrad", (M, F), (M, D), None),
    ]
    # Round 3 swept 128x128 tiles (stages 4-6, grid_block_n 1-16: (128, 128, 64, 5, 8) best for 5 of 6);
    # this grid keeps that one and tries wider output tiles (one warpgroup holds the accumulator:
    # 128 x 256 float32 does not fit its registers, 64 x 256 and 128 x 192 do) and deeper K steps.
    tile_grid = [gm.Tiles(*t) for t in ((128, 128, 64, 5, 8), (64, 256, 64, 5, 8), (64, 256, 64, 6, 8),
                                         (128, 192, 64, 4, 8), (128, 128, 128, 3, 8), (64, 128, 64, 6, 8),
                                         (128, 256, 64, 3, 8))]
    best: dict[str, tuple[float, gm.Tiles]] = {}
    print(f"\n{'GEMM':22s} {'tiles':34s} {'ms':>7s} {'TFLOP/s':>8s} {'rel err':>8s}", flush=True)
    for name, kind, lhs_shape, rhs_shape, transpose in gemms if args.sweep else []:
        lhs = jax.random.normal(next(keys), lhs_shape, bf16)
        rhs = (jax.random.normal(next(keys), rhs_shape, jnp.float32) / np.sqrt(lhs_shape[1])).astype(bf16)
        if kind == "product":
            ref = jax.jit(lambda a, b, g: gm.product(a, b, g, impl="ragged_dot", transpose_rhs=transpose))(lhs, rhs, gs)
            flops = 2 * M * lhs_shape[1] * ref.shape[1]
        else:
            ref = jax.jit(lambda a, b, g: gm.weight_grad(a, b, g, impl="ragged_dot"))(lhs, rhs, gs)
            flops = 2 * M * lhs_shape[1] * rhs_shape[1]
        dense = dense_rate(M, lhs_shape[1], flops // (2 * M * lhs_shape[1]))
        for tiles in tile_grid:
            if time.perf_counter() > deadline:
                print("budget spent", flush=True)
                break
            try:
                if kind == "product":
                    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
                    fn = jax.jit(lambda a, b, g, t=tiles: ragged_dot_mgpu.ragged_dot(
                        a, b, group_sizes=g, transpose_rhs=transpose, **t._asdict()))
                else:
                    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
                    fn = jax.jit(lambda a, b, g, t=tiles: transposed_ragged_dot_mgpu.transposed_ragged_dot(
                        a, b, group_sizes=g, **t._asdict()))
                err = rel(fn(lhs, rhs, gs).astype(jnp.float32), ref.astype(jnp.float32))
                s = timed(fn, lhs, rhs, gs)
            except Exception as exc:  # a tile that does not fit shared memory, or a shape it rejects
                print(f"{name:22s} {str(tuple(tiles)):34s} failed: {str(exc).splitlines()[0][:90]}", flush=True)
                continue
            tf = flops / s / 1e12
            print(f"{name:22s} {str(tuple(tiles)):34s} {s * 1e3:7.3f} {tf:8.1f} {err:8.1e}", flush=True)
            if err < 1e-2 and tf > best.get(name, (0.0, None))[0]:
                best[name] = (tf, tiles)
        if name in best:
            print(f"  best {name}: {best[name][0]:.0f} TFLOP/s = {best[name][0] / dense:.0%} of dense "
                  f"{dense:.0f} ({best[name][1]})", flush=True)

    # -- the expert MLP, forward + backward, both forms ---------------------------------------------
    n = M // K
    x = jax.random.normal(next(keys), (n, D), bf16)
    w_in = jax.random.normal(next(keys), (E, D, 2 * F), jnp.float32) / np.sqrt(D)
    w_out = jax.random.normal(next(keys), (E, F, D), jnp.float32) / np.sqrt(F)
    logits = jax.random.normal(next(keys), (n, E))
    weights, indices = jax.lax.top_k(jax.nn.softmax(logits), K)
    cot = jax.random.normal(next(keys), (n, D), bf16)
    flops = 3 * 6 * M * D * F
    outs = {}
    for gemm in ("blocks", "mosaic"):
        if time.perf_counter() > deadline:
            break
        fn = jax.jit(jax.value_and_grad(
            lambda x, wi, wo, g=gemm: jnp.sum(expert_mlp(x, indices, weights, None, wi, wo, gemm=g).astype(jnp.float32)
                                              * cot), argnums=(0, 1, 2)))
        outs[gemm] = fn(x, w_in, w_out)
        s = timed(fn, x, w_in, w_out, reps=10)
        print(f"expert_mlp fwd+bwd {gemm:7s}: {s * 1e3:7.2f} ms = {flops / s / 1e12:5.0f} TFLOP/s useful", flush=True)
    if len(outs) == 2:
        errs = [rel(np.asarray(a, np.float32), np.asarray(b, np.float32))
                for a, b in zip(jax.tree.leaves(outs["mosaic"]), jax.tree.leaves(outs["blocks"]))]
        print("mosaic vs blocks rel (loss, dx, dw_in, dw_out): " + ", ".join(f"{e:.1e}" for e in errs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

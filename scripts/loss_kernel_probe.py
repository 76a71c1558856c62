"""The JAX loss's pass over one chunk's logits, XLA's fusions against blues_jax/xent_kernel.py's
Pallas kernel and its launch shapes, at the bench chunk (1024 rows of Vp = 200064 bf16 logits).

    python scripts/loss_kernel_probe.py [--rows 1024]

Each variant -> (nll [R], grad [R, Vp]) is checked against the float32 reference (relative error <
1e-2) and timed; TB/s counts the bytes any form must move (the logits read once, the gradient
written once), so the figures compare directly. Needs a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.timing import jax_sync  # noqa: E402
from blues.config import BluesConfig  # noqa: E402
from gelu_probe import report  # noqa: E402  (scripts/ is the running script's directory)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    from blues_jax import xent_kernel

    cfg = BluesConfig.preset("bench")
    r, v, vp = args.rows, cfg.vocab_size, cfg.padded_vocab_size
    kl, kt = jax.random.split(jax.random.key(0))
    logits = (3 * jax.random.normal(kl, (r, vp), jnp.float32)).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (r,), 0, v)
    scale = jnp.full((r,), 1.0 / r, jnp.float32)
    ref = [np.asarray(a, np.float32) for a in xent_kernel._reference(logits.astype(jnp.float32), targets, scale, v)]
    print(f"JAX, logits [R, Vp] = [{r}, {vp}] bf16, V {v}")
    moved = 2 * r * vp * 2
    launches = [xent_kernel.LAUNCH] + [xent_kernel.Launch(*s) for s in ((4096, 1, 4), (2048, 14, 4), (4096, 49, 4), (2048, 49, 4), (8192, 25, 8))]
    variants = [("XLA's fusions (the reference)", False, xent_kernel.LAUNCH)] + [
        (f"Pallas, {l.block_elements} x {l.splits} splits x {l.num_warps} warps", True, l) for l in launches]
    for label, fused, launch in variants:
        fn = jax.jit(lambda l, t, s, fused=fused, launch=launch: xent_kernel.softmax_xent(
            l, t, s, v, fused=fused, launch=launch))
        report(label, lambda fn=fn: list(fn(logits, targets, scale)), jax_sync, ref, moved)


if __name__ == "__main__":
    main()

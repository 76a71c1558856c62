"""The loss's pass over one chunk's logits, each framework's compiler against its Triton kernels and
their launch shapes, at the bench chunk (1024 rows of Vp = 200064 bf16 logits) or --rows; and, for
PyTorch, whole compiled training steps at --train-chunks loss chunk sizes, kernel on and off.

    python scripts/loss_kernel_probe.py [--rows 1024] [--framework jax torch] [--train-chunks 1024 4096 --preset tiny]

JAX: XLA's fusions against blues_jax/xent_kernel.py's Pallas kernels. PyTorch: torch.compile's fusion
of loss._nll_and_grad_logits_eager against blues_torch/xent_kernel.py's kernels (which write the
gradient over the logits: each timed call overwrites the last call's gradient, the same work). Each
variant -> (nll [R], grad [R, Vp]) is checked against the float32 reference (relative error < 1e-2)
and timed; TB/s counts the bytes any form must move (the logits read once, the gradient written
once), so the figures compare directly. The training steps: bench/train_step.py's compiled step
(profile_gpu.py's), tokens/s by median of --steps and peak memory. Needs a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.timing import jax_sync, time_steps  # noqa: E402
from bench.train_step import _rel as rel  # noqa: E402
from blues.config import BluesConfig  # noqa: E402
from gelu_probe import report  # noqa: E402  (scripts/ is the running script's directory)


def probe_jax(r: int) -> None:
    import jax
    import jax.numpy as jnp

    from blues_jax import xent_kernel

    cfg = BluesConfig.preset("bench")
    v, vp = cfg.vocab_size, cfg.padded_vocab_size
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


def probe_torch(r: int) -> None:
    import torch

    from bench.timing import torch_sync
    from blues_torch import loss, xent_kernel

    cfg = BluesConfig.preset("bench")
    v, vp = cfg.vocab_size, cfg.padded_vocab_size
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(r, vp, device="cuda", generator=g)).bfloat16()  # [R, Vp]
    logits[:, v:] = float("-inf")  # as the aten form gets them (the kernels ignore the padding)
    targets = torch.randint(0, v, (r,), device="cuda", generator=g)
    valid = torch.ones(r, dtype=torch.bool, device="cuda")
    scale = torch.full((r,), 1.0 / r, device="cuda")
    x = logits.float()
    want_nll = torch.logsumexp(x, -1) - x.gather(1, targets[:, None])[:, 0]  # [R]
    _, want_grad = loss._nll_and_grad_logits_eager(x, targets, valid, scale, torch.float32, True)
    ref = [want_nll.cpu().numpy(), want_grad.cpu().numpy()]
    del x, want_grad
    print(f"PyTorch, logits [R, Vp] = [{r}, {vp}] bf16, V {v}")
    moved = 2 * r * vp * 2
    sync = lambda _: torch_sync("cuda")  # noqa: E731
    compiled = torch.compile(loss._nll_and_grad_logits_eager, dynamic=False, fullgraph=True)

    def aten():
        nll_sum, grad = compiled(logits, targets, valid, scale, torch.bfloat16, True)
        return [nll_sum, grad]

    # The aten form returns the summed nll; its check compares that sum (as a 1-element array).
    ref_aten = [np.asarray([ref[0].sum()], np.float32), ref[1]]
    report("torch.compile of the aten form (before)", lambda: [(out := aten())[0].reshape(1), out[1]], sync, ref_aten,
           moved)
    launches = [xent_kernel.LAUNCH] + [xent_kernel.Launch(*s) for s in ((4096, 49, 4), (4096, 7, 4), (8192, 25, 8),
                                                                         (8192, 1, 8), (2048, 1, 4))]
    work = torch.empty_like(logits)
    for launch in launches:
        def kernel(launch=launch, check=False):
            if check:
                work.copy_(logits)
            nll = xent_kernel.softmax_xent_(work, targets, scale, v, True, launch=launch)
            return [nll, work]
        out = [a.float().cpu().numpy() for a in kernel(check=True)]  # the check, on the logits
        err = max(rel(o, w) for o, w in zip(out, ref))
        label = f"Triton, {launch.block_elements} x {launch.splits} splits x {launch.num_warps} warps"
        ms = time_steps(kernel, sync, warmup=2, steps=5, reps=10).median_s * 1e3
        print(f"  {label:40s} {ms:7.3f} ms  {moved / ms / 1e9:5.2f} TB/s  rel err {err:.1e}"
              f"{'' if err < 1e-2 else '  MISMATCH'}", flush=True)


def train_chunks(preset: str, chunks: list[int], kernels: list[str], steps: int) -> None:
    """The compiled PyTorch training step at each loss chunk size, the Triton loss kernels on and/or off."""
    import statistics
    import time

    import torch

    from bench.train_step import random_batch, train_workload
    from blues_torch import xent_kernel
    from profile_gpu import GIB, _plain_step  # noqa: E402  (scripts/ is the running script's directory)

    wl = train_workload(preset, quick=False)
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, 0)
    ids = torch.from_numpy(ids_np).long().cuda()  # [B, T]
    tgt = torch.from_numpy(tgt_np).long().cuda()  # [B, T]
    applies = xent_kernel.fused_applies
    print(f"\nPyTorch compiled training step, {preset} (batch {wl.batch} x {wl.seq}), by loss chunk")
    for kernel in (k == "on" for k in kernels):
        xent_kernel.fused_applies = applies if kernel else (lambda logits: False)
        for chunk in chunks:
            forward, backward, update = _plain_step(wl, ids, tgt, compile=True, loss_chunk_size=chunk)
            for _ in range(3):  # compile and warm up
                backward(forward())
                update()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = forward()
                backward(loss)
                update()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            print(f"  loss kernel {'Triton' if kernel else 'aten (compiled)':16s} chunk {chunk:6d}: {ms:7.2f} ms "
                  f"{wl.tokens / ms * 1e3:10,.0f} tokens/s  peak {torch.cuda.max_memory_allocated() / GIB:6.2f} GiB"
                  f"  loss {loss.item():.3f}", flush=True)
            del forward, backward, update
            torch.cuda.empty_cache()
    xent_kernel.fused_applies = applies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--framework", nargs="*", choices=("torch", "jax"), default=["jax"])
    p.add_argument("--train-chunks", type=int, nargs="*", default=[])
    p.add_argument("--preset", default="tiny", help="--train-chunks: the preset (its bench batch and sequence)")
    p.add_argument("--kernels", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="--train-chunks: with the Triton loss kernels, without (the compiled aten form), or both")
    p.add_argument("--steps", type=int, default=20, help="--train-chunks: timed steps")
    args = p.parse_args()
    for framework in args.framework:
        (probe_torch if framework == "torch" else probe_jax)(args.rows)
    if args.train_chunks:
        train_chunks(args.preset, args.train_chunks, args.kernels, args.steps)


if __name__ == "__main__":
    main()

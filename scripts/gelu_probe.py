"""The experts' gated GeLU passes, each framework's fused kernel against its compiler's fusion, at
the bench preset's expert shape.

    python scripts/gelu_probe.py [--rows 32768] [--ffn 4096] [--framework torch jax]

hidden [M, 2F] = [value | gate] bf16. PyTorch: the backward (grad [M, F] -> d_hidden [M, 2F]) as
torch.compile fuses the aten formula, and as blues_torch/gated_gelu.py's Triton kernel; the forward
(inductor's fusion, for scale). JAX: the forward (-> act [M, F]) and the backward (-> act and
d_hidden, which the weight gradient and the next GEMM need), as XLA fuses blues_jax/gated_gelu.py's
definition and as its Pallas kernels. Each variant is checked against the float32 definition
(relative error < 1e-2: bf16 rounding) and timed; the bytes it must move (each input read once,
each output written once) over its time give its effective bandwidth. Needs a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.timing import jax_sync, time_steps, torch_sync  # noqa: E402
from bench.train_step import _rel as rel  # noqa: E402


def report(name, fn, sync, ref, moved) -> None:
    """fn() -> the variant's output arrays (a list), timed as is; ref: their float32 references."""
    try:
        out = fn()
        err = max(rel(np.asarray(_float(o)), r) for o, r in zip(out, ref))
        s = time_steps(fn, sync, warmup=2, steps=5, reps=10).median_s
        print(f"  {name:40s} {s * 1e3:7.3f} ms  {moved / s / 1e12:5.2f} TB/s  rel err {err:.1e}"
              f"{'' if err < 1e-2 else '  MISMATCH'}", flush=True)
    except Exception as e:  # a variant this software cannot run: say so, try the next
        print(f"  {name:40s} failed: {str(e).splitlines()[0][:120]}", flush=True)


def _float(a):
    """float32 on the host, from a torch tensor or a JAX array."""
    return a.float().cpu() if hasattr(a, "float") and hasattr(a, "cpu") else np.asarray(a, np.float32)


def probe_torch(m: int, f: int) -> None:
    import torch
    import torch.nn.functional as F

    from blues_torch import gated_gelu

    def aten_backward(hidden, grad):  # the formula inductor fuses (the fallback path)
        value, gate_pre = hidden.chunk(2, dim=-1)  # [M, F] each
        return torch.cat([grad * F.gelu(gate_pre), torch.ops.aten.gelu_backward(grad * value, gate_pre)], dim=-1)

    def forward(hidden):
        value, gate_pre = hidden.chunk(2, dim=-1)  # [M, F] each
        return F.gelu(gate_pre) * value

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(m, 2 * f, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(m, f, device="cuda", dtype=torch.bfloat16, generator=g)
    ref_bwd = [aten_backward(hidden.float(), grad.float()).cpu().numpy()]
    ref_fwd = [forward(hidden.float()).cpu().numpy()]
    sync = lambda _: torch_sync("cuda")  # noqa: E731
    print(f"PyTorch, [M, 2F] = [{m}, {2 * f}] bf16")
    compiled_aten = torch.compile(aten_backward)
    compiled_ours = torch.compile(gated_gelu.backward, fullgraph=True)
    compiled_fwd = torch.compile(forward)
    moved_bwd, moved_fwd = 2 * m * (2 * f + f + 2 * f), 2 * m * (2 * f + f)
    for name, fn, ref, moved in (
            ("backward, inductor's fusion (before)", lambda: compiled_aten(hidden, grad), ref_bwd, moved_bwd),
            ("backward, Triton kernel (compiled)", lambda: compiled_ours(hidden, grad), ref_bwd, moved_bwd),
            ("backward, Triton kernel (eager)", lambda: gated_gelu.backward(hidden, grad), ref_bwd, moved_bwd),
            ("forward, inductor's fusion", lambda: compiled_fwd(hidden), ref_fwd, moved_fwd)):
        report(name, lambda fn=fn: [fn()], sync, ref, moved)


def probe_jax(m: int, f: int) -> None:
    import jax
    import jax.numpy as jnp

    from blues_jax import gated_gelu

    kh, kg = jax.random.split(jax.random.key(0))
    hidden = jax.random.normal(kh, (m, 2 * f), jnp.bfloat16)
    d_act = jax.random.normal(kg, (m, f), jnp.bfloat16)
    h32 = hidden.astype(jnp.float32)
    ref_act, vjp = jax.vjp(lambda h: gated_gelu.gated_gelu(h, f), h32)
    ref_bwd = [np.asarray(ref_act), np.asarray(vjp(d_act.astype(jnp.float32))[0])]
    print(f"JAX, [M, 2F] = [{m}, {2 * f}] bf16")
    moved_fwd, moved_bwd = 2 * m * (2 * f + f), 2 * m * (2 * f + f + f + 2 * f)
    # The kernels' launch shapes (elements of a program's block per half, warps), the module's own first.
    own = (gated_gelu.FORWARD_LAUNCH, gated_gelu.BACKWARD_LAUNCH)
    others = [gated_gelu.Launch(*shape) for shape in ((4096, 4), (2048, 4), (4096, 8), (8192, 8), (8192, 4))]
    variants = [(False, "XLA's fusion (before)", own)] + [(True, "Pallas kernel, the module's launches", own)] + [
        (True, f"Pallas kernel, {launch.block_elements} x {launch.num_warps} warps", (launch, launch))
        for launch in others]
    for fused, label, (fwd_launch, bwd_launch) in variants:
        gated_gelu.FORWARD_LAUNCH, gated_gelu.BACKWARD_LAUNCH = fwd_launch, bwd_launch  # read when traced
        fwd = jax.jit(lambda h, fused=fused: gated_gelu.forward(h, f, fused=fused))
        bwd = jax.jit(lambda h, d, fused=fused: gated_gelu.backward(h, d, fused=fused))
        report(f"forward, {label}", lambda fwd=fwd: [fwd(hidden)], jax_sync, [np.asarray(ref_act)], moved_fwd)
        report(f"backward, {label}", lambda bwd=bwd: list(bwd(hidden, d_act)), jax_sync, ref_bwd, moved_bwd)
    gated_gelu.FORWARD_LAUNCH, gated_gelu.BACKWARD_LAUNCH = own


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--framework", nargs="+", choices=("torch", "jax"), default=["torch", "jax"])
    args = p.parse_args()
    for framework in args.framework:
        (probe_torch if framework == "torch" else probe_jax)(args.rows, args.ffn)


if __name__ == "__main__":
    main()

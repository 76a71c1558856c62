"""Formulations of the gated GeLU's backward under torch.compile, at the bench preset's expert shape.

    python scripts/torch_gelu_probe.py [--rows 32768] [--ffn 4096]

blues_torch.experts._GatedGelu's backward maps (hidden [M, 2F] = [value | gate], grad [M, F]) to
d_hidden [M, 2F]. In the compiled bench step inductor fused it into one kernel that ran at ~1.4 TB/s
(0.92 ms a layer) while the forward's pass over the same bytes ran at ~3.5 TB/s. Each variant here
is compiled alone, checked against the eager formula (bf16: relative error < 1e-2) and timed; the
bytes moved (read hidden and grad, write d_hidden) give its effective bandwidth. Needs a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.timing import time_steps, torch_sync  # noqa: E402
from bench.train_step import _rel as rel  # noqa: E402


def grads(hidden, grad):
    value, gate_pre = hidden.chunk(2, dim=-1)  # [M, F] each
    return grad * F.gelu(gate_pre), torch.ops.aten.gelu_backward(grad * value, gate_pre)  # [M, F] each


def cat(hidden, grad):
    """The current backward: both halves, concatenated."""
    return torch.cat(grads(hidden, grad), dim=-1)  # [M, 2F]


def stack(hidden, grad):
    """The halves stacked on a new middle axis: [M, 2, F] is the [M, 2F] layout."""
    return torch.stack(grads(hidden, grad), dim=1).flatten(1)  # [M, 2, F] -> [M, 2F]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32768)
    p.add_argument("--ffn", type=int, default=4096)
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(args.rows, 2 * args.ffn, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn(args.rows, args.ffn, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = cat(hidden.float(), grad.float())
    moved = 2 * (hidden.numel() + grad.numel() + hidden.numel())  # bytes: read hidden, grad; write d_hidden
    variants = {
        "cat (current)": torch.compile(cat),
        "stack": torch.compile(stack),
        "cat, no pointwise-cat fusion": torch.compile(cat, options={"max_pointwise_cat_inputs": 0}),
        "eager cat": cat,
    }
    print(f"gated GeLU backward, [M, 2F] = [{args.rows}, {2 * args.ffn}] bf16; {moved / 2**30:.2f} GiB moved")
    for name, fn in variants.items():
        try:
            out = fn(hidden, grad)
            err = rel(out.float().cpu().numpy(), ref.cpu().numpy())
            s = time_steps(lambda: fn(hidden, grad), lambda _: torch_sync("cuda"), warmup=2, steps=5, reps=10).median_s
            print(f"  {name:32s} {s * 1e3:7.3f} ms  {moved / s / 1e12:5.2f} TB/s  rel err {err:.1e}"
                  f"{'' if err < 1e-2 else '  MISMATCH'}")
        except Exception as e:  # a variant this torch cannot compile: say so, try the next
            print(f"  {name:32s} failed: {str(e).splitlines()[0][:120]}")


if __name__ == "__main__":
    main()

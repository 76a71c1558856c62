"""PyTorch's Triton kernels in Triton's interpreter, on a CPU: `python tests/triton_interpreted.py CHECK`
with TRITON_INTERPRET=1 set (tests/test_triton_interpreter.py runs each check in its own process, as
Triton reads the variable when it is imported). Exits 0 when the check holds.

The interpreter runs each program of a launch with numpy, so these checks hold the kernels' indexing,
masks, online softmaxes and float32 math to the functions they compute; their GPU compile and speed
are tests/test_gpu.py's and the benchmark's. A kernel with a `tl.dot` runs in float16 and float32
here: the interpreter's bf16 dot is wrong (a 16 x 16 product came out ~1e10 off, Triton 3.6 and
3.7); the GPU tests run it in bf16.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

from blues.xent_launch import Launch  # noqa: E402
from blues_torch import gated_gelu, loss, xent_kernel  # noqa: E402


def loss_kernels() -> None:
    """xent_kernel.softmax_xent_ against the float32 aten form: V 10001 in Vp 10048 (a partial last
    piece; padding columns hold 5.0, which the kernels must mask), targets at both ends of the
    vocabulary, rows of scale 0, bf16 logits, one split a row (the trainer's launch) and three (a
    split wholly past V). Tolerances as tests/test_gpu.py's: the nll is float32 math on the same
    bf16 logits; the gradient is rounded to bf16 on both sides (one bf16 unit, 2^-7 relative)."""
    g = torch.Generator().manual_seed(8)
    r, v, vp = 48, 10001, 10048
    for launch in (xent_kernel.LAUNCH, Launch(1024, 3, 4), Launch(4096, 4, 4)):
        logits = (3 * torch.randn(r, vp, generator=g)).bfloat16()  # [R, Vp]
        logits[:, v:] = 5.0
        targets = torch.randint(0, v, (r,), generator=g)
        targets[:2] = torch.tensor([0, v - 1])
        scale = torch.where(torch.arange(r) % 7 == 0, 0.0, 1.0 / r)  # [R]
        x = logits.float()
        x[:, v:] = float("-inf")
        want_nll = torch.logsumexp(x, -1) - x.gather(1, targets[:, None])[:, 0]  # [R]
        _, want_grad = loss._nll_and_grad_logits_eager(x, targets, torch.ones(r, dtype=torch.bool), scale,
                                                       torch.bfloat16, True)
        nll = xent_kernel.softmax_xent_(logits, targets, scale, v, with_grad=True, launch=launch)
        torch.testing.assert_close(nll, want_nll, rtol=0, atol=2e-5)
        torch.testing.assert_close(logits[:, :v].float(), want_grad[:, :v].float(), rtol=2 ** -7, atol=1e-12)
        assert torch.count_nonzero(logits[:, v:]) == 0, launch


def gated_gelu_backward() -> None:
    """The experts' fused gated-GeLU backward against the aten formula it replaces, bf16, on a row
    count and a width its blocks do not divide (masked edges). Tolerance as tests/test_gpu.py's: both
    compute float32 and round once to bf16 (one bf16 unit apart at most)."""
    g = torch.Generator().manual_seed(6)
    m, f = 101, 384
    hidden = torch.randn(m, 2 * f, generator=g).mul(2).bfloat16()
    grad = torch.randn(m, f, generator=g).bfloat16()
    value, gate = hidden.float().chunk(2, dim=-1)
    want = torch.cat([grad.float() * F.gelu(gate), torch.ops.aten.gelu_backward(grad.float() * value, gate)], dim=-1)
    got = torch.ops.blues.gated_gelu_backward(hidden, grad)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 2 * f)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-5)


CHECKS = {"loss_kernels": loss_kernels, "gated_gelu_backward": gated_gelu_backward}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    assert xent_kernel.triton is not None, "Triton is not installed"
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")

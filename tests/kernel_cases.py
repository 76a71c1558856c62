"""PyTorch's Triton kernels held to their reference forms, on any device: the GPU tests
(tests/test_gpu.py) run these on CUDA, tests/triton_interpreted.py in Triton's interpreter on a CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from blues.xent_launch import Launch
from blues_torch import loss, xent_kernel


def check_loss_kernels(rows: int, vocab: int, padded: int, generator: torch.Generator,
                       launch: Launch = xent_kernel.LAUNCH) -> None:
    """xent_kernel.softmax_xent_ on bf16 logits [rows, padded] against the float32 aten form: padding
    columns holding 5.0 (not -inf: the kernels must mask them), targets at both ends of the vocabulary,
    rows of scale 0. Tolerances as the JAX kernel's test: the nll is float32 math on the same bf16
    logits (2e-5 absolute on values ~15); the gradient is rounded to bf16 on both sides (one bf16
    unit, 2^-7 relative)."""
    device = generator.device
    logits = (3 * torch.randn(rows, padded, device=device, generator=generator)).bfloat16()  # [R, Vp]
    logits[:, vocab:] = 5.0
    targets = torch.randint(0, vocab, (rows,), device=device, generator=generator)
    targets[:2] = torch.tensor([0, vocab - 1])
    scale = torch.where(torch.arange(rows, device=device) % 7 == 0, 0.0, 1.0 / rows)  # [R]
    x = logits.float()
    x[:, vocab:] = float("-inf")
    want_nll = torch.logsumexp(x, -1) - x.gather(1, targets[:, None])[:, 0]  # [R]
    valid = torch.ones(rows, dtype=torch.bool, device=device)
    _, want_grad = loss._nll_and_grad_logits_eager(x, targets, valid, scale, torch.bfloat16, True)
    nll = xent_kernel.softmax_xent_(logits, targets, scale, vocab, with_grad=True, launch=launch)  # logits: the gradient
    torch.testing.assert_close(nll, want_nll, rtol=0, atol=2e-5)
    torch.testing.assert_close(logits[:, :vocab].float(), want_grad[:, :vocab].float(), rtol=2 ** -7, atol=1e-12)
    assert torch.count_nonzero(logits[:, vocab:]) == 0, launch


def check_gated_gelu_backward(backward, m: int, f: int, generator: torch.Generator) -> None:
    """backward(hidden [m, 2F], grad [m, F]) -> d_hidden, bf16, against the aten formula the Triton
    kernel replaces. Both compute float32 and round once to bf16: they may differ by one bf16 unit
    (2^-7 of the value) where the two float32 results straddle a rounding boundary."""
    device = generator.device
    hidden = torch.randn(m, 2 * f, device=device, generator=generator).mul(2).bfloat16()
    grad = torch.randn(m, f, device=device, generator=generator).bfloat16()
    value, gate = hidden.float().chunk(2, dim=-1)
    want = torch.cat([grad.float() * F.gelu(gate), torch.ops.aten.gelu_backward(grad.float() * value, gate)], dim=-1)
    got = backward(hidden, grad)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 2 * f)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-5)

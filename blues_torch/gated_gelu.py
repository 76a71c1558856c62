"""The experts' activation, gated GeLU: hidden [..., 2F] (value columns first, then gate) -> [..., F]
gelu(gate) * value, exact (erf) GeLU computed in float32. Mirrors blues_jax/gated_gelu.py.

`gated_gelu` keeps only its input for the backward and recomputes the GeLU there. On a CUDA device
with Triton the backward is one Triton kernel that treats each [value, gate] pair of columns
together: it reads both once, computes erf once and writes both gradient columns. Inductor's
fusion of the aten formula writes the [d_value | d_gate] concatenation one output column at a
time, so each pair is read and its erf computed twice: it ran at 1.5 TB/s, 0.9 ms a layer of the
bench step on an H200, in every formulation tried (scripts/gelu_probe.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the aten backward below
    triton = None


def gated_gelu(hidden: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]: GeLU(gate) * value, columns [0, F) value, [F, 2F) gate."""
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _GatedGelu.apply(hidden)
    value, gate_pre = hidden.chunk(2, dim=-1)  # [..., F] each
    return F.gelu(gate_pre) * value


class _GatedGelu(torch.autograd.Function):
    """GeLU(gate) * value that keeps only its input for the backward. Autograd's version saves
    the input and GeLU(gate) ([M, F] more: 256 MiB per layer at the bench size); this one
    recomputes the GeLU, an elementwise pass, in the backward."""

    @staticmethod
    def forward(ctx, hidden):
        ctx.save_for_backward(hidden)
        value, gate_pre = hidden.chunk(2, dim=-1)  # [..., F] each
        return F.gelu(gate_pre) * value  # exact erf GeLU (the default)

    @staticmethod
    def backward(ctx, grad):
        (hidden,) = ctx.saved_tensors
        return backward(hidden, grad)


def backward(hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """hidden [..., 2F], grad [..., F] -> d_hidden [..., 2F] in hidden's dtype."""
    if fused_applies(hidden):
        return torch.ops.blues.gated_gelu_backward(hidden, grad.to(hidden.dtype))
    value, gate_pre = hidden.chunk(2, dim=-1)  # [..., F] each
    # aten's own GeLU kernels (float32 inside, as autograd's backward)
    grad_value = grad * F.gelu(gate_pre)
    grad_gate = torch.ops.aten.gelu_backward(grad * value, gate_pre)
    return torch.cat([grad_value, grad_gate], dim=-1)  # [..., 2F]


def fused_applies(hidden: torch.Tensor) -> bool:
    return triton is not None and hidden.is_cuda


if triton is not None:
    _BLOCK_ELEMENTS = 4096  # a program's [BLOCK_M, BLOCK_F] block of each half: 32 per thread at 4 warps

    @triton.jit
    def _backward_kernel(hidden_ptr, grad_ptr, out_ptr, m, f, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]  # [BM, 1]
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)[None, :]  # [1, BF]
        mask = (rows < m) & (cols < f)  # [BM, BF]
        pair = rows * (2 * f) + cols  # [BM, BF] offset of the value column; its gate is f further on
        value = tl.load(hidden_ptr + pair, mask=mask).to(tl.float32)
        gate = tl.load(hidden_ptr + pair + f, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + rows * f + cols, mask=mask).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))  # Phi(gate); 1/sqrt(2)
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327  # phi(gate); 1/sqrt(2 pi)
        out = out_ptr.dtype.element_ty
        tl.store(out_ptr + pair, (grad * gate * cdf).to(out), mask=mask)  # d value
        tl.store(out_ptr + pair + f, (grad * value * (cdf + gate * pdf)).to(out), mask=mask)  # d gate

    # An opaque custom op: torch.compile keeps it in the graph and calls it as an extern kernel.
    # As a triton_op (inductor schedules the kernel itself) the compiled bench step runs at the same
    # speed but peaks at 27.3 GiB instead of 23.2 (H200).
    @torch.library.custom_op("blues::gated_gelu_backward", mutates_args=())
    def _fused_backward(hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        hidden, grad = hidden.contiguous(), grad.contiguous()
        f = grad.shape[-1]
        m = grad.numel() // f
        out = torch.empty_like(hidden)  # [..., 2F]
        block_f = min(512, triton.next_power_of_2(f))
        block_m = max(1, _BLOCK_ELEMENTS // block_f)
        grid = (triton.cdiv(m, block_m), triton.cdiv(f, block_f))
        _backward_kernel[grid](hidden, grad, out, m, f, BLOCK_M=block_m, BLOCK_F=block_f)
        return out

    @_fused_backward.register_fake
    def _(hidden: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(hidden, memory_format=torch.contiguous_format)

"""The tied LM head and the language-model loss, plain and chunked.

The embedding holds Vp = padded_vocab_size rows (rows V..Vp-1 zero). The head multiplies by all Vp
rows (a multiple of 128 keeps the GEMM on tensor-core kernels) and then drops or masks the padding
columns, so they never reach a softmax, a loss or a gradient.

Loss convention: mean token cross-entropy over targets != IGNORE_INDEX, in float32. With no valid
target at all the loss is 0 (not NaN) and every gradient is 0, so a fully masked batch is a no-op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The activation dtype for a matmul: the autocast dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lm_head_logits(h: torch.Tensor, embed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """h [..., d] @ embed[Vp, d]^T -> logits [..., V] (padding columns sliced off)."""
    return (h @ embed.t())[..., :vocab_size]  # [..., Vp] -> [..., V]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean float32 cross-entropy over targets != -100 (0 when there are none). logits [..., V], targets [...]."""
    flat = logits.reshape(-1, logits.shape[-1]).float()  # [N, V]
    tgt = targets.reshape(-1)  # [N]
    total = F.cross_entropy(flat, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
    # clamp: with no valid target the sum is 0 and so is the loss (F.cross_entropy's mean gives NaN)
    return total / (tgt != IGNORE_INDEX).sum().clamp(min=1)


class _ChunkedLMLoss(torch.autograd.Function):
    """Cross-entropy of h @ embed^T, chunk by chunk over tokens; never holds the [N, Vp] logits.

    forward keeps nothing of chunk size; backward recomputes one chunk's logits at a time, turns
    them into (softmax - onehot) * d(loss)/d(nll) and accumulates grad_h and grad_embed.
    """

    @staticmethod
    def forward(ctx, h, embed, targets, vocab_size, chunk_size, dtype):
        # h [N, d], embed [Vp, d], targets [N]; matmuls in `dtype`, everything else float32.
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = embed.to(dtype)  # [Vp, d]
            valid = targets != IGNORE_INDEX  # [N]
            safe_targets = targets.clamp(min=0)  # ignored rows read column 0, then are zeroed
            n_valid = valid.sum().clamp(min=1).float()
            total = torch.zeros((), device=h.device, dtype=torch.float32)
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                logits = _chunk_logits(h[sl], w, vocab_size, dtype)  # [c, Vp] float32
                nll = F.cross_entropy(logits, safe_targets[sl], reduction="none")  # [c]
                total += (nll * valid[sl]).sum()
        ctx.save_for_backward(h, embed, safe_targets, valid, n_valid)
        ctx.vocab_size, ctx.chunk_size, ctx.dtype = vocab_size, chunk_size, dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        h, embed, safe_targets, valid, n_valid = ctx.saved_tensors
        with torch.autocast(device_type=h.device.type, enabled=False):
            return _ChunkedLMLoss._backward(ctx, grad_loss, h, embed, safe_targets, valid, n_valid)

    @staticmethod
    def _backward(ctx, grad_loss, h, embed, safe_targets, valid, n_valid):
        dtype = ctx.dtype
        w = embed.to(dtype)  # [Vp, d]
        need_h, need_embed = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None  # [N, d]
        grad_embed = torch.zeros(embed.shape, device=embed.device, dtype=torch.float32) if need_embed else None
        scale = (grad_loss.float() / n_valid) * valid.float()  # [N] d(loss)/d(token nll)
        for start in range(0, h.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h_c = h[sl].to(dtype)  # [c, d]
            probs = _chunk_logits(h_c, w, ctx.vocab_size, dtype).softmax(dim=-1)  # [c, Vp]; padding columns 0
            probs.scatter_add_(1, safe_targets[sl, None], -torch.ones_like(probs[:, :1]))  # softmax - onehot
            # Scale and narrow to the matmul dtype in one pass (mul writes straight into a `dtype` buffer).
            grad_logits = torch.mul(probs, scale[sl, None], out=torch.empty_like(probs, dtype=dtype))  # [c, Vp]
            del probs
            if need_h:
                grad_h[sl] = (grad_logits @ w).to(h.dtype)  # [c, d]
            if need_embed:
                grad_embed += _mm_float32(grad_logits.t(), h_c)  # [Vp, d]
        if need_embed:
            grad_embed = grad_embed.to(embed.dtype)
        return grad_h, grad_embed, None, None, None, None


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. For bf16/fp16 on CUDA the GEMM writes float32 directly
    (fp32 accumulators, no rounding of the logits to bf16, no separate cast pass)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """float32 logits [c, Vp] of one chunk, padding columns at -inf so no softmax sees them."""
    logits = _mm_float32(h.to(dtype), w.t())  # [c, Vp]
    logits[:, vocab_size:] = float("-inf")
    return logits


def chunked_lm_loss(h: torch.Tensor, embed: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    chunk_size: int) -> torch.Tensor:
    """Mean cross-entropy of the tied head, chunk by chunk. h [N, d] (or [B, T, d]), targets [N] (or [B, T]).

    Equal to cross_entropy(lm_head_logits(h, embed, V), targets) to float32 rounding, gradients
    included, with peak memory [chunk_size, Vp] instead of [N, Vp].
    """
    h = h.reshape(-1, h.shape[-1])  # [N, d]
    return _ChunkedLMLoss.apply(h, embed, targets.reshape(-1), vocab_size, chunk_size, _matmul_dtype(h))

"""The tied LM head and the language-model loss, plain and chunked.

The embedding holds Vp = padded_vocab_size rows (rows V..Vp-1 zero). The head multiplies by all Vp
rows (a multiple of 128 keeps the GEMM on tensor-core kernels) and then drops or masks the padding
columns, so they never reach a softmax, a loss or a gradient.

Loss convention: mean token cross-entropy over targets != IGNORE_INDEX, in float32. With no valid
target at all the loss is 0 (not NaN) and every gradient is 0, so a fully masked batch is a no-op.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from blues_torch import xent_kernel

logger = logging.getLogger("blues")

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

    Fused forward and backward (as Liger's fused linear cross-entropy): while a chunk's logits are
    in memory the forward also turns them into (softmax - onehot) / n_valid and accumulates
    grad_h and grad_embed, so no logit is computed twice (3 GEMMs of the head instead of 4, and
    fewer passes over the [c, Vp] logits). backward only scales the stored gradients by d(out)/d(loss).
    The cost: grad_embed [Vp, d] float32 is held from the forward to the backward.
    """

    @staticmethod
    def forward(ctx, h, embed, targets, vocab_size, chunk_size, dtype, need_h, need_embed):
        # h [N, d], embed [Vp, d], targets [N]; matmuls in `dtype`, everything else float32.
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = embed.to(dtype)  # [Vp, d]
            valid = targets != IGNORE_INDEX  # [N]
            safe_targets = targets.clamp(min=0)  # ignored rows read column 0, then are zeroed
            n_valid = valid.sum().clamp(min=1).float()
            scale = valid.float() / n_valid  # [N] d(loss)/d(token nll)
            grad_h = torch.empty_like(h) if need_h else None  # [N, d]
            grad_embed = torch.zeros(embed.shape, device=embed.device, dtype=torch.float32) if need_embed else None
            total = torch.zeros((), device=h.device, dtype=torch.float32)
            for start in range(0, h.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                h_c = h[sl].to(dtype)  # [c, d]
                logits = h_c @ w.t()  # [c, Vp] in dtype: see _nll_and_grad_logits_eager
                nll, grad_logits = _nll_and_grad_logits(logits, safe_targets[sl], valid[sl], scale[sl], vocab_size,
                                                        dtype, need_h or need_embed)  # [], [c, Vp] in dtype
                total += nll
                del logits
                if grad_logits is None:
                    continue
                if need_h:
                    grad_h[sl] = (grad_logits @ w).to(h.dtype)  # [c, d]
                if need_embed:
                    _addmm_float32_(grad_embed, grad_logits.t(), h_c)  # [Vp, d] += [Vp, c] @ [c, d]
        ctx.save_for_backward(grad_h, grad_embed)
        ctx.embed_dtype = embed.dtype
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_embed = ctx.saved_tensors
        g = grad_loss.float()  # the loss is linear in its stored gradients' scale
        grad_h = None if grad_h is None else (grad_h * g).to(grad_h.dtype)
        grad_embed = None if grad_embed is None else (grad_embed * g).to(ctx.embed_dtype)
        return grad_h, grad_embed, None, None, None, None, None, None


def _nll_and_grad_logits_eager(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                               dtype: torch.dtype, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's logits [c, Vp] (the matmul dtype, padding at -inf) -> (sum of the valid rows'
    nll, (softmax - onehot) * scale [c, Vp] in `dtype`, or None without gradients); float32 math.

    The logits are rounded to the matmul dtype (bf16 in training), as the plain path under autocast and
    the usual fused losses (Liger, Megatron) keep them: written and read back at 2 bytes instead of 4,
    this is ~40% of the loss's memory traffic at V = 200k. The softmax is written as amax -> subtract
    -> exp -> sum (not torch.logsumexp, whose inf guard hides the pattern) so inductor's online-softmax
    pass computes max and sum in one read of the logits. The passes run in place (fused under compile,
    they make no difference there): on a CPU, where nothing fuses, a chunk holds one float32 [c, Vp]
    buffer instead of four or five: the loss of 8192 tokens at V = 200k, forward and backward, peaks
    at 11.0 GB of CPU RSS with chunk 4096 and 15.0 GB with chunk 8192 (out of place: 20.6 and 23.9 GB)."""
    x = logits.float()  # [c, Vp]: a float32 copy, or float32 logits themselves (overwritten below)
    target_logit = x.gather(1, targets[:, None]).squeeze(1)  # [c]
    row_max = x.amax(dim=-1, keepdim=True)  # [c, 1]
    e = x.sub_(row_max).exp_()  # [c, Vp]
    total = e.sum(dim=-1, keepdim=True)  # [c, 1]
    lse = (row_max + total.log()).squeeze(1)  # [c]
    nll = ((lse - target_logit) * valid).sum()
    if not with_grad:
        return nll, None
    onehot = torch.arange(x.shape[-1], device=x.device) == targets[:, None]  # [c, Vp] bool
    grad = e.div_(total).add_(onehot, alpha=-1).mul_(scale[:, None])  # [c, Vp]; padding 0
    return nll, grad.to(dtype)


_COMPILED_NLL: list = []  # [the torch.compile'd function], built on first use on a GPU


def _nll_and_grad_logits(logits, targets, valid, scale, vocab_size, dtype, with_grad):
    """One chunk's logits [c, Vp] in the matmul dtype -> (sum of the valid rows' nll, the gradient
    (softmax - onehot) * scale [c, Vp] in `dtype`, or None without gradients).

    On a GPU with 16-bit logits: blues_torch/xent_kernel.py's Triton kernels, which write the
    gradient over the logits (no second [c, Vp] buffer). Other GPU cases: `_nll_and_grad_logits_eager`
    fused by torch.compile (an online-softmax reduction and a gradient pass instead of ~7 eager passes;
    the loss's elementwise work rivalled its GEMMs at V = 200k, docs/performance.md). On a CPU, and if
    compiling fails, the eager form."""
    if xent_kernel.fused_applies(logits):
        nll = xent_kernel.softmax_xent_(logits, targets, scale, vocab_size, with_grad)  # [c]
        return (nll * valid).sum(), (logits if with_grad else None)
    logits[:, vocab_size:] = float("-inf")  # the padding columns leave the softmax
    if not logits.is_cuda:
        return _nll_and_grad_logits_eager(logits, targets, valid, scale, dtype, with_grad)
    if not _COMPILED_NLL:
        _COMPILED_NLL.append(torch.compile(_nll_and_grad_logits_eager, dynamic=False, fullgraph=True))
    try:
        return _COMPILED_NLL[0](logits, targets, valid, scale, dtype, with_grad)
    except Exception as e:  # no working Triton/compiler: correct, just slower
        logger.warning("loss: torch.compile of the chunk softmax failed (%s); running it eagerly",
                       str(e).splitlines()[0] if str(e) else type(e).__name__)
        _COMPILED_NLL[0] = _nll_and_grad_logits_eager
        return _nll_and_grad_logits_eager(logits, targets, valid, scale, dtype, with_grad)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with a float32 result. For bf16/fp16 on CUDA the GEMM writes float32 directly
    (fp32 accumulators, no rounding to bf16, no separate cast pass)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


_ADDMM_EPILOGUE = [True]  # cleared if this torch cannot accumulate a bf16 GEMM into a float32 buffer


def _addmm_float32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc float32. For bf16/fp16 on CUDA the GEMM reads acc as its C operand
    (beta = 1): one pass over acc per chunk instead of a GEMM output plus a separate add, which at
    Vp x d = 200k x 1024 and 16 chunks a step is ~40 GB of memory traffic saved."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and _ADDMM_EPILOGUE[0]:
        try:
            torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
            return
        except Exception as e:  # an older torch without the mixed-dtype addmm: the plain add below
            logger.warning("loss: bf16 -> float32 addmm unavailable (%s); accumulating with a separate add",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            _ADDMM_EPILOGUE[0] = False
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += _mm_float32(a, b)


# Kept out of a torch.compile'd model's graph (a graph break here): traced, the chunk loop is
# unrolled and inductor may schedule every chunk's GEMM before the reductions, holding all of the
# [chunk, Vp] logits at once (12 GiB at 16k tokens; and torch 2.11 cannot trace the bf16 -> float32
# addmm at all). Outside it, the loop runs chunk after chunk and `_nll_and_grad_logits` still runs as
# its own compiled kernel.
@torch.compiler.disable
def chunked_lm_loss(h: torch.Tensor, embed: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                    chunk_size: int) -> torch.Tensor:
    """Mean cross-entropy of the tied head, chunk by chunk. h [N, d] (or [B, T, d]), targets [N] (or [B, T]).

    Equal to cross_entropy(lm_head_logits(h, embed, V), targets) to float32 rounding, gradients
    included, with peak memory [chunk_size, Vp] instead of [N, Vp].
    """
    h = h.reshape(-1, h.shape[-1])  # [N, d]
    # Which gradients the fused forward computes: none under no_grad (evaluation pays the forward only).
    grads = torch.is_grad_enabled()
    return _ChunkedLMLoss.apply(h, embed, targets.reshape(-1), vocab_size, chunk_size, _matmul_dtype(h),
                                grads and h.requires_grad, grads and embed.requires_grad)

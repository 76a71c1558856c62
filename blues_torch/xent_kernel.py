"""The chunked loss's pass over one chunk's logits: the log-partition, the loss and the softmax's gradient.
Mirrors blues_jax/xent_kernel.py.

    softmax_xent_(logits [R, Vp], targets [R], scale [R], vocab_size, with_grad) -> nll [R] float32

nll[r] = logsumexp(logits[r, :V]) - logits[r, targets[r]]. With `with_grad` the logits are overwritten
in place by the gradient, (softmax(logits[r, :V]) - onehot(targets[r])) * scale[r] in their own dtype,
0 in the padding columns V..Vp-1 (which never reach the softmax; whatever they held is ignored). All
math is float32; the logits come as the LM head's GEMM writes them (bf16 in training).

Two Triton kernels, as in JAX. The first gives each row to `splits` programs (here one, which walks the
whole row: the fastest launch on an H200); each keeps a running max and a rescaled running sum (the
online softmax) and picks out the target's logit, in one read; a few torch ops combine the splits'
numbers into the row's log-partition; the second rewrites the logits as the gradient. Bytes moved:
3 x R x Vp x 2 (two reads, one write), and no second [R, Vp] buffer: the gradient takes the logits'
place. The compiled aten form (`loss._nll_and_grad_logits_eager` under torch.compile) takes 8.0 ms
of a 26.7 ms tiny step on an H200: inductor splits the reduction over a row, and its split reduction
has no online softmax.
"""
from __future__ import annotations

import torch

from blues.xent_launch import Launch, geometry

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: loss.py's aten form
    triton = None


# One program a row, walking its 49 pieces of 4096 (H200, scripts/loss_kernel_probe.py --framework torch):
# 0.411-0.416 ms at 1024 rows and 1.410 at 4096, against 0.416-0.461 and 1.550-1.557 for JAX's
# launch of 49 programs a row, 0.57 and 2.1 for 7 a row; torch.compile's fusion: 0.519 and 2.002.
LAUNCH = Launch(4096, 1, 4)


def fused_applies(logits: torch.Tensor) -> bool:
    """The kernels run on a CUDA device with Triton, on the 16-bit logits of mixed-precision training."""
    return triton is not None and logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16)


def softmax_xent_(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, vocab_size: int,
                  with_grad: bool, launch: Launch = LAUNCH) -> torch.Tensor:
    """logits [R, Vp] (contiguous; overwritten by the gradient when with_grad), targets [R] int in
    [0, V), scale [R] float32 -> nll [R] float32."""
    rows, vp = logits.shape
    assert logits.is_contiguous() and 0 < vocab_size <= vp, (logits.shape, logits.stride(), vocab_size)
    block, splits, per_split = geometry(vp, launch)
    targets = targets.to(torch.int32)
    grid = (rows, splits)
    run_max, run_sum, target_logit = (torch.empty(rows, splits, device=logits.device, dtype=torch.float32)
                                      for _ in range(3))  # [R, splits] each
    _statistics_kernel[grid](logits, targets, run_max, run_sum, target_logit, splits, vocab_size, vp,
                             PER_SPLIT=per_split, BLOCK=block, num_warps=launch.num_warps, num_stages=1)
    # The splits' statistics combined: a few numbers a row.
    row_max = run_max.amax(dim=1, keepdim=True)  # [R, 1]; finite: the first split holds real columns
    lse = row_max.squeeze(1) + (run_sum * (run_max - row_max).exp()).sum(dim=1).log()  # [R]
    nll = lse - target_logit.sum(dim=1)  # [R]
    if with_grad:
        _gradient_kernel[grid](logits, targets, scale.float().contiguous(), lse, vocab_size, vp,
                               PER_SPLIT=per_split, BLOCK=block, num_warps=launch.num_warps, num_stages=1)
    return nll


# exp(x) as 2^(x log2 e): Triton's exp2 is the GPU's ex2 instruction, its exp a longer libdevice
# routine (0.429 -> 0.384 ms a bench chunk in JAX's kernel on an H200). The statistics kernel's sum is
# the same either way, sum 2^(y - max y) = sum e^(x - max x) for y = x log2 e; its max is reported in
# natural units. (The constants are literals in the kernels: a jit function reads no Python global.)
if triton is not None:
    @triton.jit
    def _piece(row_ptr, split, j, vocab, padded, PER_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """The split's j-th piece: (its columns [BLOCK], float32 logits [BLOCK], padding at -inf).
        Columns past Vp (the last piece) are not read. The load's mask is against Vp (a multiple of
        16, which Triton knows of an int argument), not V: a mask constant over each vector keeps
        the loads vectorised."""
        cols = (split * PER_SPLIT + j) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
        x = tl.load(row_ptr + cols, mask=cols < padded, other=float("-inf")).to(tl.float32)
        return cols, tl.where(cols < vocab, x, float("-inf"))

    @triton.jit
    def _statistics_kernel(logits_ptr, targets_ptr, max_ptr, sum_ptr, target_logit_ptr, splits, vocab, padded,
                           PER_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """One split of one row: its max, its sum of exp(x - max) (the online softmax: the running sum
        is rescaled whenever the max grows) and the target's logit if it falls here (else 0)."""
        row = tl.program_id(0).to(tl.int64)  # R x Vp passes 2^31 at 16k rows
        split = tl.program_id(1)
        row_ptr = logits_ptr + row * padded
        target = tl.load(targets_ptr + row)
        run_max = tl.full((), float("-inf"), tl.float32)  # in base-2 units (see exp2 above)
        run_sum = tl.zeros((), tl.float32)
        target_logit = tl.zeros((), tl.float32)
        for j in range(PER_SPLIT):
            cols, x = _piece(row_ptr, split, j, vocab, padded, PER_SPLIT, BLOCK)
            y = x * 1.4426950408889634  # log2(e)
            new_max = tl.maximum(run_max, tl.max(y, axis=0))
            # A split wholly past V keeps max -inf: shift by 0 there, so that 2^(-inf - -inf) never runs.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(y - shift), axis=0)
            target_logit += tl.sum(tl.where(cols == target, x, 0.0), axis=0)
            run_max = new_max
        out = row * splits + split
        tl.store(max_ptr + out, run_max * 0.6931471805599453)  # ln(2): back to natural units
        tl.store(sum_ptr + out, run_sum)
        tl.store(target_logit_ptr + out, target_logit)

    @triton.jit
    def _gradient_kernel(logits_ptr, targets_ptr, scale_ptr, lse_ptr, vocab, padded,
                         PER_SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        """One split of one row: (softmax - onehot) * scale written over the logits, the padding columns 0.
        Each element is read and then written by the same program, so in place is safe."""
        row = tl.program_id(0).to(tl.int64)
        split = tl.program_id(1)
        row_ptr = logits_ptr + row * padded
        target = tl.load(targets_ptr + row)
        scale = tl.load(scale_ptr + row)
        lse2 = tl.load(lse_ptr + row) * 1.4426950408889634  # log2(e)
        for j in range(PER_SPLIT):
            cols, x = _piece(row_ptr, split, j, vocab, padded, PER_SPLIT, BLOCK)
            # exp2(-inf) = 0 in the padding columns, and no target is there: their gradient is 0.
            grad = (tl.exp2(x * 1.4426950408889634 - lse2) - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=cols < padded)

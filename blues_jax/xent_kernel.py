"""The chunked loss's pass over one chunk's logits: the log-partition, the loss and the softmax's gradient.

    softmax_xent(logits [R, Vp], targets [R], scale [R], vocab_size) -> (nll [R] float32, grad [R, Vp])

nll[r] = logsumexp(logits[r, :V]) - logits[r, targets[r]], grad[r] = (softmax(logits[r, :V]) -
onehot(targets[r])) * scale[r] in logits' dtype, 0 in the padding columns V..Vp-1 (which never reach
the softmax). All math is float32; logits come as the LM head's GEMM writes them (bf16 in training).

The reference (`fused=False`) is XLA's: at the bench size on an H200 it makes three passes over each
chunk's [1024, 200064] logits (the max, the sum of exponentials, the gradient: 9.2 ms of a 142 ms step,
2.4-3.6 TB/s). The Pallas (Triton) kernels make two. The first splits
each row among programs; each keeps a running max and a rescaled running sum (the online softmax)
and picks out the target's logit, in one read; XLA combines the splits' few numbers into the row's
log-partition; the second writes the gradient. Bytes moved: 3 x R x Vp x 2 instead of 4 x. On an
H200: 0.38 ms a chunk against XLA's 0.55, the bench step 136 ms against 142.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from blues.xent_launch import Launch, geometry


# Picked on an H200 at the bench chunk, [1024, 200064] bf16 (scripts/loss_kernel_probe.py): one
# program per 4096 logits, 49 a row (0.384 ms; 7 programs a row walking 7 pieces each, 0.407 ms;
# one program a row walking all 49 pieces, 0.446: too few loads in flight; XLA's fusions 0.546).
LAUNCH = Launch(4096, 49, 4)


def fused_applies(logits_dtype) -> bool:
    """The kernels run on a GPU, on the 16-bit logits of mixed-precision training."""
    return jax.default_backend() == "gpu" and jnp.dtype(logits_dtype) in (jnp.dtype(jnp.bfloat16),
                                                                          jnp.dtype(jnp.float16))


def softmax_xent(logits: jax.Array, targets: jax.Array, scale: jax.Array, vocab_size: int, *, fused: bool,
                 interpret: bool = False, launch: Launch = LAUNCH) -> tuple[jax.Array, jax.Array]:
    """logits [R, Vp], targets [R] int in [0, V), scale [R] float32 -> (nll [R] float32, grad [R, Vp])."""
    if not fused:
        return _reference(logits, targets, scale, vocab_size)
    rows, vp = logits.shape
    block, splits, per_split = geometry(vp, launch)
    fitted = dict(vocab=vocab_size, padded=vp, block=block, per_split=per_split)
    targets = targets.astype(jnp.int32)
    partial = [jax.ShapeDtypeStruct((rows, splits), jnp.float32)] * 3
    run_max, run_sum, target_logit = _call(_statistics_kernel, fitted, partial, (rows, splits), launch,
                                           interpret)(logits, targets)  # [R, splits] each
    # The splits' statistics combined: a few numbers a row, left to XLA.
    row_max = jnp.max(run_max, axis=1)  # [R]; finite: the first split holds real columns
    lse = row_max + jnp.log(jnp.sum(run_sum * jnp.exp(run_max - row_max[:, None]), axis=1))  # [R]
    nll = lse - jnp.sum(target_logit, axis=1)  # [R]
    out = [jax.ShapeDtypeStruct((rows, vp), logits.dtype)]
    (grad,) = _call(_gradient_kernel, fitted, out, (rows, splits), launch, interpret)(
        logits, targets, scale.astype(jnp.float32), lse)  # [R, Vp]
    return nll, grad


def _call(kernel, fitted, out_shape, grid, launch: Launch, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    return pl.pallas_call(functools.partial(kernel, **fitted), out_shape=out_shape, grid=grid,
                          compiler_params=plt.CompilerParams(num_warps=launch.num_warps, num_stages=1),
                          interpret=interpret, name=kernel.__name__.strip("_"))


def _reference(logits, targets, scale, vocab_size):
    x = logits.astype(jnp.float32)  # [R, Vp]
    cols = jnp.arange(x.shape[-1])  # [Vp]
    x = jnp.where(cols < vocab_size, x, -jnp.inf)  # the padding columns leave the softmax
    lse = jax.nn.logsumexp(x, axis=-1)  # [R]
    nll = lse - jnp.take_along_axis(x, targets[:, None], axis=-1)[:, 0]  # [R]
    onehot = cols == targets[:, None]  # [R, Vp]
    grad = (jnp.exp(x - lse[:, None]) - onehot) * scale[:, None]  # [R, Vp]
    return nll, grad.astype(logits.dtype)


# exp(x) as 2^(x log2 e): Triton's exp2 is the GPU's ex2 instruction, its exp a longer libdevice
# routine, and a bench chunk takes 2 x 205M of them (0.429 -> 0.384 ms on an H200). The statistics
# kernel's sum is the same either way, sum 2^(y - max y) = sum e^(x - max x) for y = x log2 e; its
# max is reported in natural units.
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _pieces(logits_ref, *, vocab, padded, block, per_split):
    """(row, piece(j) -> (its first column, columns [block], float32 logits [block])): the split's
    j-th piece. (program_id is read here, outside the loops: Pallas's interpreter wants it so.)"""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    row, first = pl.program_id(0), pl.program_id(1) * per_split

    def piece(j):
        start = (first + j) * block
        cols = start + jnp.arange(block)  # [block]
        # Columns past Vp (the last piece, whole pieces of the last split) are not read; the padding
        # columns V..Vp-1 become -inf and never reach the softmax. The load's mask is against Vp (a
        # multiple of 8), not V: Triton vectorises a masked load only where the mask is constant over
        # each vector, and V = 200019 made every logit a 2-byte load of its own.
        x = plt.load(logits_ref.at[row, pl.ds(start, block)], mask=cols < padded, other=-jnp.inf)
        return start, cols, jnp.where(cols < vocab, x.astype(jnp.float32), -jnp.inf)

    return row, piece


def _statistics_kernel(logits_ref, targets_ref, max_ref, sum_ref, target_logit_ref, *, vocab, padded, block,
                       per_split):
    """One split of one row: its max, its sum of exp(x - max) (the online softmax: the running sum
    is rescaled whenever the max grows) and the target's logit if it falls here (else 0)."""
    from jax.experimental import pallas as pl

    row, piece = _pieces(logits_ref, vocab=vocab, padded=padded, block=block, per_split=per_split)
    split = pl.program_id(1)
    target = targets_ref[row]

    def step(j, carry):
        run_max, run_sum, target_logit = carry  # the max in base-2 units (see _LOG2E)
        _, cols, x = piece(j)
        y = x * _LOG2E  # [block]
        new_max = jnp.maximum(run_max, jnp.max(y))
        # A split wholly past V keeps max -inf: shift by 0 there, so that 2^(-inf - -inf) never runs.
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        run_sum = run_sum * jnp.exp2(run_max - shift) + jnp.sum(jnp.exp2(y - shift))
        target_logit += jnp.sum(jnp.where(cols == target, x, 0.0))
        return new_max, run_sum, target_logit

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.float32(0.0))
    run_max, run_sum, target_logit = jax.lax.fori_loop(0, per_split, step, init)
    max_ref[row, split], sum_ref[row, split], target_logit_ref[row, split] = run_max * _LN2, run_sum, target_logit


def _gradient_kernel(logits_ref, targets_ref, scale_ref, lse_ref, grad_ref, *, vocab, padded, block, per_split):
    """One split of one row: (softmax - onehot) * scale, the padding columns 0."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    row, piece = _pieces(logits_ref, vocab=vocab, padded=padded, block=block, per_split=per_split)
    target, scale, lse2 = targets_ref[row], scale_ref[row], lse_ref[row] * _LOG2E

    def step(j, _):
        start, cols, x = piece(j)
        grad = (jnp.exp2(x * _LOG2E - lse2) - jnp.where(cols == target, 1.0, 0.0)) * scale  # [block]
        plt.store(grad_ref.at[row, pl.ds(start, block)], grad.astype(grad_ref.dtype), mask=cols < padded)

    jax.lax.fori_loop(0, per_split, step, None)

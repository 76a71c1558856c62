"""Greedy decoding's LM head and argmax in one pass: the next token without the [B, V] logits.
Mirrors blues_torch/greedy_head.py.

    greedy_tokens(h [B, d], table [Vp, d], vocab_size) -> ids [B] int32

ids[b] = the first maximum of logits[b, :V], logits = h @ table^T as the model's head computes it:
products in h's dtype summed in float32, the logits float32 (blues_jax/loss.py's head). The same
function as `jnp.argmax(lm_head_logits(h, table, V), -1)` up to the GEMM's order of summation.

Two Pallas (Triton) kernels with PyTorch's tiles (blues/decode_launch.py): the first computes a tile of
128 table rows against the batch and keeps, for each batch row, the tile's maximum and its first
column; the second picks each row's first block holding the row's maximum. The head's 77 MB table
is read once either way; what this saves is writing and re-reading the float32 logits (51 MB at
batch 64) and the argmax's own reduction.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from blues.decode_launch import head_fits, head_tiles

_NO_COLUMN = 2 ** 31 - 1


def fused_applies(dtype, hidden_size: int) -> bool:
    """The kernels run on a GPU, for the 16-bit decode of mixed-precision models."""
    return (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_fits(hidden_size))


def greedy_tokens(h: jax.Array, table: jax.Array, vocab_size: int, *, interpret: bool = False) -> jax.Array:
    """h [B, d], table [Vp, d] -> the first maximum of each row's logits, [B] int32."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    batch, depth = h.shape
    padded = table.shape[0]
    table = table.astype(h.dtype)
    t = head_tiles(batch, padded, depth)
    row_tiles = -(-batch // t.rows)
    # Whole tiles of rows (zeros below the batch): a Pallas slice may not run past its array.
    h = jnp.pad(h, ((0, row_tiles * t.rows - batch), (0, 0)))  # [row_tiles * rows, d]
    params = plt.CompilerParams(num_warps=4, num_stages=1)
    partial = [jax.ShapeDtypeStruct((row_tiles * t.rows, t.vocab_blocks), jnp.float32),
               jax.ShapeDtypeStruct((row_tiles * t.rows, t.vocab_blocks), jnp.int32)]
    tile = functools.partial(_tile_kernel, depth=depth, vocab=vocab_size, rows=t.rows, block_vocab=t.vocab,
                             block_depth=t.depth)
    block_max, block_arg = pl.pallas_call(tile, out_shape=partial, grid=(t.vocab_blocks, row_tiles),
                                          compiler_params=params, interpret=interpret, name="greedy_head_tile")(h, table)
    pick = functools.partial(_pick_kernel, blocks=t.vocab_blocks, width=t.pick_width)
    return pl.pallas_call(pick, out_shape=jax.ShapeDtypeStruct((batch,), jnp.int32), grid=(batch,),
                          compiler_params=params, interpret=interpret, name="greedy_head_pick")(
        block_max[:batch], block_arg[:batch])


def _tile_kernel(h_ref, table_ref, max_ref, arg_ref, *, depth, vocab, rows, block_vocab, block_depth):
    """One tile of `rows` batch rows x `block_vocab` table rows: each batch row's maximum logit in the
    tile and the first column holding it (columns >= V count as -inf)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    block = pl.program_id(0)
    rows_at = pl.ds(pl.program_id(1) * rows, rows)
    col = block * block_vocab + jnp.arange(block_vocab)  # [block_vocab]
    acc = jnp.zeros((rows, block_vocab), jnp.float32)
    for start in range(0, depth, block_depth):
        x = h_ref[rows_at, pl.ds(start, block_depth)]  # [rows, block_depth]
        w = plt.load(table_ref.at[pl.ds(block * block_vocab, block_vocab), pl.ds(start, block_depth)],
                     mask=(col < vocab)[:, None], other=0.0)  # [block_vocab, block_depth]
        acc += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    logits = jnp.where(col[None, :] < vocab, acc, -jnp.inf)  # [rows, block_vocab]
    best = jnp.max(logits, axis=1)  # [rows]
    first = jnp.min(jnp.where(logits == best[:, None], col[None, :], _NO_COLUMN), axis=1)  # [rows]
    max_ref[rows_at, block] = best
    arg_ref[rows_at, block] = first


def _pick_kernel(max_ref, arg_ref, ids_ref, *, blocks, width):
    """One batch row: the first block holding the row's maximum gives its column (blocks are in
    column order, so the smallest such column is the row's first maximum)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    row = pl.program_id(0)
    i = jnp.arange(width)
    best = plt.load(max_ref.at[row, pl.ds(0, width)], mask=i < blocks, other=-jnp.inf)  # [width]
    arg = plt.load(arg_ref.at[row, pl.ds(0, width)], mask=i < blocks, other=_NO_COLUMN)  # [width]
    ids_ref[row] = jnp.min(jnp.where(best == jnp.max(best), arg, _NO_COLUMN))

"""Greedy decoding's LM head and argmax in one pass: the next token without the [B, V] logits.
Mirrors blues_jax/greedy_head.py.

    greedy_tokens(h [B, d], table [Vp, d], vocab_size) -> ids [B] int64

ids[b] = the first maximum of logits[b, :V], logits = h @ table^T as the model's head computes it: a
float32 dot product rounded to the table's dtype (the dtype of the logits the head returns, so ties
in bf16 go to the lower id as `greedy_argmax` breaks them). The same function as
`greedy_argmax(lm_head_logits(h, table, V))` up to the GEMM's order of summation.

Two Triton kernels. The first tiles the GEMM (blues/decode_launch.py: 128 table rows a program,
1,563 programs at the real vocabulary; rows past the batch are masked) and keeps, for each batch
row, the tile's maximum and its first column; the second picks each row's first block holding the
row's maximum. At decode sizes the head reads the 77 MB table once either way; what this saves is
writing and re-reading the logits and the argmax's own launches (at batch 64 the head wrote 25 MB
of bf16 logits that the argmax's first stage then read in 33 us of a 245 us decode step, H200,
docs/performance.md "Decoding").
"""
from __future__ import annotations

import torch

from blues.decode_launch import head_fits, head_tiles

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: generation.py's unfused head
    triton = None


def fused_applies(h: torch.Tensor) -> bool:
    """The kernels run on a CUDA device with Triton, for the 16-bit decode of mixed-precision models."""
    return triton is not None and h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and head_fits(h.shape[-1])


def greedy_tokens(h: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """h [B, d], table [Vp, d] (same dtype), V <= Vp -> the first maximum of each row's logits, [B] int64."""
    return _greedy_tokens(h, table, vocab_size)


if triton is not None:
    # An opaque custom op (as blues_torch/gated_gelu.py's backward): a compiled decode step keeps it as
    # one extern call, inductor never handles the Triton kernels itself, and a CUDA graph captures
    # their launches.
    @torch.library.custom_op("blues::greedy_tokens", mutates_args=())
    def _greedy_tokens(h: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
        batch, depth = h.shape
        padded = table.shape[0]
        assert table.shape[1] == depth and h.dtype == table.dtype and 0 < vocab_size <= padded, (h.shape, table.shape)
        h, table = h.contiguous(), table.contiguous()
        t = head_tiles(batch, padded, depth)
        block_max = torch.empty(batch, t.vocab_blocks, device=h.device, dtype=torch.float32)  # [B, blocks]
        block_arg = torch.empty(batch, t.vocab_blocks, device=h.device, dtype=torch.int32)  # [B, blocks]
        ids = torch.empty(batch, device=h.device, dtype=torch.int64)  # [B]
        _tile_kernel[(t.vocab_blocks, triton.cdiv(batch, t.rows))](
            h, table, block_max, block_arg, batch, vocab_size, t.vocab_blocks, D=depth, ROWS=t.rows, VOCAB=t.vocab,
            DEPTH=t.depth, num_warps=4, num_stages=1)
        _pick_kernel[(batch,)](block_max, block_arg, ids, t.vocab_blocks, WIDTH=t.pick_width, num_warps=4,
                               num_stages=1)
        return ids

    @_greedy_tokens.register_fake
    def _(h: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return h.new_empty(h.shape[0], dtype=torch.int64)

    @triton.jit
    def _tile_kernel(h_ptr, table_ptr, max_ptr, arg_ptr, batch, vocab, blocks, D: tl.constexpr, ROWS: tl.constexpr,
                     VOCAB: tl.constexpr, DEPTH: tl.constexpr):
        """One tile of ROWS batch rows x VOCAB table rows: each batch row's maximum logit in the tile
        and the first column holding it (columns >= V count as -inf)."""
        block = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        cols = block * VOCAB + tl.arange(0, VOCAB)  # [VOCAB]
        acc = tl.zeros((ROWS, VOCAB), tl.float32)
        for start in tl.static_range(0, D, DEPTH):
            k = start + tl.arange(0, DEPTH)  # [DEPTH]
            x = tl.load(h_ptr + rows[:, None] * D + k[None, :], mask=rows[:, None] < batch, other=0.0)  # [ROWS, DEPTH]
            w = tl.load(table_ptr + cols[None, :].to(tl.int64) * D + k[:, None], mask=cols[None, :] < vocab,
                        other=0.0)  # [DEPTH, VOCAB]
            acc = tl.dot(x, w, acc)
        logits = acc.to(table_ptr.dtype.element_ty).to(tl.float32)  # rounded as the head's output is
        logits = tl.where(cols[None, :] < vocab, logits, float("-inf"))  # [ROWS, VOCAB]
        best = tl.max(logits, axis=1)  # [ROWS]
        first = tl.min(tl.where(logits == best[:, None], cols[None, :], 2147483647), axis=1)  # [ROWS]
        out = rows * blocks + block
        tl.store(max_ptr + out, best, mask=rows < batch)
        tl.store(arg_ptr + out, first, mask=rows < batch)

    @triton.jit
    def _pick_kernel(max_ptr, arg_ptr, ids_ptr, blocks, WIDTH: tl.constexpr):
        """One batch row: the first block holding the row's maximum gives its column (blocks are in
        column order, so the smallest such column is the row's first maximum)."""
        row = tl.program_id(0)
        i = tl.arange(0, WIDTH)
        best = tl.load(max_ptr + row * blocks + i, mask=i < blocks, other=float("-inf"))  # [WIDTH]
        arg = tl.load(arg_ptr + row * blocks + i, mask=i < blocks, other=2147483647)  # [WIDTH]
        top = tl.max(best, axis=0)
        tl.store(ids_ptr + row, tl.min(tl.where(best == top, arg, 2147483647), axis=0).to(tl.int64))

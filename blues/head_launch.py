"""How the fused greedy head (blues_torch/greedy_head.py in Triton, blues_jax/greedy_head.py in
Pallas) tiles its work: the same blocks in both frameworks.

The head's GEMM h [B, d] @ table[Vp, d]^T is split into tiles of `rows` x `vocab` logits; a program
computes its tile over d in steps of `depth` and keeps only each row's maximum and its first column.
At decode sizes the tile's weights (vocab x d) are what it reads, so `vocab` sets the parallelism
(Vp / 128 = 1,563 programs at the real vocabulary) and `rows` the tensor-core tile height (tl.dot
wants >= 16).
"""
from __future__ import annotations

from typing import NamedTuple

BLOCK_VOCAB = 128  # columns of the table per program
BLOCK_DEPTH = 64  # hidden features per step of a program's dot product, at most


class Tiles(NamedTuple):
    rows: int  # batch rows per program (a power of two, >= 16)
    vocab: int
    depth: int  # the largest of 64, 32, 16 that divides d (Pallas slices may not run past d)
    vocab_blocks: int  # programs along the vocabulary: ceil(Vp / vocab)
    pick_width: int  # the second stage's width: vocab_blocks rounded up to a power of two


def fits(hidden_size: int) -> bool:
    """The kernels step through d in blocks of at least 16 (tl.dot's smallest)."""
    return hidden_size % 16 == 0


def tiles(batch: int, padded_vocab: int, hidden_size: int) -> Tiles:
    assert fits(hidden_size), hidden_size
    rows = 16 if batch <= 16 else 64 if batch >= 64 else 1 << (batch - 1).bit_length()
    depth = next(b for b in (BLOCK_DEPTH, 32, 16) if hidden_size % b == 0)
    blocks = -(-padded_vocab // BLOCK_VOCAB)
    return Tiles(rows, BLOCK_VOCAB, depth, blocks, 1 << max(blocks - 1, 0).bit_length())

"""How the decode step's kernels tile their work, the same in both frameworks: the fused greedy
head (blues_torch/greedy_head.py in Triton, blues_jax/greedy_head.py in Pallas) and the one-query
attention over the KV cache (blues_*/decode_attention.py).

The head's GEMM h [B, d] @ table[Vp, d]^T is split into tiles of `rows` x `vocab` logits; a program
computes its tile over d in steps of `depth` and keeps only each row's maximum and its first column.
At decode sizes the tile's weights (vocab x d) are what it reads, so `vocab` sets the parallelism
(Vp / 128 = 1,563 programs at the real vocabulary) and `rows` the tensor-core tile height (tl.dot
wants >= 16).

The attention gives each (row, query head) one program, which walks the cache's slots in blocks of
`ATTENTION_BLOCK_SLOTS` with an online softmax; the head dimension is padded to a power of two
(Triton's block shapes), its padding masked.
"""
from __future__ import annotations

from typing import NamedTuple

BLOCK_VOCAB = 128  # columns of the table per program
BLOCK_DEPTH = 64  # hidden features per step of a program's dot product, at most


class HeadTiles(NamedTuple):
    rows: int  # batch rows per program (a power of two, >= 16)
    vocab: int
    depth: int  # the largest of 64, 32, 16 that divides d (Pallas slices may not run past d)
    vocab_blocks: int  # programs along the vocabulary: ceil(Vp / vocab)
    pick_width: int  # the second stage's width: vocab_blocks rounded up to a power of two


def head_fits(hidden_size: int) -> bool:
    """The kernels step through d in blocks of at least 16 (tl.dot's smallest)."""
    return hidden_size % 16 == 0


def head_tiles(batch: int, padded_vocab: int, hidden_size: int) -> HeadTiles:
    assert head_fits(hidden_size), hidden_size
    rows = 16 if batch <= 16 else 64 if batch >= 64 else 1 << (batch - 1).bit_length()
    depth = next(b for b in (BLOCK_DEPTH, 32, 16) if hidden_size % b == 0)
    blocks = -(-padded_vocab // BLOCK_VOCAB)
    return HeadTiles(rows, BLOCK_VOCAB, depth, blocks, 1 << max(blocks - 1, 0).bit_length())


ATTENTION_BLOCK_SLOTS = 128  # cache slots per step of a program: [128, 64] float32 keys at 4 warps


class AttentionTiles(NamedTuple):
    slots: int  # cache slots per step
    blocks: int  # steps over the cache: ceil(S / slots)
    head_dim: int  # Dh rounded up to a power of two


def attention_tiles(cache_slots: int, head_dim: int) -> AttentionTiles:
    slots = min(ATTENTION_BLOCK_SLOTS, 1 << max(cache_slots - 1, 0).bit_length())
    return AttentionTiles(slots, -(-cache_slots // slots), 1 << max(head_dim - 1, 0).bit_length())

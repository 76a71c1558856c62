"""How the chunked loss's softmax kernels split a row of logits among GPU programs, shared by both
frameworks' kernels (blues_jax/xent_kernel.py in Pallas, blues_torch/xent_kernel.py in Triton): the
launch shape and the geometry it gives for a row of Vp logits.
"""
from __future__ import annotations

from typing import NamedTuple


class Launch(NamedTuple):
    """The kernels' program shape: a row's logits in `splits` programs, each of which walks its share
    in pieces of `block_elements` (a power of two) with `num_warps` warps."""
    block_elements: int
    splits: int
    num_warps: int


class Geometry(NamedTuple):
    """A launch fitted to a row of `padded` logits: pieces of `block`, `splits` programs a row, each
    walking `per_split` pieces (the last ones may run past the row, and are masked)."""
    block: int
    splits: int
    per_split: int


def geometry(padded: int, launch: Launch) -> Geometry:
    block = min(launch.block_elements, 1 << max(padded - 1, 0).bit_length())  # no wider than the row
    n_blocks = -(-padded // block)
    splits = min(launch.splits, n_blocks)
    return Geometry(block, splits, -(-n_blocks // splits))

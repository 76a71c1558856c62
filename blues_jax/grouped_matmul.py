"""Grouped matmul, the expert GEMM: rows of `lhs` come in contiguous groups, group g times rhs[g].

    grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N],  sum(group_sizes) == M

On a Hopper GPU in bf16/f16 it runs JAX's Mosaic GPU kernels (`jax.experimental.pallas.ops.gpu`:
`ragged_dot_mgpu` for the product and for the input gradient with the weights read transposed,
`transposed_ragged_dot_mgpu` for the weight gradient, whose contraction runs over the ragged row
axis). Everywhere else it runs `jax.lax.ragged_dot`, the reference: exact, but on a GPU XLA lowers
it at ~50 TFLOP/s against ~800 for a dense GEMM (H200).

The Mosaic kernels leave rows past sum(group_sizes) unwritten, hence the contract above: every
row belongs to a group. Their TMA copies also want the row count a multiple of 8: other counts are
padded with zero rows, counted in the last group, and sliced off.

`product` and `weight_grad` are the two kernels (both impls), for callers that write their own
backward (blues_jax.experts fuses the gated GeLU into the second projection's).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The weight-gradient contraction (over the rows of a group, with the group dimension of the
# output) as ragged_dot_general names it.
_ROW_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


class Tiles(NamedTuple):
    """One Mosaic kernel configuration (output tile block_m x block_n, K step block_k)."""
    block_m: int
    block_n: int
    block_k: int
    max_concurrent_steps: int
    grid_block_n: int


# Picked on an H200 at the bench preset's shapes (scripts/jax_gemm_probe.py; docs/performance.md).
# A dimension that 128 does not divide (the tiny preset's d = 192) takes 64-wide tiles.
PRODUCT_TILES = Tiles(128, 128, 64, 5, 8)
WEIGHT_GRAD_TILES = Tiles(128, 128, 64, 5, 8)
ROW_MULTIPLE = 8


def _fit(tiles: Tiles, block_m_dim: int | None, block_n_dim: int) -> Tiles | None:
    """tiles with block_m / block_n halved (down to 64) until they divide the given dimensions."""
    bm, bn = tiles.block_m, tiles.block_n
    while block_m_dim is not None and block_m_dim % bm and bm > 64:
        bm //= 2
    while block_n_dim % bn and bn > 64:
        bn //= 2
    if (block_m_dim is not None and block_m_dim % bm) or block_n_dim % bn:
        return None
    return tiles._replace(block_m=bm, block_n=bn)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, impl: str = "auto") -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N] in lhs's dtype (rhs is cast to it; its gradient comes back in
    rhs's own dtype); impl "auto" (Mosaic where it applies), "mosaic" or "ragged_dot"."""
    return _grouped_matmul(lhs, rhs, group_sizes, resolve_impl(impl, lhs, rhs))


def resolve_impl(impl: str, lhs: jax.Array, rhs: jax.Array) -> str:
    if impl not in ("auto", "mosaic", "ragged_dot"):
        raise ValueError(f"unknown grouped_matmul impl {impl!r}")
    if impl == "auto":
        return "mosaic" if mosaic_applies(lhs, rhs) else "ragged_dot"
    return impl


def mosaic_applies(lhs: jax.Array, rhs: jax.Array) -> bool:
    """Hopper GPU, a 16-bit lhs (the dtype the kernels run in), and shapes the kernels' tiles divide."""
    if jax.default_backend() != "gpu" or lhs.dtype not in (jnp.bfloat16, jnp.float16):
        return False
    if getattr(jax.devices()[0], "compute_capability", None) != "9.0":
        return False
    _, k, n = rhs.shape
    # product: contraction K, output width N; input gradient: contraction N, output width K;
    # weight gradient: [G, K, N] output tiles.
    return (k % PRODUCT_TILES.block_k == 0 and n % PRODUCT_TILES.block_k == 0
            and None not in (_fit(PRODUCT_TILES, None, n), _fit(PRODUCT_TILES, None, k), _fit(WEIGHT_GRAD_TILES, k, n)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped_matmul(lhs, rhs, group_sizes, impl):
    return product(lhs, rhs.astype(lhs.dtype), group_sizes, impl=impl)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, impl):
    # rhs itself is kept (a float32 master weight costs nothing extra), not its 16-bit copy
    return _grouped_matmul(lhs, rhs, group_sizes, impl), (lhs, rhs, group_sizes)


def _grouped_matmul_bwd(impl, res, g):
    lhs, rhs, group_sizes = res
    g = g.astype(lhs.dtype)
    d_lhs = product(g, rhs.astype(lhs.dtype), group_sizes, transpose_rhs=True, impl=impl)  # [M, N] x [G, K, N]^T -> [M, K]
    d_rhs = weight_grad(lhs, g, group_sizes, impl=impl)  # [G, K, N]
    return d_lhs, d_rhs.astype(rhs.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def product(lhs, rhs, group_sizes, *, impl: str, transpose_rhs: bool = False) -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N], or with transpose_rhs [M, N] x [G, K, N]^T -> [M, K]. Same dtypes."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(lhs, jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs, group_sizes)
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    m = lhs.shape[0]
    lhs, group_sizes = _pad_rows(lhs, group_sizes)
    tiles = _fit(PRODUCT_TILES, None, rhs.shape[1] if transpose_rhs else rhs.shape[2])
    out = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
                                     **tiles._asdict())
    return out[:m]


def weight_grad(lhs, g, group_sizes, *, impl: str) -> jax.Array:
    """[M, K] and [M, N], rows in groups -> [G, K, N]: per group, lhs_g^T @ g_g."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot_general(lhs, g, group_sizes, ragged_dot_dimension_numbers=_ROW_CONTRACTION)
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
    lhs, _ = _pad_rows(lhs, group_sizes)
    g, group_sizes = _pad_rows(g, group_sizes)
    tiles = _fit(WEIGHT_GRAD_TILES, lhs.shape[1], g.shape[1])
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(lhs, g, group_sizes=group_sizes, **tiles._asdict())


def _pad_rows(a: jax.Array, group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero rows up to a multiple of ROW_MULTIPLE, counted in the last group (zeros add nothing)."""
    group_sizes = group_sizes.astype(jnp.int32)
    pad = -a.shape[0] % ROW_MULTIPLE
    if not pad:
        return a, group_sizes
    return jnp.pad(a, ((0, pad), (0, 0))), group_sizes.at[-1].add(pad)  # [M + pad, ...]

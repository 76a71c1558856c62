"""Rotary embeddings and causal GQA attention with interchangeable backends (JAX).

All functions take q/k/v in the `[B, T, heads, Dh]` layout (also `jax.nn.dot_product_attention`'s).
The `reference` backend is the definition (docs/architecture.md); `xla` and `cudnn` compute the
same function through `jax.nn.dot_product_attention`. `attention(..., impl="auto")` picks the
fastest one that can do the job and logs the choice once.
"""
from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp

from blues import rope
from blues.errors import ConfigError

logger = logging.getLogger("blues")

ATTN_IMPLS = ("auto", "cudnn", "xla", "reference")


# ---- RoPE ------------------------------------------------------------------------------------------

def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotary angles, float32, each half repeated: [*positions.shape, Dh]."""
    # inv_freq: float64 on the host (blues.rope), rounded once to float32, a constant of the traced
    # graph; the angles themselves are float32 (design page).
    inv_freq = jnp.asarray(rope.inv_freq(head_dim, theta), dtype=jnp.float32)  # [Dh/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [..., Dh]: dimension i pairs with i + Dh/2
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, T, heads, Dh]; cos/sin [T, Dh] or [B, T, Dh]. Same dtype out as in."""
    cos, sin = cos[..., None, :], sin[..., None, :]  # [..., T, 1, Dh]: broadcast over heads
    xf = x.astype(jnp.float32)  # rotate in float32 so a bf16 input loses nothing beyond its own rounding
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)  # [B, T, heads, Dh]
    return (xf * cos + rotated * sin).astype(x.dtype)


# ---- backends --------------------------------------------------------------------------------------

def causal_mask(t_q: int, t_k: int) -> jax.Array:
    """[Tq, Tk] bool, True where attention is allowed. Queries are the last Tq of the Tk positions
    (bottom-right alignment), so the same mask serves a KV-cache decode step."""
    q_pos = jnp.arange(t_k - t_q, t_k)[:, None]  # [Tq, 1]
    k_pos = jnp.arange(t_k)[None, :]  # [1, Tk]
    return k_pos <= q_pos


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, softcap: float | None,
                        mask: jax.Array | None = None) -> jax.Array:
    """The definition: q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh]; float32 throughout.
    `mask` [B, T, S] (True = attend), when given, replaces the causal mask (KV-cache decoding)."""
    b, t, h, dh = q.shape
    s, kv = k.shape[1], k.shape[2]
    # Query head j reads kv head j // (H/K): split H into (K, H/K) instead of repeating K and V.
    qg = q.astype(jnp.float32).reshape(b, t, kv, h // kv, dh)  # [B, T, K, G, Dh]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / math.sqrt(dh)  # [B, K, G, T, S]
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    allowed = causal_mask(t, s) if mask is None else mask[:, None, None]  # [T, S] or [B, 1, 1, T, S]
    scores = jnp.where(allowed, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))  # [B, T, K, G, Dh]
    return out.reshape(b, t, h, dh).astype(q.dtype)


def _fused_attention(q, k, v, implementation: str, mask=None):
    # GQA is native (K dividing H, no repeat); softmax is float32 inside both implementations.
    t, s = q.shape[1], k.shape[1]
    if mask is not None:  # KV-cache decoding: the cache's own mask [B, T, S], broadcast over heads
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
    if t == s:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    # is_causal is top-left aligned; a decode step against a longer cache needs bottom-right.
    mask = causal_mask(t, s)[None, None]  # [1, 1, Tq, Tk]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _cudnn_usable(platform: str, dtype, head_dim: int) -> bool:
    # cuDNN's fused attention: NVIDIA GPU, half-precision inputs, Dh a multiple of 8 up to 128.
    return (platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and head_dim % 8 == 0 and head_dim <= 128)


@functools.cache
def _resolve(impl: str, platform: str, dtype_name: str, has_softcap: bool, head_dim: int) -> str:
    # Cached per key, so the choice is logged once, not once per layer and trace.
    if impl not in ATTN_IMPLS:
        raise ConfigError(f"attn_impl '{impl}' is unknown; choose one of {', '.join(ATTN_IMPLS)}")
    cudnn_ok = _cudnn_usable(platform, dtype_name, head_dim)
    if impl == "cudnn" and not cudnn_ok:
        raise ConfigError("attn_impl 'cudnn' needs an NVIDIA GPU, bf16/fp16 activations and head_dim a "
                          f"multiple of 8 up to 128 (have {platform}, {dtype_name}, head_dim {head_dim}); "
                          "use attn_impl 'auto'")
    if impl == "reference":
        chosen = "reference"
    elif has_softcap:
        # Neither jax.nn.dot_product_attention implementation takes a logit softcap.
        logger.warning("attention: attn_logit_softcap is set and jax.nn.dot_product_attention cannot apply "
                       "it (%s requested on %s, %s); falling back to the reference implementation",
                       impl, platform, dtype_name)
        return "reference"
    elif impl == "auto":
        chosen = "cudnn" if cudnn_ok else "xla"
    else:
        chosen = impl
    logger.info("attention backend: %s (requested %s, %s, %s)", chosen, impl, platform, dtype_name)
    return chosen


def resolve_attn_impl(impl: str, platform: str, dtype, softcap: float | None, head_dim: int = 64) -> str:
    """The backend `attention` will use for these inputs: 'cudnn', 'xla' or 'reference'."""
    return _resolve(impl, platform, jnp.dtype(dtype).name, softcap is not None, head_dim)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, softcap: float | None, impl: str = "auto",
              mask: jax.Array | None = None) -> jax.Array:
    """Causal GQA attention, scale 1/sqrt(Dh). q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh].
    `mask` [B, T, S] bool (True = attend) replaces the causal mask: a KV cache's padding-aware mask."""
    backend = resolve_attn_impl(impl, jax.default_backend(), q.dtype, softcap, q.shape[-1])
    if mask is not None and backend == "cudnn":  # cuDNN's fused kernel takes no arbitrary mask
        backend = "xla"
    if backend == "reference":
        return reference_attention(q, k, v, softcap=softcap, mask=mask)
    return _fused_attention(q, k, v, backend, mask)

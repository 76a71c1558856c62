"""Decoding's attention: one new query per row over the KV cache, in one kernel. Mirrors
blues_torch/decode_attention.py.

    decode_attention(q [B, H, Dh], k [B, S, K, Dh], v [B, S, K, Dh], index [], start [B], softcap)
        -> [B, H, Dh]

out[b, h] = softmax_s(softcap(q[b, h] . k[b, s, h // G] / sqrt(Dh))) @ v[b, s, h // G] over the slots
s that the cache's mask allows for a one-token step (KVCache.positions): s <= index (the slot just
written) and s >= start[b] (not padding), or s == index. The same function as `attention(q[:, None],
k, v, mask=...)` of blues_jax/attention.py, computed in float32 (scores, softmax and the weighted
sum), the output in q's dtype.

One Pallas (Triton) program per (row, query head), walking the cache in blocks of slots with an
online softmax (blues/decode_launch.py): no [B, 1, S] mask array, no transposes and no cuDNN call.
A decode step at `tiny` spends ~6.5 us a layer in cuDNN's attention for one query over 288 slots
(H200, docs/performance.md "Decoding"); this is the work of a few microseconds.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from blues.decode_launch import attention_tiles


def applies(q: jax.Array) -> bool:
    """A one-token step on a GPU (q [B, t, H, Dh] with t == 1)."""
    return jax.default_backend() == "gpu" and q.shape[1] == 1


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array, start: jax.Array,
                     softcap: float | None, *, interpret: bool = False) -> jax.Array:
    """q [B, H, Dh], k/v [B, S, K, Dh], index int [], start int [B] -> [B, H, Dh] in q's dtype."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    b, h, dh = q.shape
    s, kv = k.shape[1], k.shape[2]
    t = attention_tiles(s, dh)
    # q padded to a power of two (Triton's block shapes); k and v as [B, S, K * Dh], a view, so that a
    # head's columns are one slice that the masked load may run past.
    q = jnp.pad(q, ((0, 0), (0, 0), (0, t.head_dim - dh)))  # [B, H, Dh']
    kernel = functools.partial(_kernel, slots=s, groups=h // kv, head_dim=dh, tiles=t, softcap=softcap,
                               scale=1.0 / math.sqrt(dh))
    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b, h, t.head_dim), q.dtype), grid=(b, h),
                         compiler_params=plt.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
                         name="decode_attention")(
        q, k.reshape(b, s, kv * dh), v.reshape(b, s, kv * dh), index.reshape(1).astype(jnp.int32),
        start.astype(jnp.int32))
    return out[..., :dh]  # [B, H, Dh]


def _kernel(q_ref, k_ref, v_ref, index_ref, start_ref, out_ref, *, slots, groups, head_dim, tiles, softcap, scale):
    """One (row, query head): the online softmax over the cache's slots, block by block."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    row, head = pl.program_id(0), pl.program_id(1)
    cols = pl.ds((head // groups) * head_dim, tiles.head_dim)  # its kv head's columns (+ padding, masked)
    dim = jnp.arange(tiles.head_dim)
    q = q_ref[row, head, :].astype(jnp.float32) * scale  # [Dh']; padding zeros
    index, start = index_ref[0], start_ref[row]

    def block(j, carry):
        run_max, run_sum, acc = carry
        slot = j * tiles.slots + jnp.arange(tiles.slots)  # [slots]
        mask = (slot < slots)[:, None] & (dim < head_dim)[None, :]  # [slots, Dh']
        at = (row, pl.ds(j * tiles.slots, tiles.slots), cols)
        keys = plt.load(k_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)  # [slots, Dh']
        scores = jnp.sum(keys * q[None, :], axis=1)  # [slots]
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        allowed = (slot <= index) & ((slot >= start) | (slot == index))
        scores = jnp.where(allowed, scores, -jnp.inf)
        new_max = jnp.maximum(run_max, jnp.max(scores))
        # A block wholly masked (padding) keeps the max at -inf: shift by 0, so exp(-inf - -inf) never runs.
        shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        p = jnp.exp(scores - shift)  # [slots]
        rescale = jnp.exp(run_max - shift)
        values = plt.load(v_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)  # [slots, Dh']
        return new_max, run_sum * rescale + jnp.sum(p), acc * rescale + jnp.sum(p[:, None] * values, axis=0)

    init = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((tiles.head_dim,), jnp.float32))
    _, run_sum, acc = jax.lax.fori_loop(0, tiles.blocks, block, init)
    out_ref[row, head, :] = (acc / run_sum).astype(out_ref.dtype)  # the slot `index` is always allowed: sum > 0

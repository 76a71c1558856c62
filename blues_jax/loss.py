"""The tied LM head and the language-model loss, plain and chunked (JAX).

The embedding holds Vp = padded_vocab_size rows (rows V..Vp-1 zero). The head multiplies by all Vp
rows (a multiple of 128 keeps the GEMM on tensor-core kernels) and then drops or masks the padding
columns, so they never reach a softmax, a loss or a gradient.

Loss convention: mean token cross-entropy over targets != IGNORE_INDEX, in float32. With no valid
target at all the loss is 0 (not NaN) and every gradient is 0, so a fully masked batch is a no-op.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _padded_logits(h: jax.Array, embed: jax.Array, vocab_size: int) -> jax.Array:
    """float32 logits [..., Vp] of h [..., d] (matmul in h's dtype), padding columns at -inf."""
    logits = jnp.einsum("...d,vd->...v", h, embed.astype(h.dtype), preferred_element_type=jnp.float32)
    real = jnp.arange(embed.shape[0]) < vocab_size  # [Vp]
    return jnp.where(real, logits, -jnp.inf)  # [..., Vp]


def lm_head_logits(h: jax.Array, embed: jax.Array, vocab_size: int) -> jax.Array:
    """h [..., d] @ embed[Vp, d]^T -> float32 logits [..., V] (padding columns sliced off)."""
    return _padded_logits(h, embed, vocab_size)[..., :vocab_size]  # [..., Vp] -> [..., V]


def _nll_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sum of -log softmax(logits)[target] over targets != -100. logits [..., V] float32, targets [...]."""
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)  # ignored rows read column 0, then are zeroed
    lse = jax.nn.logsumexp(logits, axis=-1)  # [...]
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [...]
    return jnp.sum(jnp.where(valid, lse - target_logit, 0.0))


def _num_valid(targets: jax.Array) -> jax.Array:
    # max(.., 1): with no valid target the sum is 0 and so is the loss (not 0/0).
    return jnp.maximum(jnp.sum(targets != IGNORE_INDEX), 1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean float32 cross-entropy over targets != -100 (0 when there are none). logits [..., V], targets [...]."""
    return _nll_sum(logits.astype(jnp.float32), targets) / _num_valid(targets)


def chunked_lm_loss(h: jax.Array, embed: jax.Array, targets: jax.Array, vocab_size: int,
                    chunk_size: int) -> jax.Array:
    """Mean cross-entropy of the tied head, chunk by chunk. h [B, T, d] (or [N, d]), targets [B, T] (or [N]).

    Equal to cross_entropy(lm_head_logits(h, embed, V), targets) to float32 rounding, gradients
    included, with peak memory [chunk_size, Vp] instead of [N, Vp]: a scan over chunks of the
    sequence axis whose body is rematerialised, so the backward pass recomputes one chunk's logits
    at a time. Chunks run along T and keep the batch axis whole, so a batch split over devices
    stays split (each device scans its own rows).
    """
    if h.ndim == 2:
        h, targets = h[None], targets[None]  # [1, N, d], [1, N]
    b, t, d = h.shape
    c = max(1, min(t, chunk_size // b))  # positions per chunk: B*c ~ chunk_size tokens
    n_chunks = -(-t // c)
    pad = n_chunks * c - t
    if pad:  # padded positions carry ignored targets, so they add nothing
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = h.reshape(b, n_chunks, c, d).transpose(1, 0, 2, 3)  # [n_chunks, B, c, d]
    ts = targets.reshape(b, n_chunks, c).transpose(1, 0, 2)  # [n_chunks, B, c]

    @jax.checkpoint  # keep nothing of a chunk but its inputs; recompute its logits in backward
    def body(total, chunk):
        h_c, t_c = chunk
        return total + _nll_sum(_padded_logits(h_c, embed, vocab_size), t_c), None  # [B, c, Vp] transient

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
    return total / _num_valid(targets)

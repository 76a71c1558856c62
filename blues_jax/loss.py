"""The tied LM head and the language-model loss, plain and chunked (JAX).

The embedding holds Vp = padded_vocab_size rows (rows V..Vp-1 zero). The head multiplies by all Vp
rows (a multiple of 128 keeps the GEMM on tensor-core kernels) and then drops or masks the padding
columns, so they never reach a softmax, a loss or a gradient.

Loss convention: mean token cross-entropy over targets != IGNORE_INDEX, in float32. With no valid
target at all the loss is 0 (not NaN) and every gradient is 0, so a fully masked batch is a no-op.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from blues_jax.xent_kernel import softmax_xent

IGNORE_INDEX = -100


def _padded_logits(h: jax.Array, embed: jax.Array, vocab_size: int, dtype=jnp.float32) -> jax.Array:
    """Logits [..., Vp] in `dtype` of h [..., d] (matmul in h's dtype), padding columns at -inf."""
    logits = jnp.einsum("...d,vd->...v", h, embed.astype(h.dtype), preferred_element_type=dtype)
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


def _chunk_loss_and_grads(h_c, t_c, embed, vocab_size: int, inv_n, with_grads: bool, fused: bool):
    """One chunk: (nll sum, grad_h [B, c, d], grad_embed [Vp, d] float32) for d(loss)/d(nll) = inv_n.
    embed is already in h_c's dtype (_padded_logits' cast is a no-op).

    The logits are rounded to the matmul dtype (bf16 in training), as PyTorch's plain path and the
    usual fused losses keep them: at V = 200k their memory traffic, not the GEMMs', is what the
    chunk's elementwise work costs, and 2 bytes a logit instead of 4 halves it. All math after the
    GEMM is float32 (blues_jax/xent_kernel.py; `fused`: its Pallas kernels)."""
    if not with_grads:
        logits = _padded_logits(h_c, embed, vocab_size, h_c.dtype).astype(jnp.float32)  # [B, c, Vp], padding at -inf
        return _nll_sum(logits, t_c), None, None
    b, c, _ = h_c.shape
    logits = jnp.einsum("bcd,vd->bcv", h_c, embed, preferred_element_type=h_c.dtype)  # [B, c, Vp]
    valid = t_c != IGNORE_INDEX  # [B, c]
    safe = jnp.where(valid, t_c, 0)  # ignored rows read column 0, then are zeroed
    scale = jnp.where(valid, inv_n, 0.0)  # [B, c]
    nll, grad_logits = softmax_xent(logits.reshape(b * c, -1), safe.reshape(-1), scale.reshape(-1), vocab_size,
                                    fused=fused)  # [B*c], [B*c, Vp]
    grad_logits = grad_logits.reshape(logits.shape)  # [B, c, Vp]
    grad_h = jnp.einsum("bcv,vd->bcd", grad_logits, embed,
                        preferred_element_type=jnp.float32).astype(h_c.dtype)  # [B, c, d]
    grad_embed = jnp.einsum("bcv,bcd->vd", grad_logits, h_c, preferred_element_type=jnp.float32)  # [Vp, d]
    return jnp.sum(jnp.where(valid.reshape(-1), nll, 0.0)), grad_h, grad_embed


def _scan_chunks(h, embed, targets, vocab_size: int, chunk_size: int, with_grads: bool, fused: bool = False):
    """(loss, grad_h [B, T, d] | None, grad_embed [Vp, d] float32 | None), chunk by chunk along T."""
    b, t, d = h.shape
    c = max(1, min(t, chunk_size // b))  # positions per chunk: B*c ~ chunk_size tokens
    n_chunks = -(-t // c)
    pad = n_chunks * c - t
    if pad:  # padded positions carry ignored targets, so they add nothing
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = h.reshape(b, n_chunks, c, d).transpose(1, 0, 2, 3)  # [n_chunks, B, c, d]
    ts = targets.reshape(b, n_chunks, c).transpose(1, 0, 2)  # [n_chunks, B, c]
    inv_n = 1.0 / _num_valid(targets)
    # Cast the embedding to the matmul dtype once, not in every chunk: XLA left the loop-invariant
    # convert inside the scan (bench profile: 16 x 0.3 ms a step for a float32 [Vp, d] -> bf16 copy).
    w = embed.astype(h.dtype)  # [Vp, d]

    def body(carry, chunk):
        total, grad_embed = carry
        nll, grad_h, grad_embed_c = _chunk_loss_and_grads(*chunk, w, vocab_size, inv_n, with_grads, fused)
        if with_grads:
            grad_embed = grad_embed + grad_embed_c
        return (total + nll, grad_embed), grad_h

    grad_embed0 = jnp.zeros(embed.shape, jnp.float32) if with_grads else None
    (total, grad_embed), grad_hs = jax.lax.scan(body, (jnp.zeros((), jnp.float32), grad_embed0), (hs, ts))
    if not with_grads:
        return total * inv_n, None, None
    grad_h = grad_hs.transpose(1, 0, 2, 3).reshape(b, n_chunks * c, d)[:, :t]  # [B, T, d]
    return total * inv_n, grad_h, grad_embed


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused_lm_loss(h, embed, targets, vocab_size, chunk_size, fused):
    return _scan_chunks(h, embed, targets, vocab_size, chunk_size, with_grads=False)[0]


def _fused_lm_loss_fwd(h, embed, targets, vocab_size, chunk_size, fused):
    loss, grad_h, grad_embed = _scan_chunks(h, embed, targets, vocab_size, chunk_size, with_grads=True, fused=fused)
    return loss, (grad_h, grad_embed.astype(embed.dtype))


def _fused_lm_loss_bwd(vocab_size, chunk_size, fused, residuals, g):
    grad_h, grad_embed = residuals
    # The loss is linear in its stored gradients' scale: d(out)/d(loss) = g.
    return (grad_h * g).astype(grad_h.dtype), (grad_embed * g).astype(grad_embed.dtype), None


_fused_lm_loss.defvjp(_fused_lm_loss_fwd, _fused_lm_loss_bwd)


def chunked_lm_loss(h: jax.Array, embed: jax.Array, targets: jax.Array, vocab_size: int,
                    chunk_size: int, *, fused: bool = False) -> jax.Array:
    """Mean cross-entropy of the tied head, chunk by chunk. h [B, T, d] (or [N, d]), targets [B, T] (or [N]).

    Equal to cross_entropy(lm_head_logits(h, embed, V), targets) to float32 rounding, gradients
    included, with peak memory [chunk_size, Vp] instead of [N, Vp]: a scan over chunks of the
    sequence axis. Fused forward and backward (mirroring blues_torch/loss.py): when differentiated,
    the forward turns each chunk's logits into (softmax - onehot) / n_valid while they are in
    memory and accumulates grad_h and grad_embed, so no logit is computed twice; the backward only
    scales them. Chunks run along T and keep the batch axis whole, so a batch split over devices
    stays split (each device scans its own rows). `fused`: each chunk's softmax and its gradient in
    a Pallas kernel (blues_jax/xent_kernel.py; a GPU, one device).
    """
    if h.ndim == 2:
        return chunked_lm_loss(h[None], embed, targets[None], vocab_size, chunk_size, fused=fused)  # [1, N, d], [1, N]
    return _fused_lm_loss(h, embed, targets, vocab_size, chunk_size, fused)

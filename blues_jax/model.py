"""The Blues model in Flax NNX: a decoder of GQA attention + mixture-of-experts blocks.

Mirrors blues_torch/model.py class for class and attribute for attribute (docs/architecture.md,
"The shared module tree"). Every matrix is an `nnx.Param` in `x @ W` orientation, so each
parameter *is* its canonical tensor (blues/layout.py) and walking `spec.path` (attributes, list
indices) finds every row of the layout table; the one exception is the embedding's zero padding
rows. Parameters name logical axes only (`out_sharding`); blues_jax/sharding.py maps them to a mesh.

Precision: parameters are float32; `dtype` is the compute dtype of the matmuls. Norms, softmaxes,
the router and the losses run in float32, and the residual stream stays float32.

Randomness lives in the model's state, so a checkpoint of `nnx.state(model)` captures it: router
noise comes from the "noise" stream (`BluesModel.noise`), dropout from each block's `dropout`
("dropout" stream). `model.train()` / `model.eval()` switch both (nnx's `deterministic` flags).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from blues.config import BluesConfig
from blues.errors import BluesError, ConfigError
from blues_jax.attention import ATTN_IMPLS, apply_rope, attention, rope_cos_sin
from blues_jax.experts import (capacity_keep, expert_counts, expert_mlp, load_balancing_loss, route,
                               router_z_loss)
from blues_jax.loss import chunked_lm_loss, cross_entropy, lm_head_logits
from blues_jax.sharding import constrain_batch, mesh_is_trivial
from blues_jax.xent_kernel import fused_applies as xent_fused_applies


@struct.dataclass
class BluesOutput:
    logits: jax.Array | None  # [B, T, V] float32; None in training with targets (loss computed in chunks)
    loss: jax.Array | None  # lm + aux_coef * aux + z_coef * z; None without targets
    lm_loss: jax.Array | None  # mean cross-entropy over targets != -100; None without targets
    aux_loss: jax.Array  # Switch load-balancing loss, mean over layers
    z_loss: jax.Array  # router z-loss, mean over layers
    expert_indices: jax.Array  # [L, B, T, k] chosen experts, best first
    router_probs: jax.Array  # [L, B, T, E] router softmax (gradient stopped: a diagnostic)
    expert_counts: jax.Array  # [L, E] assignments each expert received, before capacity
    dropped: jax.Array  # [L] assignments refused by capacity (0 when dropless)
    hidden: jax.Array  # [B, T, d] the final norm's output in the compute dtype, the LM head's input


class RouterStats(NamedTuple):
    """What one MoE layer reports besides its output."""
    indices: jax.Array  # [B, T, k]
    probs: jax.Array  # [B, T, E]
    aux_loss: jax.Array  # scalar
    z_loss: jax.Array  # scalar
    counts: jax.Array  # [E]
    dropped: jax.Array  # scalar int


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter carrying logical axis names; sharding.shard_model applies them (eager sharding
    is off, so building a model needs no mesh)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class RMSNorm(nnx.Module):
    """y = x * rsqrt(mean(x^2) + eps) * scale, in float32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = _param(jnp.ones((dim,), jnp.float32), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps) * self.scale[...]
        return y.astype(x.dtype)


class Attention(nnx.Module):
    """Causal grouped-query attention with RoPE; H query heads share K key/value heads."""

    def __init__(self, config: BluesConfig, *, rngs: nnx.Rngs, attn_impl: str = "auto",
                 dtype: jnp.dtype = jnp.float32):
        d, dh = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        self.softcap = config.attn_logit_softcap
        self.attn_impl = attn_impl
        self.dtype = dtype
        out_std = (self.n_heads * dh) ** -0.5 / math.sqrt(2 * config.num_layers)  # GPT-2 residual scaling
        # column h*Dh + j of q is head h, dim j
        self.q = _param(_normal(rngs, (d, self.n_heads * dh), d ** -0.5), ("embed", "heads"))
        self.k = _param(_normal(rngs, (d, self.n_kv_heads * dh), d ** -0.5), ("embed", "kv_heads"))
        self.v = _param(_normal(rngs, (d, self.n_kv_heads * dh), d ** -0.5), ("embed", "kv_heads"))
        self.o = _param(_normal(rngs, (self.n_heads * dh, d), out_std), ("heads", "embed"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, cache=None, layer: int = 0) -> jax.Array:
        # x [B, T, d]; cos/sin [T, Dh] (or [B, T, Dh] with a cache), the rotary angles of these T positions.
        b, t, _ = x.shape
        h, kv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        x = x.astype(self.dtype)
        if cache is None:
            q, k, v = (x @ w[...].astype(self.dtype) for w in (self.q, self.k, self.v))
        else:  # decoding: one GEMM over the cache's copy of [q | k | v] (generation.py)
            q, k, v = jnp.split(x @ cache.qkv[layer].astype(self.dtype), [h * dh, (h + kv) * dh], axis=-1)
        q = q.reshape(b, t, h, dh)  # [B, T, H, Dh]
        k, v = k.reshape(b, t, kv, dh), v.reshape(b, t, kv, dh)  # [B, T, K, Dh] each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, softcap=self.softcap, impl=self.attn_impl)  # [B, T, H, Dh]
        else:  # decoding: store k, v and attend over every cached slot (generation.py)
            out = cache.attend(layer, q, k, v, softcap=self.softcap, impl=self.attn_impl)  # [B, T, H, Dh]
        return out.reshape(b, t, h * dh) @ self.o[...].astype(self.dtype)  # [B, T, d]


class MoE(nnx.Module):
    """Top-k routed mixture of gated-GeLU experts (dropless, or capacity-limited), expert-parallel
    over `mesh` when sharding.shard_model has set one."""

    def __init__(self, config: BluesConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        d, e, f = config.hidden_size, config.tot_num_experts, config.expert_hidden_size
        self.config = config
        self.dtype = dtype
        self.mesh: Mesh | None = None
        out_std = f ** -0.5 / math.sqrt(2 * config.num_layers)  # GPT-2 residual scaling
        self.router = _param(_normal(rngs, (d, e), d ** -0.5), ("embed", None))
        # w_in columns [0, F) are the value part, [F, 2F) the gate part
        self.w_in = _param(_normal(rngs, (e, d, 2 * f), d ** -0.5), ("expert", "embed", "mlp"))
        self.w_out = _param(_normal(rngs, (e, f, d), out_std), ("expert", "mlp", "embed"))

    def __call__(self, x: jax.Array, noise_key: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        # x [B, T, d]; noise_key: this layer's router-noise key in training (None: no noise).
        cfg = self.config
        b, t, d = x.shape
        e, k = cfg.tot_num_experts, cfg.chosen_num_experts
        xf = x.reshape(b * t, d)  # [N, d], tokens in (b, t) order
        r = route(xf, self.router[...], k=k, noise_std=cfg.router_noise_std,
                  normalize=cfg.normalize_router_weights, noise_key=noise_key, training=noise_key is not None)
        capacity = cfg.expert_capacity(b * t)
        keep = None if capacity is None else capacity_keep(r.indices, e, capacity, mesh=self.mesh)  # [N, k]
        y = expert_mlp(xf.astype(self.dtype), r.indices, r.weights, keep, self.w_in[...], self.w_out[...],
                       capacity=capacity, mesh=self.mesh)  # [N, d]
        stats = RouterStats(
            indices=r.indices.reshape(b, t, k),
            probs=jax.lax.stop_gradient(r.probs).reshape(b, t, e),
            aux_loss=load_balancing_loss(r.probs, r.indices, e),
            z_loss=router_z_loss(r.logits),
            counts=expert_counts(r.indices, e),
            dropped=jnp.sum(~keep, dtype=jnp.int32) if keep is not None else jnp.zeros((), jnp.int32))
        return y.reshape(b, t, d), stats


class Block(nnx.Module):
    """h += PostNorm(Attention(Norm(h))); h += PostNorm(MoE(Norm(h))). Post norms are optional."""

    def __init__(self, config: BluesConfig, *, rngs: nnx.Rngs, attn_impl: str = "auto",
                 dtype: jnp.dtype = jnp.float32):
        d, eps = config.hidden_size, config.rms_norm_eps
        # Residual-branch dropout (training only); its key stream is part of the model state.
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(config, rngs=rngs, attn_impl=attn_impl, dtype=dtype)
        self.attn_post_norm = RMSNorm(d, eps) if config.use_post_norms else None
        self.moe_norm = RMSNorm(d, eps)
        self.moe = MoE(config, rngs=rngs, dtype=dtype)
        self.moe_post_norm = RMSNorm(d, eps) if config.use_post_norms else None

    def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array,
                 noise_key: jax.Array | None = None, cache=None, layer: int = 0) -> tuple[jax.Array, RouterStats]:
        # h [B, T, d] -> [B, T, d]
        a = self.attn(self.attn_norm(h), cos, sin, cache, layer)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        h = h + self.dropout(a)
        m, stats = self.moe(self.moe_norm(h), noise_key)
        if self.moe_post_norm is not None:
            m = self.moe_post_norm(m)
        h = h + self.dropout(m)
        return h, stats


def _run_block(block: Block, h, cos, sin, noise_key):
    return block(h, cos, sin, noise_key)


_run_block_remat = nnx.remat(_run_block)  # recompute a block's activations in the backward pass


@functools.partial(jax.jit, static_argnames=("graph", "remat"))
def _block_call(graph: nnx.GraphDef, params: nnx.State, rest: nnx.State, h, cos, sin, noise_key, *, remat: bool):
    """One block as a pure function of its state: (h [B, T, d], RouterStats, the block's other state
    (dropout's key stream) after the call). Jitted, so that the L calls of an unrolled forward share one
    trace: inside the model's jit each call is a nested jit whose jaxpr (and its derivatives, and its
    lowering) JAX caches by the arguments' shapes, so tracing and lowering cost one block, not L. XLA
    inlines the L calls before optimising, so the compiled program is the unrolled one."""
    block = nnx.merge(graph, params, rest)
    h, stats = (_run_block_remat if remat else _run_block)(block, h, cos, sin, noise_key)
    return h, stats, nnx.split(block, nnx.Param, ...)[2]


@contextlib.contextmanager
def blocks_traced_inline():
    """Inside, each block is traced where it is called, as plain code (`_block_call` without its jit):
    for tools that record values from inside the blocks while the model is traced (the parity
    suite, the benchmark's checks). With the shared trace they would record the inner trace's
    values, and only once."""
    global _block_call
    shared = _block_call
    _block_call = shared.__wrapped__
    try:
        yield
    finally:
        _block_call = shared


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


class BluesModel(nnx.Module):
    """Embedding (tied LM head) -> L blocks -> final RMSNorm -> logits."""

    def __init__(self, config: BluesConfig, *, rngs: nnx.Rngs, attn_impl: str = "auto",
                 loss_chunk_size: int | None = None, remat: bool = False, scan_layers: bool = False,
                 dtype: jnp.dtype = jnp.float32):
        if attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl '{attn_impl}' is unknown; choose one of {', '.join(ATTN_IMPLS)}")
        if loss_chunk_size is None:  # the config's width-aware default
            loss_chunk_size = config.default_loss_chunk_size
        if not (isinstance(loss_chunk_size, int) and loss_chunk_size > 0):
            raise ConfigError(f"loss_chunk_size must be a positive integer, got {loss_chunk_size!r}")
        self.config = config
        self.loss_chunk_size = loss_chunk_size
        self.remat = remat
        self.scan_layers = scan_layers
        self.dtype = dtype
        self.deterministic = False  # training mode, like a fresh torch module; model.eval() flips it
        self.mesh: Mesh | None = None  # set by sharding.shard_model
        # Vp >= V rows: the padding rows keep the LM-head GEMM tensor-core friendly (blues/config.py).
        embed = _normal(rngs, (config.padded_vocab_size, config.hidden_size), config.hidden_size ** -0.5)
        self.embed = _param(embed.at[config.vocab_size:].set(0.0), ("vocab", "embed"))
        self.layers = nnx.List([Block(config, rngs=rngs, attn_impl=attn_impl, dtype=dtype)
                                for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.noise = rngs["noise"].fork()  # router-noise key stream (falls back to the default stream)

    def _router_noise_keys(self) -> jax.Array | None:
        """One key per layer [L], drawn before any layer runs (so remat recomputes identical noise)."""
        if self.deterministic or self.config.router_noise_std <= 0:
            return None
        return jax.random.split(self.noise(), self.config.num_layers)

    def __call__(self, input_ids: jax.Array, targets: jax.Array | None = None, *, cache=None,
                 return_logits: bool | None = None) -> BluesOutput:
        """input_ids [B, T] (int), targets [B, T] (int, -100 = ignore). `cache`
        (blues_jax.generation.KVCache): the T tokens continue the cached ones (its arrays are
        replaced by the updated ones). `return_logits` (default: not in training): with targets,
        False computes the loss chunk by chunk and returns no logits (the evaluation's path), True
        materialises them; without targets, False skips the head (the caller reads `hidden`: greedy
        decoding's fused head)."""
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise BluesError(f"input has {t} positions but config field 'max_position_embeddings' is "
                             f"{cfg.max_position_embeddings}; feed shorter sequences")

        h = jnp.take(self.embed[...], input_ids, axis=0) * math.sqrt(cfg.hidden_size)  # [B, T, d] float32
        h = constrain_batch(h, self.mesh)
        # [T], or per row [B, T] with a cache (left padding shifts each row's positions)
        positions = jnp.arange(t) if cache is None else cache.positions(t)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # [T, Dh] or [B, T, Dh], float32
        noise_keys = self._router_noise_keys()  # [L] keys or None

        if cache is None and self.scan_layers:
            h, stats = self._scan_blocks(h, cos, sin, noise_keys)
        else:
            graph = nnx.split(self.layers[0], nnx.Param, ...)[0]  # every block's: they are built alike
            per_layer: list[RouterStats] = []
            for i, layer in enumerate(self.layers):
                key = None if noise_keys is None else noise_keys[i]
                if cache is None:
                    _, params, rest = nnx.split(layer, nnx.Param, ...)
                    h, s, rest = _block_call(graph, params, rest, h, cos, sin, key, remat=self.remat)
                    if layer.dropout.rate > 0 and not layer.dropout.deterministic:
                        nnx.update(layer, rest)  # dropout's key stream, the one state a block advances
                else:  # decoding
                    h, s = layer(h, cos, sin, key, cache, i)
                per_layer.append(s)
            stats = _stack(per_layer)  # each field [L, ...]
        if cache is not None:
            cache.advance(t)
        h = self.final_norm(h)  # [B, T, d] float32

        aux_loss = jnp.mean(stats.aux_loss)
        z_loss = jnp.mean(stats.z_loss)
        head_in = h.astype(self.dtype)  # the LM-head GEMM runs in the compute dtype, logits float32
        skip_head = targets is None and return_logits is False
        if return_logits is None:
            return_logits = self.deterministic
        if skip_head:
            logits, lm_loss = None, None
        elif targets is not None and not return_logits:
            # Training and evaluation never materialise [B, T, Vp] logits: the loss is computed chunk by chunk.
            logits = None
            # The Pallas loss kernel is a per-device call that XLA's partitioner cannot split: a mesh
            # keeps XLA's form of it, which follows the batch's sharding.
            fused = mesh_is_trivial(self.mesh) and xent_fused_applies(head_in.dtype)
            lm_loss = chunked_lm_loss(head_in, self.embed[...], targets, cfg.vocab_size, self.loss_chunk_size,
                                      fused=fused)
        else:
            logits = lm_head_logits(head_in, self.embed[...], cfg.vocab_size)  # [B, T, V]
            lm_loss = None if targets is None else cross_entropy(logits, targets)
        loss = None
        if lm_loss is not None:
            loss = lm_loss + cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss

        return BluesOutput(
            logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss,
            expert_indices=stats.indices,  # [L, B, T, k]
            router_probs=stats.probs,  # [L, B, T, E]
            expert_counts=stats.counts,  # [L, E]
            dropped=stats.dropped,  # [L]
            hidden=head_in)  # [B, T, d]

    def _scan_blocks(self, h, cos, sin, noise_keys):
        """The blocks as one `lax.scan` over their stacked parameters: XLA compiles one block, not L.
        The parameters stay one array per layer (the layout table's); the stacking is part of the
        step, and its gradient is the unstacking. The blocks' other state (dropout's key stream)
        comes out of the scan and goes back into each block."""
        run = _run_block_remat if self.remat else _run_block
        graph = nnx.split(self.layers[0], nnx.Param, ...)[0]
        params, rest = zip(*(nnx.split(layer, nnx.Param, ...)[1:] for layer in self.layers))

        def body(h, xs):
            p, r, key = xs
            block = nnx.merge(graph, p, r)
            h, s = run(block, h, cos, sin, key)
            return h, (s, nnx.split(block, nnx.Param, ...)[2])

        h, (stats, rest) = jax.lax.scan(body, h, (_stack(params), _stack(rest), noise_keys))
        for i, layer in enumerate(self.layers):
            nnx.update(layer, jax.tree.map(lambda x: x[i], rest))
        return h, stats

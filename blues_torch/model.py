"""The Blues model in PyTorch: a decoder of GQA attention + mixture-of-experts blocks.

Mirrors blues_jax/model.py class for class and attribute for attribute (docs/architecture.md,
"The shared module tree"). Every matrix is a raw parameter in `x @ W` orientation, so each
parameter *is* its canonical tensor (blues/layout.py) and `model.get_parameter(spec.path)` works
for every row of the layout table; the one exception is the embedding's zero padding rows.

Precision: norms, softmaxes, the router and the losses run in float32; under bf16 autocast the
matmuls run in bf16 while the residual stream stays in the parameters' dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from blues.config import BluesConfig
from blues.errors import BluesError, ConfigError
from blues_torch.attention import ATTN_IMPLS, apply_rope, attention, flash_attn_status, rope_cos_sin
from blues_torch.expert_parallel import ParallelLayout
from blues_torch.experts import (capacity_keep, choice_counts, expert_counts, expert_mlp, load_balancing_loss,
                                 route, router_z_loss)
from blues_torch.loss import chunked_lm_loss, cross_entropy, lm_head_logits


@dataclass
class BluesOutput:
    logits: torch.Tensor | None  # [B, T, V]; None in training with targets (loss computed in chunks)
    loss: torch.Tensor | None  # lm + aux_coef * aux + z_coef * z; None without targets
    lm_loss: torch.Tensor | None  # mean cross-entropy over targets != -100; None without targets
    aux_loss: torch.Tensor  # Switch load-balancing loss, mean over layers
    z_loss: torch.Tensor  # router z-loss, mean over layers
    expert_indices: torch.Tensor  # [L, B, T, k] chosen experts, best first
    router_probs: torch.Tensor  # [L, B, T, E] router softmax (detached: a diagnostic)
    expert_counts: torch.Tensor  # [L, E] assignments each expert received, before capacity
    dropped: torch.Tensor  # [L] assignments refused by capacity (0 when dropless)
    hidden: torch.Tensor  # [B, T, d] the final norm's output, the LM head's input
    # Under a parallel layout (blues_torch/expert_parallel.py) expert_counts and dropped are the
    # whole global batch's, the other fields this rank's.


class RouterStats(NamedTuple):
    """What one MoE layer reports besides its output."""
    indices: torch.Tensor  # [B, T, k]
    probs: torch.Tensor  # [B, T, E]
    aux_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    counts: torch.Tensor  # [E]
    dropped: torch.Tensor  # scalar int


class _RMSNormFunction(torch.autograd.Function):
    """The norm's float32 math with a hand-written backward that keeps x and rsqrt(mean(x^2) + eps)
    ([N, 1]) only; autograd would also keep x * rsqrt, one more [N, d] float32 tensor per norm
    (4 norms a layer: 3 GiB at the bench size)."""

    @staticmethod
    def forward(ctx, x, scale, eps):
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, r, scale)
        y = xf * r * scale.float()  # [..., d] float32
        # Never `y.to(x.dtype)` when that is a no-op: an output aliasing an intermediate made torch
        # 2.11's torch.compile route this Function's gradient to a phantom second output (pytorch
        # #180642), so with float32 weights the compiled step gave every layer a zero gradient.
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, r, scale = ctx.saved_tensors
        x_hat = x.float() * r  # [..., d]
        g = grad.float()
        grad_scale = (g * x_hat).reshape(-1, x.shape[-1]).sum(dim=0).to(scale.dtype)  # [d]
        g_hat = g * scale.float()  # d(loss)/d(x_hat)
        grad_x = r * (g_hat - x_hat * (g_hat * x_hat).mean(dim=-1, keepdim=True))  # [..., d]
        return grad_x.to(x.dtype), grad_scale, None


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * scale, in float32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.scale, self.eps)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE; H query heads share K key/value heads."""

    def __init__(self, config: BluesConfig, *, attn_impl: str = "auto"):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        self.softcap = config.attn_logit_softcap
        self.attn_impl = attn_impl
        flash_attn_status()  # probed here, never first inside a compiled forward (a graph break there)
        self.q = nn.Parameter(torch.empty(d, self.n_heads * dh))  # column h*Dh + j: head h, dim j
        self.k = nn.Parameter(torch.empty(d, self.n_kv_heads * dh))
        self.v = nn.Parameter(torch.empty(d, self.n_kv_heads * dh))
        self.o = nn.Parameter(torch.empty(self.n_heads * dh, d))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        # x [B, T, d]; cos/sin [T, Dh] (or [B, T, Dh] with a cache), the rotary angles of these T positions.
        b, t, _ = x.shape
        h, kv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        if cache is None:
            q, k, v = x @ self.q, x @ self.k, x @ self.v
        else:  # decoding: one GEMM over the cache's copy of [q | k | v] (generation.py)
            q, k, v = (x @ cache.qkv[layer]).split([h * dh, kv * dh, kv * dh], dim=-1)
        q = q.view(b, t, h, dh)  # [B, T, H, Dh]
        k, v = k.view(b, t, kv, dh), v.view(b, t, kv, dh)  # [B, T, K, Dh] each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:
            out = attention(q, k, v, softcap=self.softcap, impl=self.attn_impl)  # [B, T, H, Dh]
        else:  # decoding: store k, v and attend over every cached slot (generation.py)
            out = cache.attend(layer, q, k, v, softcap=self.softcap, impl=self.attn_impl)  # [B, T, H, Dh]
        return out.reshape(b, t, h * dh) @ self.o  # [B, T, d]


class MoE(nn.Module):
    """Top-k routed mixture of gated-GeLU experts (dropless, or capacity-limited).

    `layout` (set by blues_torch.expert_parallel.parallelize; None: this process holds the whole
    batch and every expert): the batch is split over ranks, so the capacity rule and the
    load-balancing loss read every rank's counts, and with P > 1 this layer holds E/P experts.
    """

    def __init__(self, config: BluesConfig):
        super().__init__()
        d, e, f = config.hidden_size, config.tot_num_experts, config.expert_hidden_size
        self.config = config
        self.layout: ParallelLayout | None = None
        self.router = nn.Parameter(torch.empty(d, e))
        self.w_in = nn.Parameter(torch.empty(e, d, 2 * f))  # columns [0, F) value, [F, 2F) gate
        self.w_out = nn.Parameter(torch.empty(e, f, d))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats]:
        # x [B, T, d]; noise [N, E] standard normal for the router in training (None: draw here).
        cfg = self.config
        b, t, d = x.shape
        e, k = cfg.tot_num_experts, cfg.chosen_num_experts
        xf = x.reshape(b * t, d)  # [N, d], tokens in (b, t) order
        r = route(xf, self.router, k=k, noise_std=cfg.router_noise_std, normalize=cfg.normalize_router_weights,
                  generator=None, training=self.training, noise=noise)
        layout = self.layout
        shard_counts, shard, num_tokens = None, 0, b * t
        if layout is not None:  # the batch is every rank's tokens, in rank order
            shard_counts = layout.gather_choice_counts(choice_counts(r.indices, e))  # [ranks, k, E]
            shard, num_tokens = layout.rank, b * t * layout.world_size
            counts = shard_counts.sum(dim=(0, 1))  # [E]
        else:
            counts = expert_counts(r.indices, e)  # [E]
        capacity = cfg.expert_capacity(num_tokens)
        # With experts on other ranks the exchange's split sizes start for the host first: the CPU
        # queues the rest of the layer's kernels before it waits for them (ExpertExchange).
        exchange = None if layout is None else layout.exchange(shard_counts, capacity)
        keep = None if capacity is None else capacity_keep(r.indices, e, capacity, shard_counts, shard)  # [N, k]
        stats = RouterStats(
            indices=r.indices.view(b, t, k),
            probs=r.probs.detach().view(b, t, e),
            aux_loss=load_balancing_loss(r.probs, counts, num_tokens * k),
            z_loss=router_z_loss(r.logits),
            counts=counts,
            dropped=(torch.zeros((), dtype=torch.int64, device=x.device) if capacity is None
                     else (counts - capacity).clamp(min=0).sum()))  # an expert refuses all beyond C
        y = expert_mlp(xf, r.indices, r.weights, keep, self.w_in, self.w_out, exchange)  # [N, d]
        return y.view(b, t, d), stats


class Block(nn.Module):
    """h += PostNorm(Attention(Norm(h))); h += PostNorm(MoE(Norm(h))). Post norms are optional."""

    def __init__(self, config: BluesConfig, *, attn_impl: str = "auto"):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.dropout = config.dropout
        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(config, attn_impl=attn_impl)
        self.attn_post_norm = RMSNorm(d, eps) if config.use_post_norms else None
        self.moe_norm = RMSNorm(d, eps)
        self.moe = MoE(config)
        self.moe_post_norm = RMSNorm(d, eps) if config.use_post_norms else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                noise: torch.Tensor | None = None, cache=None, layer: int = 0) -> tuple[torch.Tensor, RouterStats]:
        # h [B, T, d] -> [B, T, d]
        a = self.attn(self.attn_norm(h), cos, sin, cache, layer)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        h = h + F.dropout(a, self.dropout, self.training)  # residual-branch dropout (training only)
        m, stats = self.moe(self.moe_norm(h), noise)
        if self.moe_post_norm is not None:
            m = self.moe_post_norm(m)
        h = h + F.dropout(m, self.dropout, self.training)
        return h, stats


def _run_block(block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               noise: torch.Tensor | None) -> tuple[torch.Tensor, RouterStats]:
    """One block of the training forward: what BluesModel.compile_blocks hands to torch.compile."""
    return block(h, cos, sin, noise)


class BluesModel(nn.Module):
    """Embedding (tied LM head) -> L blocks -> final RMSNorm -> logits."""

    def __init__(self, config: BluesConfig, *, attn_impl: str = "auto", loss_chunk_size: int | None = None,
                 gradient_checkpointing: bool = False):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl '{attn_impl}' is unknown; choose one of {', '.join(ATTN_IMPLS)}")
        if loss_chunk_size is None:  # the config's width-aware default
            loss_chunk_size = config.default_loss_chunk_size
        if not (isinstance(loss_chunk_size, int) and loss_chunk_size > 0):
            raise ConfigError(f"loss_chunk_size must be a positive integer, got {loss_chunk_size!r}")
        self.config = config
        self.loss_chunk_size = loss_chunk_size
        self.gradient_checkpointing = gradient_checkpointing
        # Vp >= V rows: the padding rows keep the LM-head GEMM tensor-core friendly (blues/config.py).
        self.embed = nn.Parameter(torch.empty(config.padded_vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(Block(config, attn_impl=attn_impl) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.compiled_block = None  # compile_blocks(): runs each block of the training forward
        self.init_weights()

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile the blocks of the training forward (train mode, no KV cache), one block at a
        time as torchtitan does: the blocks are identical modules, so they pass the same guards and
        share one compiled graph (forward and backward), and compile time does not grow with depth.
        The compiled function takes the block as an argument rather than replacing its `__call__`,
        so evaluation and decoding (eval mode, other shapes) stay eager and never recompile it. The
        embedding, the final norm and the chunked loss (its own Triton kernel) run outside it, and
        with gradient checkpointing the blocks run eagerly."""
        self.compiled_block = torch.compile(_run_block, **compile_kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embedding N(0, 1/d) with zero padding rows; matrices N(0, 1/fan_in), the residual
        output projections (attn.o, moe.w_out) further scaled by 1/sqrt(2L) (GPT-2); norms 1."""
        cfg = self.config
        out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        nn.init.normal_(self.embed, std=cfg.hidden_size ** -0.5)
        self.embed[cfg.vocab_size:] = 0.0
        for layer in self.layers:
            for w in (layer.attn.q, layer.attn.k, layer.attn.v, layer.moe.router, layer.moe.w_in):
                nn.init.normal_(w, std=w.shape[-2] ** -0.5)  # fan_in is the second-to-last axis
            for w in (layer.attn.o, layer.moe.w_out):
                nn.init.normal_(w, std=w.shape[-2] ** -0.5 * out_scale)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.scale)

    def _router_noise(self, num_tokens: int, generator: torch.Generator | None) -> torch.Tensor | None:
        """All layers' router noise [L, N, E] in one draw, before any layer runs: gradient
        checkpointing then recomputes with the very same noise (its RNG-state preservation covers
        the global generators, not a caller's `generator`), and the noise stream depends only on
        the generator's seed and the step, not on whether checkpointing is on."""
        cfg = self.config
        if not (self.training and cfg.router_noise_std > 0):
            return None
        shape = (cfg.num_layers, num_tokens, cfg.tot_num_experts)
        return torch.randn(shape, generator=generator, device=self.embed.device, dtype=torch.float32)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None, cache=None,
                return_logits: bool | None = None) -> BluesOutput:
        """input_ids [B, T] (int), targets [B, T] (int, -100 = ignore). `generator` (on the model's
        device) feeds the router noise in training; None uses the global RNG. `cache`
        (blues_torch.generation.KVCache): the T tokens continue the cached ones. `return_logits`
        (default: not in training): with targets, False computes the loss chunk by chunk and
        returns no logits (the evaluation's path), True materialises them; without targets, False
        skips the head (the caller reads `hidden`: greedy decoding's fused head)."""
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise BluesError(f"input has {t} positions but config field 'max_position_embeddings' is "
                             f"{cfg.max_position_embeddings}; feed shorter sequences")

        h = F.embedding(input_ids, self.embed) * math.sqrt(cfg.hidden_size)  # [B, T, d]
        # [T], or per row [B, T] with a cache (left padding shifts each row's positions)
        positions = torch.arange(t, device=input_ids.device) if cache is None else cache.positions(t)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # [T, Dh] or [B, T, Dh], float32
        noise = self._router_noise(b * t, generator)  # [L, N, E] or None

        stats: list[RouterStats] = []
        for i, layer in enumerate(self.layers):
            layer_noise = None if noise is None else noise[i]  # [N, E]
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                h, s = checkpoint(layer, h, cos, sin, layer_noise, use_reentrant=False)
            elif self.compiled_block is not None and self.training and cache is None:
                h, s = self.compiled_block(layer, h, cos, sin, layer_noise)
            else:
                h, s = layer(h, cos, sin, layer_noise, cache, i)
            stats.append(s)
        if cache is not None:
            cache.advance(t)
        h = self.final_norm(h)  # [B, T, d]

        aux_loss = torch.stack([s.aux_loss for s in stats]).mean()
        z_loss = torch.stack([s.z_loss for s in stats]).mean()
        skip_head = targets is None and return_logits is False
        if return_logits is None:
            return_logits = not self.training
        if skip_head:
            logits, lm_loss = None, None
        elif targets is not None and not return_logits:
            # Training and evaluation never materialise [B, T, Vp] logits: the loss is computed chunk by chunk.
            logits = None
            lm_loss = chunked_lm_loss(h, self.embed, targets, cfg.vocab_size, self.loss_chunk_size)
        else:
            logits = lm_head_logits(h, self.embed, cfg.vocab_size)  # [B, T, V]
            lm_loss = None if targets is None else cross_entropy(logits, targets)
        loss = None
        if lm_loss is not None:
            loss = lm_loss + cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss

        return BluesOutput(
            logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss,
            expert_indices=torch.stack([s.indices for s in stats]),  # [L, B, T, k]
            router_probs=torch.stack([s.probs for s in stats]),  # [L, B, T, E]
            expert_counts=torch.stack([s.counts for s in stats]),  # [L, E]
            dropped=torch.stack([s.dropped for s in stats]),  # [L]
            hidden=h)  # [B, T, d]

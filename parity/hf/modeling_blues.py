"""Blues for Hugging Face transformers: the architecture of Blues' docs/architecture.md in PyTorch.

Copied into every `python -m parity.convert_checkpoint SRC OUT --to hf` export and loaded with
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`. Self-contained: it depends on
torch and transformers only. It computes the same function as Blues' own PyTorch model
(`blues_torch`, float32 logits within 1e-5; tests/test_hf_export.py):

- embeddings scaled by sqrt(d); a tied LM head over exactly `vocab_size` rows;
- pre-norm blocks, RMSNorm in float32, optional post norms after attention and after the experts;
- grouped-query attention with rotate-half RoPE (inverse frequencies computed in float64 and rounded to
  float32 once, as Blues does), optional logit softcap, PyTorch SDPA when there is no softcap;
- top-k softmax routing in float32 (ties to the lower index), optional renormalisation of the k
  weights, router noise in training only, the capacity rule (first choices in token order, then
  second choices, ...), gated-GeLU experts (erf GeLU);
- `labels` -> the mean shifted cross-entropy (transformers' causal-LM loss); with
  `output_router_logits`, also Blues' load-balancing and z losses, added to the loss with their
  coefficients as Blues' training loss does, and each layer's router logits as Mixtral returns them.

Decoding uses transformers' cache API (a DynamicCache), so `generate` reuses keys and values.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_blues import BluesConfig


@dataclass
class BluesCausalLMOutput(MoeCausalLMOutputWithPast):
    """Mixtral's output plus Blues' router z-loss (with `output_router_logits`)."""
    z_loss: torch.FloatTensor | None = None


class BluesRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + self.eps)  # [..., 1]
        return (xf * r * self.weight.float()).to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, T] -> cos, sin [B, T, Dh] float32; dimension i pairs with i + Dh/2."""
    inv_freq = torch.tensor([theta ** -(j * 2.0 / head_dim) for j in range(head_dim // 2)],  # float64 powers
                            dtype=torch.float32, device=position_ids.device)  # [Dh/2]
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, T, Dh]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32. x [B, T, heads, Dh], cos/sin [B, T, Dh]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [B, T, 1, Dh]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class BluesAttention(nn.Module):
    def __init__(self, config: BluesConfig, layer_idx: int):
        super().__init__()
        d, dh = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        self.softcap = config.attn_logit_softcap
        self.q_proj = nn.Linear(d, self.n_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * dh, d, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        # x [B, T, d]; mask [B, 1, T, S] bool (True = attend) or None (plain causal, S = T)
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)  # [B, T, H, Dh]
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)  # [B, T, K, Dh]
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))  # [B, heads, T, Dh]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, K, S, Dh]
        if self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            out = softcapped_attention(q, k, v, mask, self.softcap)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))  # [B, T, d]


def softcapped_attention(q, k, v, mask, softcap: float):
    """q [B, H, T, Dh], k/v [B, K, S, Dh] -> [B, H, T, Dh]; scores c*tanh(s/c), float32 softmax."""
    b, h, t, dh = q.shape
    kv, s = k.shape[1], k.shape[2]
    qg = q.float().view(b, kv, h // kv, t, dh)  # query head j reads kv head j // (H/K)
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, k.float()) / math.sqrt(dh)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    scores = scores.masked_fill(~mask.view(-1, 1, 1, t, s), float("-inf"))
    out = torch.einsum("bkgts,bksd->bkgtd", scores.softmax(dim=-1), v.float())
    return out.reshape(b, h, t, dh).to(q.dtype)


class BluesExpert(nn.Module):
    """down_proj(gelu(gate_proj(x)) * up_proj(x)), exact (erf) GeLU."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))


def top_k_lower_index_first(probs: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of the k largest probs, best first, equal values to the lower index."""
    chosen = []
    for _ in range(k):
        best = probs.argmax(dim=-1)  # the first maximum
        chosen.append(best)
        probs = probs.scatter(1, best[:, None], float("-inf"))
    return torch.stack(chosen, dim=-1)


def capacity_keep(indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[N, k] bool: admitted assignments; priority all first choices in token order, then second, ..."""
    n, k = indices.shape
    flat = indices.t().reshape(-1)  # [k*N] (choice, token) order
    one_hot = (flat[:, None] == torch.arange(num_experts, device=flat.device)).long()
    slot = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # place in its expert's queue
    return (slot < capacity).view(k, n).t()


class BluesSparseMoeBlock(nn.Module):
    def __init__(self, config: BluesConfig):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.hidden_size, config.tot_num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(BluesExpert(config.hidden_size, config.intermediate_size)
                                     for _ in range(config.tot_num_experts))

    def forward(self, x: torch.Tensor):
        # x [B, T, d] -> y [B, T, d], router logits [N, E] (before noise), aux loss, z loss
        cfg = self.config
        b, t, d = x.shape
        e, k = cfg.tot_num_experts, cfg.chosen_num_experts
        xf = x.reshape(b * t, d)  # [N, d]
        logits = F.linear(xf.float(), self.gate.weight.float())  # [N, E] float32
        noisy = logits
        if self.training and cfg.router_noise_std > 0:
            noisy = logits + cfg.router_noise_std * torch.randn_like(logits)
        probs = noisy.softmax(dim=-1)
        indices = top_k_lower_index_first(probs, k)  # [N, k]
        weights = probs.gather(1, indices)  # [N, k]
        if cfg.normalize_router_weights:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        admitted = torch.ones_like(indices, dtype=torch.bool)
        if cfg.capacity_factor is not None:
            capacity = math.ceil(cfg.capacity_factor * b * t * k / e)
            admitted = capacity_keep(indices, e, capacity)
        y = torch.zeros(b * t, d, device=x.device, dtype=torch.float32)
        for j, expert in enumerate(self.experts):  # only the tokens routed (and admitted) to expert j
            token, choice = torch.where((indices == j) & admitted)
            if token.numel():
                y.index_add_(0, token, expert(xf[token]).float() * weights[token, choice, None])
        counts = (indices.reshape(-1, 1) == torch.arange(e, device=x.device)).sum(dim=0)  # [E], before capacity
        aux = e * (counts.float() / indices.numel() * probs.mean(dim=0)).sum()  # Switch load balancing
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return y.to(x.dtype).view(b, t, d), logits, aux, z


class BluesDecoderLayer(nn.Module):
    def __init__(self, config: BluesConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.dropout = config.dropout
        self.input_layernorm = BluesRMSNorm(d, eps)
        self.self_attn = BluesAttention(config, layer_idx)
        self.post_attention_layernorm = BluesRMSNorm(d, eps) if config.use_post_norms else None
        self.pre_feedforward_layernorm = BluesRMSNorm(d, eps)
        self.mlp = BluesSparseMoeBlock(config)
        self.post_feedforward_layernorm = BluesRMSNorm(d, eps) if config.use_post_norms else None

    def forward(self, h, cos, sin, mask, cache):
        a = self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        if self.post_attention_layernorm is not None:
            a = self.post_attention_layernorm(a)
        h = h + F.dropout(a, self.dropout, self.training)
        m, router_logits, aux, z = self.mlp(self.pre_feedforward_layernorm(h))
        if self.post_feedforward_layernorm is not None:
            m = self.post_feedforward_layernorm(m)
        return h + F.dropout(m, self.dropout, self.training), router_logits, aux, z


class BluesPreTrainedModel(PreTrainedModel):
    config_class = BluesConfig
    base_model_prefix = "model"
    _no_split_modules = ["BluesDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Blues' initialisation: embedding N(0, 1/d), matrices N(0, 1/fan_in), the residual output
        projections further scaled by 1/sqrt(2L), norms 1."""
        cfg = self.config
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, cfg.hidden_size ** -0.5)
        elif isinstance(module, nn.Linear):
            std = module.in_features ** -0.5
            if getattr(module, "_blues_residual_out", False):
                std /= math.sqrt(2 * cfg.num_layers)
            module.weight.normal_(0.0, std)
        elif isinstance(module, BluesRMSNorm):
            module.weight.fill_(1.0)


class BluesModel(BluesPreTrainedModel):
    def __init__(self, config: BluesConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(BluesDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = BluesRMSNorm(config.hidden_size, config.rms_norm_eps)
        for layer in self.layers:
            layer.self_attn.o_proj._blues_residual_out = True
            for expert in layer.mlp.experts:
                expert.down_proj._blues_residual_out = True
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, **kwargs):
        """-> (last hidden state [B, T, d], cache, per-layer router logits, aux losses, z losses, hidden states)"""
        cfg = self.config
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        h = inputs_embeds * math.sqrt(cfg.hidden_size)  # [B, T, d]
        b, t = h.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        past = cache.get_seq_length() if cache is not None else 0
        s = past + t
        if s > cfg.max_position_embeddings:
            raise ValueError(f"{s} positions exceed max_position_embeddings ({cfg.max_position_embeddings})")
        mask = None  # plain causal attention over these T tokens
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be [batch, past + new tokens] (1 = token, 0 = padding)")
        if position_ids is None:
            if attention_mask is not None:  # left padding: each row's positions start at its first token
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
            else:
                position_ids = torch.arange(past, s, device=h.device)[None].expand(b, t)
        if past or (attention_mask is not None and not bool(attention_mask.all())):
            keys = torch.arange(s, device=h.device)
            queries = keys[past:, None]  # [T, 1] slots of the new tokens
            mask = (keys[None] <= queries)[None]  # [1, T, S] causal
            if attention_mask is not None:  # a padding query attends to itself only: no empty softmax row
                mask = mask & (attention_mask[:, None, :].bool() | (keys[None] == queries)[None])
            mask = mask[:, None].expand(b, 1, t, s)  # [B, 1, T, S]
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # [B, T, Dh]
        all_hidden, router_logits, aux, z = [], [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(h)
            h, logits, a, zz = layer(h, cos, sin, mask, cache)
            router_logits.append(logits)
            aux.append(a)
            z.append(zz)
        h = self.norm(h)
        if output_hidden_states:
            all_hidden.append(h)
        return h, cache, tuple(router_logits), aux, z, tuple(all_hidden) if output_hidden_states else None


class BluesForCausalLM(BluesPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BluesConfig):
        super().__init__(config)
        self.model = BluesModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, output_hidden_states=None,
                logits_to_keep=0, **kwargs):
        cfg = self.config
        output_router_logits = cfg.output_router_logits if output_router_logits is None else output_router_logits
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        h, cache, router_logits, aux, z, hidden = self.model(input_ids, attention_mask, position_ids, cache,
                                                             inputs_embeds, use_cache, output_hidden_states)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h).float()  # [B, T, V]
        loss = aux_loss = z_loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, cfg.vocab_size, **kwargs)
        if output_router_logits:
            aux_loss, z_loss = torch.stack(aux).mean(), torch.stack(z).mean()
            if loss is not None:
                loss = loss + cfg.router_aux_loss_coef * aux_loss + cfg.router_z_loss_coef * z_loss
        return BluesCausalLMOutput(loss=loss, aux_loss=aux_loss, z_loss=z_loss, logits=logits, cache=cache,
                                   hidden_states=hidden, router_logits=router_logits if output_router_logits else None)


__all__ = ["BluesForCausalLM", "BluesModel", "BluesPreTrainedModel"]

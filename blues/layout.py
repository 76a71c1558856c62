"""The canonical checkpoint layout: the one table every implementation and converter reads.

Each row names a tensor (the fixed, framework-neutral name tools outside the project read), its
canonical shape in `x @ W` orientation, and the attribute path of the parameter that holds it in
both `blues_torch.BluesModel` and `blues_jax.BluesModel` (the two mirror each other attribute for
attribute, so one path serves both). Nothing else in the project knows this mapping.

The one place a module tensor differs from its canonical tensor is the embedding: models hold
`padded_vocab_size` rows (the extra rows are zero and masked out of every softmax); canonical
tensors hold exactly `vocab_size`. `pad_rows` marks such a row.
"""
from __future__ import annotations

from dataclasses import dataclass

from blues.config import BluesConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str  # canonical name, e.g. "layers.0.attn.q"
    path: str  # parameter path inside the model, e.g. "layers.0.attn.q"
    shape: tuple[int, ...]  # canonical shape
    pad_rows: int = 0  # extra zero rows the model holds along axis 0 (the embedding only)

    @property
    def module_shape(self) -> tuple[int, ...]:
        return (self.shape[0] + self.pad_rows, *self.shape[1:])


def canonical_layout(config: BluesConfig) -> list[TensorSpec]:
    """Every tensor of a model with this config, in canonical order."""
    d, h, kv, dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    e, f = config.tot_num_experts, config.expert_hidden_size
    specs = [TensorSpec("embed", "embed", (config.vocab_size, d),
                        pad_rows=config.padded_vocab_size - config.vocab_size)]
    for i in range(config.num_layers):
        p = f"layers.{i}."
        specs += [TensorSpec(p + "attn_norm", p + "attn_norm.scale", (d,)),
                  TensorSpec(p + "attn.q", p + "attn.q", (d, h * dh)),
                  TensorSpec(p + "attn.k", p + "attn.k", (d, kv * dh)),
                  TensorSpec(p + "attn.v", p + "attn.v", (d, kv * dh)),
                  TensorSpec(p + "attn.o", p + "attn.o", (h * dh, d))]
        if config.use_post_norms:
            specs.append(TensorSpec(p + "attn_post_norm", p + "attn_post_norm.scale", (d,)))
        specs += [TensorSpec(p + "moe_norm", p + "moe_norm.scale", (d,)),
                  TensorSpec(p + "moe.router", p + "moe.router", (d, e)),
                  TensorSpec(p + "moe.w_in", p + "moe.w_in", (e, d, 2 * f)),
                  TensorSpec(p + "moe.w_out", p + "moe.w_out", (e, f, d))]
        if config.use_post_norms:
            specs.append(TensorSpec(p + "moe_post_norm", p + "moe_post_norm.scale", (d,)))
    specs.append(TensorSpec("final_norm", "final_norm.scale", (d,)))
    return specs

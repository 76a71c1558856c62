"""The model configuration: one typed dataclass, the fields of docs/architecture.md."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from blues.errors import ConfigError

# The LM head is padded internally to a multiple of this many rows: 200,019 (odd) sends cuBLAS to
# slow sm75 kernels, 200,064 = 128 * 1563 keeps tensor cores busy. Padding never leaves a model:
# the canonical layout and every logit tensor a caller sees have exactly `vocab_size` columns.
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class BluesConfig:
    vocab_size: int = 200019
    max_position_embeddings: int = 256
    num_layers: int = 4
    hidden_size: int = 192
    head_dim: int = 48
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tot_num_experts: int = 4
    chosen_num_experts: int = 1
    embedding_multiplier_scale: int = 4
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_post_norms: bool = True
    attn_logit_softcap: float | None = None
    router_noise_std: float = 0.05
    normalize_router_weights: bool = False
    capacity_factor: float | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    dropout: float = 0.0

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def expert_hidden_size(self) -> int:
        """F, the width of one expert's hidden layer."""
        return self.hidden_size * self.embedding_multiplier_scale

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the internal embedding / LM-head matrix (see VOCAB_PAD_MULTIPLE)."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def default_loss_chunk_size(self) -> int:
        """Tokens per chunk of the chunked LM loss when a model is given none: at least 1024, and at
        narrow widths the power of two that keeps a chunk's head GEMMs at >= 2^20 x Vp multiply-adds
        (chunk x d >= 1024 x 1024). A narrow model's chunk otherwise costs less GPU time than its
        dispatch: compiled PyTorch at `tiny` (d 192) ran 621k tokens/s with 1024-token chunks, 728k
        with 4096 and 712k-850k with 8192 (two runs), at 2.4, 4.5 and 7.7 GiB (H200,
        scripts/loss_kernel_probe.py). Memory grows with it: a chunk holds [chunk, Vp] logits."""
        rows = 2 ** 20 / self.hidden_size
        return max(1024, 2 ** math.ceil(math.log2(rows)))

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def expert_capacity(self, num_tokens: int) -> int | None:
        """C = ceil(c * N * k / E) in capacity mode, None when dropless."""
        if self.capacity_factor is None:
            return None
        n_assign = num_tokens * self.chosen_num_experts
        return math.ceil(self.capacity_factor * n_assign / self.tot_num_experts)

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = _FIELD_TYPES[f.name]
            if value is None and f.name in _OPTIONAL:
                continue
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            if want is int and not (isinstance(value, int) and not isinstance(value, bool)):
                raise ConfigError(f"config field '{f.name}' must be an integer, got {value!r}")
            if want is float and not isinstance(value, float):
                raise ConfigError(f"config field '{f.name}' must be a number, got {value!r}")
            if want is bool and not isinstance(value, bool):
                raise ConfigError(f"config field '{f.name}' must be true or false, got {value!r}")
        for name in ("vocab_size", "max_position_embeddings", "num_layers", "hidden_size",
                     "head_dim", "num_attention_heads", "num_key_value_heads", "tot_num_experts",
                     "chosen_num_experts", "embedding_multiplier_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"config field '{name}' must be positive, got {getattr(self, name)}")
        if self.head_dim % 2:
            raise ConfigError(f"config field 'head_dim' must be even (RoPE pairs dimensions), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config field 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.chosen_num_experts > self.tot_num_experts:
            raise ConfigError(
                f"config field 'chosen_num_experts' ({self.chosen_num_experts}) must be at most "
                f"tot_num_experts ({self.tot_num_experts})")
        if self.attn_logit_softcap is not None and not self.attn_logit_softcap > 0:
            raise ConfigError(f"config field 'attn_logit_softcap' must be positive or null, got {self.attn_logit_softcap}")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"config field 'capacity_factor' must be positive or null, got {self.capacity_factor}")
        for name in ("router_noise_std", "router_aux_loss_coef", "router_z_loss_coef"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"config field '{name}' must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config field 'dropout' must be in [0, 1), got {self.dropout}")

    def check_tokenizer(self, n_vocab: int) -> None:
        """Tokenized data needs every token id to have an embedding row."""
        if self.vocab_size < n_vocab:
            raise ConfigError(
                f"config field 'vocab_size' ({self.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({n_vocab})")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, *, base: "BluesConfig | None" = None) -> "BluesConfig":
        """Build from a mapping; fields it omits come from `base` (default: the defaults)."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        merged = (base or cls()).to_dict() | data
        return cls(**merged)

    @classmethod
    def from_json(cls, text: str, *, base: "BluesConfig | None" = None) -> "BluesConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(data, base=base)

    @classmethod
    def preset(cls, name: str) -> "BluesConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{name}'; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    # ---- sizes ---------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Closed-form count of the canonical parameters (the padding rows are not counted)."""
        d, h, kv, dh = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        e, f = self.tot_num_experts, self.expert_hidden_size
        norms = 4 if self.use_post_norms else 2
        per_layer = (d * h * dh * 2 + d * kv * dh * 2  # q, o, k, v
                     + d * e + e * d * 2 * f + e * f * d  # router, w_in, w_out
                     + norms * d)
        return self.vocab_size * d + self.num_layers * per_layer + d

    def num_active_matmul_parameters(self) -> int:
        """Matmul weights one token touches (k experts, LM head included): the MFU numerator."""
        d, h, kv, dh = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        f, k = self.expert_hidden_size, self.chosen_num_experts
        per_layer = d * h * dh * 2 + d * kv * dh * 2 + d * self.tot_num_experts + k * 3 * d * f
        return self.vocab_size * d + self.num_layers * per_layer


_OPTIONAL = {"attn_logit_softcap", "capacity_factor"}
_FIELD_TYPES = {f.name: {"int": int, "float": float, "bool": bool, "float | None": float}[f.type]
                for f in dataclasses.fields(BluesConfig)}

PRESETS: dict[str, dict] = {
    # The seed's configuration, verbatim: the defaults.
    "tiny": {},
    # ~180M total (102M of it the tied embedding), ~125M active: minutes on one GPU.
    "small": dict(max_position_embeddings=512, num_layers=6, hidden_size=512, head_dim=64,
                  num_attention_heads=8, num_key_value_heads=2, tot_num_experts=8,
                  chosen_num_experts=2, embedding_multiplier_scale=2),
    # The GPU benchmark size (docs/performance.md).
    "bench": dict(max_position_embeddings=2048, num_layers=12, hidden_size=1024, head_dim=64,
                  num_attention_heads=16, num_key_value_heads=4, tot_num_experts=8,
                  chosen_num_experts=2, embedding_multiplier_scale=4),
}

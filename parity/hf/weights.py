"""Canonical Blues tensors <-> transformers' names and `[out, in]` layout, both ways, bit-exact.

One row per canonical tensor (blues/layout.py); matrices are transposed (canonical tensors are in
`x @ W` orientation, nn.Linear weights are `[out, in]`), and each expert's `w_in [d, 2F]` splits into
its `up_proj` (value columns [0, F)) and `gate_proj` (gate columns [F, 2F)). Only transposes, slices
and concatenations: every bit survives a round trip.

Norm names follow Gemma 2's four-norm block: input_layernorm (before attention),
post_attention_layernorm (after it), pre_feedforward_layernorm (before the experts),
post_feedforward_layernorm (after them).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from blues.config import BluesConfig
from blues.layout import canonical_layout
from blues.canonical import ConversionError

_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
          "moe_norm": "pre_feedforward_layernorm", "moe_post_norm": "post_feedforward_layernorm"}
_ATTN = {"attn.q": "q_proj", "attn.k": "k_proj", "attn.v": "v_proj", "attn.o": "o_proj"}
TIED_HEAD = "lm_head.weight"  # tied to the embedding: not stored


def _hf_name(name: str) -> str:
    """HF name of a canonical tensor that maps one to one (not the experts' w_in / w_out)."""
    if name == "embed":
        return "model.embed_tokens.weight"
    if name == "final_norm":
        return "model.norm.weight"
    _, i, rest = name.split(".", 2)
    p = f"model.layers.{i}."
    if rest in _NORMS:
        return p + _NORMS[rest] + ".weight"
    if rest in _ATTN:
        return p + f"self_attn.{_ATTN[rest]}.weight"
    if rest == "moe.router":
        return p + "mlp.gate.weight"
    raise KeyError(name)


def _expert(layer: str, e: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"


def to_hf(arrays: Mapping[str, np.ndarray], config: BluesConfig) -> dict[str, np.ndarray]:
    """Canonical float32 arrays -> transformers state dict (tied head omitted)."""
    f = config.expert_hidden_size
    out = {}
    for spec in canonical_layout(config):
        a = arrays[spec.name]
        layer = spec.name.split(".")[1] if spec.name.startswith("layers.") else None
        if spec.name.endswith("moe.w_in"):  # [E, d, 2F]
            for e in range(a.shape[0]):
                out[_expert(layer, e, "gate_proj")] = np.ascontiguousarray(a[e][:, f:].T)  # [F, d]
                out[_expert(layer, e, "up_proj")] = np.ascontiguousarray(a[e][:, :f].T)  # [F, d]
        elif spec.name.endswith("moe.w_out"):  # [E, F, d]
            for e in range(a.shape[0]):
                out[_expert(layer, e, "down_proj")] = np.ascontiguousarray(a[e].T)  # [d, F]
        else:
            out[_hf_name(spec.name)] = np.ascontiguousarray(a.T if a.ndim == 2 and spec.name != "embed" else a)
    return out


def from_hf(tensors: Mapping[str, np.ndarray], config: BluesConfig) -> dict[str, np.ndarray]:
    """transformers state dict -> canonical float32 arrays; ConversionError names a missing, misshapen or
    unexpected tensor. A stored lm_head must equal the embedding (Blues ties them)."""
    tensors = dict(tensors)
    head = tensors.pop(TIED_HEAD, None)
    used, out = set(), {}

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise ConversionError(f"missing tensor '{name}'")
        a = np.asarray(tensors[name], dtype=np.float32)
        if a.shape != shape:
            raise ConversionError(f"tensor '{name}' has shape {list(a.shape)}, expected {list(shape)} for this config")
        used.add(name)
        return a

    d, f = config.hidden_size, config.expert_hidden_size
    for spec in canonical_layout(config):
        layer = spec.name.split(".")[1] if spec.name.startswith("layers.") else None
        if spec.name.endswith("moe.w_in"):
            out[spec.name] = np.stack([np.concatenate([take(_expert(layer, e, "up_proj"), (f, d)).T,
                                                       take(_expert(layer, e, "gate_proj"), (f, d)).T], axis=1)
                                       for e in range(spec.shape[0])])
        elif spec.name.endswith("moe.w_out"):
            out[spec.name] = np.stack([take(_expert(layer, e, "down_proj"), (d, f)).T for e in range(spec.shape[0])])
        elif len(spec.shape) == 2 and spec.name != "embed":
            out[spec.name] = np.ascontiguousarray(take(_hf_name(spec.name), spec.shape[::-1]).T)
        else:
            out[spec.name] = take(_hf_name(spec.name), spec.shape)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConversionError(f"unexpected tensor '{extra[0]}' (not part of a Blues model with this config)")
    if head is not None and not np.array_equal(np.asarray(head, dtype=np.float32), out["embed"]):
        raise ConversionError(f"'{TIED_HEAD}' differs from the embedding; Blues ties its LM head to the embedding")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---- transformers' Mixtral -------------------------------------------------------------------------

_MIXTRAL = {"input_layernorm": "input_layernorm", "pre_feedforward_layernorm": "post_attention_layernorm",
            "mlp.gate": "block_sparse_moe.gate", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def to_mixtral(arrays: Mapping[str, np.ndarray], config: BluesConfig) -> dict[str, np.ndarray]:
    """Canonical arrays -> a MixtralForCausalLM state dict in the Hub's naming (`block_sparse_moe.experts.N.w1`),
    for a config `mixtral_refusal` accepts. Blues scales embeddings by sqrt(d) and Mixtral does not, so the
    input embedding is stored pre-scaled (the same float32 product Blues computes per token) and the LM head,
    untied, is the embedding itself."""
    import torch

    out = {}
    for name, a in to_hf(arrays, config).items():
        for old, new in _MIXTRAL.items():
            name = name.replace(f".{old}.", f".{new}.")
        out[name.replace(".mlp.experts.", ".block_sparse_moe.experts.")] = a
    embed = torch.from_numpy(np.asarray(arrays["embed"], dtype=np.float32))
    out["model.embed_tokens.weight"] = (embed * math.sqrt(config.hidden_size)).numpy()
    out[TIED_HEAD] = np.ascontiguousarray(arrays["embed"])
    return out


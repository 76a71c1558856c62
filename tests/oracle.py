"""An independent float64 implementation of the design page, in numpy, for the acceptance tests.

It shares no code with either model: it reads canonical tensors (blues/layout.py names) and
follows ../shared/design/architecture.md line by line, in float64, eval mode (no router noise,
no dropout). Both `blues_torch` and `blues_jax` are checked against it.
"""
from __future__ import annotations

import math

import numpy as np

from blues.config import BluesConfig
from blues.layout import canonical_layout


def random_canonical(config: BluesConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 canonical tensors, with non-trivial norm scales so a norm bug shows."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in canonical_layout(config):
        if len(spec.shape) == 1:  # norm scales
            a = 1.0 + 0.2 * rng.standard_normal(spec.shape)
        else:
            fan_in = spec.shape[-2]
            a = rng.standard_normal(spec.shape) / math.sqrt(fan_in)
        arrays[spec.name] = a.astype(np.float32)
    # Router logits large enough that top-k choices are well separated (no near-ties that
    # float32 rounding could flip between implementations).
    for name in arrays:
        if name.endswith("moe.router"):
            arrays[name] *= 4.0
    return arrays


def _rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
    # x [B, T, heads, Dh]; rotate-half: dimension i pairs with i + Dh/2.
    dh = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, dh // 2, dtype=np.float64) * 2.0 / dh)  # [Dh/2]
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, Dh/2]
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[None, :, None, :]  # [1, T, 1, Dh]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[None, :, None, :]
    rotated = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], axis=-1)
    return x * cos + rotated * sin


def _softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _logsumexp(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _gelu(x):
    from scipy.special import erf  # exact erf form
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _attention(x, w, config, i):
    b, t, _ = x.shape
    h, kv, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = (x @ w[f"layers.{i}.attn.q"]).reshape(b, t, h, dh)
    k = (x @ w[f"layers.{i}.attn.k"]).reshape(b, t, kv, dh)
    v = (x @ w[f"layers.{i}.attn.v"]).reshape(b, t, kv, dh)
    pos = np.arange(t)
    q, k = _rope(q, pos, config.rope_theta), _rope(k, pos, config.rope_theta)
    out = np.zeros((b, t, h, dh))
    causal = np.tril(np.ones((t, t), dtype=bool))
    for head in range(h):  # one head at a time: query head j reads kv head j // (H/K)
        g = head // (h // kv)
        s = np.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, g]) / math.sqrt(dh)
        if config.attn_logit_softcap is not None:
            c = config.attn_logit_softcap
            s = c * np.tanh(s / c)
        s = np.where(causal, s, -np.inf)
        out[:, :, head] = np.einsum("bqk,bkd->bqd", _softmax(s), v[:, :, g])
    return out.reshape(b, t, h * dh) @ w[f"layers.{i}.attn.o"]


def _moe(x, w, config, i):
    b, t, d = x.shape
    n, e, k = b * t, config.tot_num_experts, config.chosen_num_experts
    f = config.expert_hidden_size
    xs = x.reshape(n, d)
    r = xs @ w[f"layers.{i}.moe.router"]  # [N, E]
    p = _softmax(r)
    # top-k, ties to the lower index: sort by (-p, index).
    idx = np.stack([np.lexsort((np.arange(e), -p[row]))[:k] for row in range(n)])  # [N, k]
    gate = np.take_along_axis(p, idx, axis=1)  # [N, k]
    if config.normalize_router_weights:
        gate = gate / gate.sum(axis=1, keepdims=True)
    keep = np.ones((n, k), dtype=bool)
    cap = config.expert_capacity(n)
    if cap is not None:  # priority: all first choices in token order, then second choices, ...
        load = np.zeros(e, dtype=int)
        for j in range(k):
            for tok in range(n):
                ex = idx[tok, j]
                keep[tok, j] = load[ex] < cap
                load[ex] += 1
    y = np.zeros((n, d))
    for tok in range(n):
        for j in range(k):
            if not keep[tok, j]:
                continue
            ex = idx[tok, j]
            w_in = w[f"layers.{i}.moe.w_in"][ex]
            hidden = xs[tok] @ w_in  # [2F]
            value, gate_pre = hidden[:f], hidden[f:]
            y[tok] += gate[tok, j] * ((_gelu(gate_pre) * value) @ w[f"layers.{i}.moe.w_out"][ex])
    counts = np.bincount(idx.reshape(-1), minlength=e)
    aux = e * np.sum(counts / (n * k) * p.mean(axis=0))
    z = np.mean(_logsumexp(r) ** 2)
    return y.reshape(b, t, d), idx.reshape(b, t, k), p.reshape(b, t, e), aux, z, int((~keep).sum())


def oracle_forward(arrays: dict[str, np.ndarray], config: BluesConfig, input_ids: np.ndarray,
                   targets: np.ndarray | None = None) -> dict:
    w = {name: np.asarray(a, dtype=np.float64) for name, a in arrays.items()}
    eps, d = config.rms_norm_eps, config.hidden_size
    ids = np.asarray(input_ids)
    h = w["embed"][ids] * math.sqrt(d)  # [B, T, d]
    indices, probs, auxes, zs, dropped = [], [], [], [], []
    for i in range(config.num_layers):
        a = _attention(_rms_norm(h, w[f"layers.{i}.attn_norm"], eps), w, config, i)
        if config.use_post_norms:
            a = _rms_norm(a, w[f"layers.{i}.attn_post_norm"], eps)
        h = h + a
        m, idx, p, aux, z, drop = _moe(_rms_norm(h, w[f"layers.{i}.moe_norm"], eps), w, config, i)
        if config.use_post_norms:
            m = _rms_norm(m, w[f"layers.{i}.moe_post_norm"], eps)
        h = h + m
        indices.append(idx); probs.append(p); auxes.append(aux); zs.append(z); dropped.append(drop)
    logits = _rms_norm(h, w["final_norm"], eps) @ w["embed"].T  # [B, T, V]
    out = dict(logits=logits, expert_indices=np.stack(indices), router_probs=np.stack(probs),
               aux_loss=float(np.mean(auxes)), z_loss=float(np.mean(zs)), dropped=np.array(dropped))
    if targets is not None:
        tg = np.asarray(targets).reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        valid = tg != -100
        nll = _logsumexp(flat[valid]) - flat[valid, tg[valid]]
        out["lm_loss"] = float(nll.mean()) if valid.any() else 0.0
        out["loss"] = (out["lm_loss"] + config.router_aux_loss_coef * out["aux_loss"]
                       + config.router_z_loss_coef * out["z_loss"])
    return out

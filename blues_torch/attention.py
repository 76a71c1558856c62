"""Rotary embeddings and causal GQA attention with interchangeable backends.

All functions take q/k/v in the `[B, T, heads, Dh]` layout (flash-attn's native one). The
`reference` backend is the definition (docs/architecture.md); `sdpa` and `flash_attn` compute the
same function faster. `attention(..., impl="auto")` picks the fastest one that can do the job.
"""
from __future__ import annotations

import importlib.util
import inspect
import logging
import math

import torch
import torch.nn.functional as F

from blues import rope
from blues.errors import ConfigError

logger = logging.getLogger("blues")

ATTN_IMPLS = ("auto", "flash_attn", "sdpa", "reference")


# ---- RoPE ------------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rotary angles, float32, each half repeated: [*positions.shape, Dh]."""
    inv_freq = _inv_freq(head_dim, theta, positions.device)  # [Dh/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., Dh/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., Dh]: dimension i pairs with i + Dh/2
    return angles.cos(), angles.sin()


# inv_freq by (Dh, theta, device): blues.rope's float64 numbers rounded once to float32 and copied to
# the device once per process (not per forward, and not inside a captured CUDA graph's step, whose
# warm-up calls fill this); the angles themselves are float32 (design page).
_INV_FREQ: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # a constant of the compiled graph
        return torch.tensor(rope.inv_freq(head_dim, theta), dtype=torch.float32, device=device)
    key = (head_dim, theta, device)
    if key not in _INV_FREQ:
        _INV_FREQ[key] = torch.tensor(rope.inv_freq(head_dim, theta), dtype=torch.float32).to(device)
    return _INV_FREQ[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [B, T, heads, Dh]; cos/sin [T, Dh] or [B, T, Dh]. Same dtype out as in."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, Dh]: broadcast over heads
    xf = x.float()  # rotate in float32 so a bf16 input loses nothing beyond its own rounding
    x1, x2 = xf.chunk(2, dim=-1)  # [B, T, heads, Dh/2] each
    rotated = torch.cat([-x2, x1], dim=-1)  # [B, T, heads, Dh]: rotate_half
    return (xf * cos + rotated * sin).to(x.dtype)


# ---- backends --------------------------------------------------------------------------------------

def _causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """[Tq, Tk] bool, True where attention is allowed. Queries are the last Tq of the Tk positions
    (bottom-right alignment, as flash-attn), so the same mask serves a KV-cache decode step."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # [Tq, 1]
    k_pos = torch.arange(t_k, device=device)[None, :]  # [1, Tk]
    return k_pos <= q_pos


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        softcap: float | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The definition: q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh]; float32 throughout.
    `mask` [B, T, S] (True = attend), when given, replaces the causal mask (KV-cache decoding)."""
    b, t, h, dh = q.shape
    s, kv = k.shape[1], k.shape[2]
    # Query head j reads kv head j // (H/K): split H into (K, H/K) instead of repeating K and V.
    qg = q.float().view(b, t, kv, h // kv, dh)  # [B, T, K, G, Dh]
    scores = torch.einsum("btkgd,bskd->bkgts", qg, k.float()) / math.sqrt(dh)  # [B, K, G, T, S]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = _causal_mask(t, s, q.device) if mask is None else mask[:, None, None]  # [T, S] or [B, 1, 1, T, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bkgts,bskd->btkgd", probs, v.float())  # [B, T, K, G, Dh]
    return out.reshape(b, t, h, dh).to(q.dtype)


def _sdpa_attention(q, k, v, mask=None):
    t, s = q.shape[1], k.shape[1]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, heads, T, Dh]: SDPA's layout
    if mask is not None:  # KV-cache decoding: the cache's own mask [B, T, S], broadcast over heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
    elif t == s:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # SDPA's is_causal is top-left aligned; a decode step needs bottom-right
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(t, s, q.device), enable_gqa=True)
    return out.transpose(1, 2)  # [B, T, H, Dh]


def _flash_attention(q, k, v, softcap):
    from flash_attn import flash_attn_func
    kwargs = {} if softcap is None else {"softcap": softcap}
    return flash_attn_func(q, k, v, causal=True, **kwargs)  # [B, T, H, Dh]; GQA native


_FLASH_STATUS: tuple[bool, bool] | None = None


def flash_attn_status() -> tuple[bool, bool]:
    """(importable, supports softcap); checked once per process. The model probes it when built:
    under torch.compile the install probe (importlib) would break the graph."""
    global _FLASH_STATUS
    if _FLASH_STATUS is None:
        _FLASH_STATUS = (False, False)
        if importlib.util.find_spec("flash_attn") is not None:
            try:
                from flash_attn import flash_attn_func
                _FLASH_STATUS = (True, "softcap" in inspect.signature(flash_attn_func).parameters)
            except Exception as e:  # a broken build (ABI mismatch) must not take the model down
                logger.warning("flash_attn is installed but failed to import (%s); not using it", e)
    return _FLASH_STATUS


def _choose(impl: str, device_type: str, dtype: torch.dtype, has_softcap: bool, log: bool = True) -> str:
    if impl not in ATTN_IMPLS:
        raise ConfigError(f"attn_impl '{impl}' is unknown; choose one of {', '.join(ATTN_IMPLS)}")
    flash_ok, flash_softcap = flash_attn_status()
    flash_usable = flash_ok and device_type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if impl == "flash_attn":
        if not flash_usable:
            raise ConfigError("attn_impl 'flash_attn' needs the flash-attn package, a CUDA device and "
                              f"fp16/bf16 activations (have {device_type}, {dtype}); use attn_impl 'auto'")
        if has_softcap and not flash_softcap:
            raise ConfigError("attn_impl 'flash_attn': this flash-attn build has no softcap "
                              "(needs flash-attn >= 2.6); use attn_impl 'auto' or 'reference'")
        chosen = "flash_attn"
    elif impl == "auto":
        if flash_usable and (flash_softcap or not has_softcap):
            chosen = "flash_attn"
        elif has_softcap:
            if log:
                logger.warning("attention: attn_logit_softcap is set and no fast kernel here can apply it "
                               "(%s, %s); falling back to the reference implementation", device_type, dtype)
            return "reference"
        else:
            chosen = "sdpa"
    elif impl == "sdpa" and has_softcap:
        if log:
            logger.warning("attention: SDPA cannot apply attn_logit_softcap; falling back to the "
                           "reference implementation")
        return "reference"
    else:
        chosen = impl
    if log:
        logger.info("attention backend: %s (requested %s, %s, %s)", chosen, impl, device_type, dtype)
    return chosen


# Resolved backends by (impl, device type, dtype, has softcap): each choice is made, and logged,
# once per process rather than once per layer and step. A plain dict rather than functools.cache,
# which torch.compile warns about and traces through anyway.
_RESOLVED: dict[tuple[str, str, torch.dtype, bool], str] = {}


def resolve_attn_impl(impl: str, device: torch.device | str, dtype: torch.dtype, softcap: float | None) -> str:
    """The backend `attention` will use for these inputs: 'flash_attn', 'sdpa' or 'reference'."""
    key = (impl, torch.device(device).type, dtype, softcap is not None)
    if torch.compiler.is_compiling():
        # Choose silently (a logging call would break the graph) and never read the record: a graph
        # that read it would be guarded on its contents, and the first eager call (an evaluation)
        # that records the choice would make every compiled block recompile.
        return _choose(*key, log=False)
    if key not in _RESOLVED:
        _RESOLVED[key] = _choose(*key)
    return _RESOLVED[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softcap: float | None,
              impl: str = "auto", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention, scale 1/sqrt(Dh). q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh].
    `mask` [B, T, S] bool (True = attend) replaces the causal mask: a KV cache's padding-aware mask."""
    backend = resolve_attn_impl(impl, q.device, q.dtype, softcap)
    if mask is not None and backend == "flash_attn":  # flash-attn takes no arbitrary mask
        backend = "sdpa" if softcap is None else "reference"
    if backend == "flash_attn":
        return _flash_attention(q, k, v, softcap)
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, mask)
    return reference_attention(q, k, v, softcap=softcap, mask=mask)

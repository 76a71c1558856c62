"""The sampling specification, written once, with a numpy reference both frameworks are tested against.

One decoding step turns the logits of the last position, `[B, V]` float32, into one token id per row:

1. **Temperature.** `temperature == 0` is greedy: the argmax, ties to the lower id (steps 2-4 are
   skipped). Otherwise `logits / temperature`.
2. **Top-k** (`top_k > 0` and `< V`): keep the k largest logits; ties at the k-th place go to the
   lower ids, so exactly k tokens are kept.
3. **Top-p** (`top_p < 1`): over the tokens still kept, `probs = softmax(logits)`; order them by
   probability, descending, ties to the lower id; keep the smallest prefix whose probability reaches
   `top_p`: a token is kept iff the probability of the tokens ranked before it is `< top_p`. The first
   token is always kept.
4. **Sample** from the softmax of the kept logits, by the Gumbel-max trick: the token with the largest
   `logit + g`, `g = -log(-log(u))`, where `u` is uniform in (0, 1).

The uniforms come from a counter-based hash, not from a stateful generator: `u` depends only on
`(seed, step, row, token id)` (`uniform_bits`). So the same seed gives the same samples on every
device and in both frameworks (up to the last-ulp differences of `log` between libraries), a
compiled decode loop needs no RNG state, and CUDA graphs can replay a step without any host work.
`row` is the sample's index within the call.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blues.errors import UsageError

MASK32 = 0xFFFFFFFF
# Multipliers of MurmurHash3's fmix32 finaliser and three odd constants that spread the counters.
FMIX_C1, FMIX_C2 = 0x85EBCA6B, 0xC2B2AE35
STEP_MUL, ROW_MUL, TOKEN_MUL = 0x9E3779B9, 0x85EBCA77, 0xC2B2AE3D


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings. `top_k = 0` and `top_p = 1` switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (isinstance(t, (int, float)) and np.isfinite(t) and t >= 0):
            raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise UsageError(f"--top_k must be an integer >= 0 (0 = off), got {k}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise UsageError(f"--top_p must be in (0, 1] (1 = off), got {p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise UsageError(f"--seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_k", int(k))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def active_top_k(self, vocab_size: int) -> int:
        """k when the top-k filter does something, else 0."""
        return self.top_k if 0 < self.top_k < vocab_size else 0

    @property
    def active_top_p(self) -> bool:
        return self.top_p < 1.0


# ---- the counter-based uniforms (numpy version; torch and jax mirror it op for op) ----------------

def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche, on uint32 arrays."""
    h = np.asarray(h, dtype=np.uint32)
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(FMIX_C1)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(FMIX_C2)
    return h ^ (h >> np.uint32(16))


def row_keys(seed: int, step, rows: np.ndarray) -> np.ndarray:
    """One 32-bit key per (seed, step, row): [B] uint32."""
    with np.errstate(over="ignore"):
        s = fmix32(np.uint32(seed & MASK32))
        s = fmix32(s ^ (np.uint32(int(step) & MASK32) * np.uint32(STEP_MUL)))
        return fmix32(s ^ (np.asarray(rows, dtype=np.uint32) * np.uint32(ROW_MUL)))


def uniform_bits(keys: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """u in (0, 1), float32, for each row key [B] and token id [B, N]: [B, N]."""
    with np.errstate(over="ignore"):
        h = fmix32(keys[:, None] ^ (np.asarray(token_ids, dtype=np.uint32) * np.uint32(TOKEN_MUL)))
    # 23 bits + 0.5 fit a float32 mantissa exactly, so u is never 0 or 1.
    return (((h >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)).astype(np.float32)


def gumbel(u: np.ndarray) -> np.ndarray:
    return (-np.log(-np.log(u))).astype(np.float32)


# ---- the reference sampler -------------------------------------------------------------------------

def candidates(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 for one row: (kept token ids, their tempered logits), in rank order."""
    z = np.asarray(logits, dtype=np.float32) / np.float32(params.temperature)  # [V]
    order = np.lexsort((np.arange(z.size), -z))  # by logit descending, then id ascending
    k = params.active_top_k(z.size)
    if k:
        order = order[:k]
    if params.active_top_p:
        kept = z[order]
        probs = np.exp(kept - kept.max())
        probs = (probs / probs.sum()).astype(np.float32)
        before = np.concatenate([[0.0], np.cumsum(probs, dtype=np.float32)[:-1]]).astype(np.float32)
        order = order[before < np.float32(params.top_p)]
    return order, z[order]


def reference_sample(logits: np.ndarray, params: SamplingParams, step: int = 0,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """The specification in numpy: logits [B, V] -> token ids [B] (int64)."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)  # numpy's argmax: first maximum
    rows = np.arange(logits.shape[0]) if rows is None else np.asarray(rows)
    keys = row_keys(params.seed, step, rows)
    out = np.empty(logits.shape[0], dtype=np.int64)
    for b in range(logits.shape[0]):
        ids, z = candidates(logits[b], params)
        score = z + gumbel(uniform_bits(keys[b:b + 1], ids[None]))[0]
        out[b] = ids[np.argmax(score)]
    return out


def kept_mask(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Which tokens steps 1-3 keep, [V] bool: what the tests compare the device filters with."""
    mask = np.zeros(np.asarray(logits).shape[-1], dtype=bool)
    if params.greedy:
        mask[np.argmax(logits)] = True
    else:
        mask[candidates(logits, params)[0]] = True
    return mask


PREFILL_BUCKET = 32  # prompts are left-padded to a multiple of this (when it fits): fewer compiled prefill shapes


def prefill_width(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int) -> int:
    """The prefill's padded length: the longest prompt rounded up to a multiple of PREFILL_BUCKET when
    that still leaves room for the new tokens in the context, else the longest prompt. A compiled
    prefill then sees few shapes; padding changes no output (the cache masks it)."""
    longest = max(len(p) for p in prompts)
    bucket = -(-longest // PREFILL_BUCKET) * PREFILL_BUCKET
    return bucket if bucket + max_new_tokens <= context else longest


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None,
             dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """A batch of prompts for the decoders: (ids [B, P] right-aligned, start [B] = padding slots per
    row); P = `width` or the longest prompt, whichever is larger."""
    width = max(max(len(p) for p in prompts), width or 0)
    ids = np.full((len(prompts), width), pad_id, dtype=dtype)
    start = np.zeros(len(prompts), dtype=dtype)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        start[b] = width - len(p)
    return ids, start

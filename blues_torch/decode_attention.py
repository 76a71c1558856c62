"""Decoding's attention: one new query per row over the KV cache, in one kernel. Mirrors
blues_jax/decode_attention.py.

    decode_attention(q [B, H, Dh], k [B, S, K, Dh], v [B, S, K, Dh], index [], start [B], softcap)
        -> [B, H, Dh]

out[b, h] = softmax_s(softcap(q[b, h] . k[b, s, h // G] / sqrt(Dh))) @ v[b, s, h // G] over the slots
s that the cache's mask allows for a one-token step (KVCache.positions): s <= index (the slot just
written) and s >= start[b] (not padding), or s == index. The same function as `attention(q[:, None],
k, v, mask=...)` of blues_torch/attention.py, computed in float32 (scores, softmax and the weighted
sum), the output in q's dtype.

One Triton program per (row, query head), walking the cache in blocks of slots with an online softmax
(blues/decode_launch.py): no [B, 1, S] mask, no transposes and no SDPA call. A decode step at `tiny`
spends ~6.5 us a layer in cuDNN's attention for one query over 288 slots (H200, docs/performance.md
"Decoding"); this is the work of a few microseconds.
"""
from __future__ import annotations

import math

import torch

from blues.decode_launch import attention_tiles

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: attention.py's backends
    triton = None


def applies(q: torch.Tensor) -> bool:
    """A one-token step on a CUDA device with Triton (q [B, t, H, Dh] with t == 1)."""
    return triton is not None and q.is_cuda and q.shape[1] == 1


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, start: torch.Tensor,
                     softcap: float | None) -> torch.Tensor:
    """q [B, H, Dh], k/v [B, S, K, Dh] (contiguous), index int [], start int [B] -> [B, H, Dh] in q's dtype."""
    return _decode_attention(q, k, v, index, start, softcap)


if triton is not None:
    # An opaque custom op (as blues_torch/gated_gelu.py's backward): a compiled decode step keeps it as
    # one extern call, inductor never handles the Triton kernel itself, and a CUDA graph captures its
    # launch.
    @torch.library.custom_op("blues::decode_attention", mutates_args=())
    def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                          start: torch.Tensor, softcap: float | None) -> torch.Tensor:
        b, h, dh = q.shape
        s, kv = k.shape[1], k.shape[2]
        assert k.is_contiguous() and v.is_contiguous() and k.shape == v.shape, (k.shape, k.stride())
        t = attention_tiles(s, dh)
        q = q.contiguous()
        out = torch.empty_like(q)  # [B, H, Dh]
        _kernel[(b, h)](q, k, v, index, start, out, s, 1.0 / math.sqrt(dh), 0.0 if softcap is None else softcap,
                        H=h, GROUPS=h // kv, KV_WIDTH=kv * dh, HEAD_DIM=dh, HEAD_DIM_P=t.head_dim, SLOTS=t.slots,
                        BLOCKS=t.blocks, SOFTCAP=softcap is not None, num_warps=4, num_stages=1)
        return out

    @_decode_attention.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, start: torch.Tensor,
          softcap: float | None) -> torch.Tensor:
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @triton.jit
    def _kernel(q_ptr, k_ptr, v_ptr, index_ptr, start_ptr, out_ptr, slots, scale, softcap, H: tl.constexpr,
                GROUPS: tl.constexpr, KV_WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                SLOTS: tl.constexpr, BLOCKS: tl.constexpr, SOFTCAP: tl.constexpr):
        """One (row, query head): the online softmax over the cache's slots, block by block."""
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        dim = tl.arange(0, HEAD_DIM_P)  # [Dh']
        q = tl.load(q_ptr + (row * H + head) * HEAD_DIM + dim, mask=dim < HEAD_DIM, other=0.0).to(tl.float32) * scale
        index = tl.load(index_ptr)
        start = tl.load(start_ptr + row)
        cache_row = row * slots * KV_WIDTH + (head // GROUPS) * HEAD_DIM  # [B, S, K * Dh]: row b, its kv head
        run_max = tl.full((), float("-inf"), tl.float32)
        run_sum = tl.zeros((), tl.float32)
        acc = tl.zeros((HEAD_DIM_P,), tl.float32)
        for j in range(BLOCKS):
            slot = j * SLOTS + tl.arange(0, SLOTS)  # [slots]
            mask = (slot < slots)[:, None] & (dim < HEAD_DIM)[None, :]  # [slots, Dh']
            at = cache_row + slot[:, None].to(tl.int64) * KV_WIDTH + dim[None, :]
            keys = tl.load(k_ptr + at, mask=mask, other=0.0).to(tl.float32)  # [slots, Dh']
            scores = tl.sum(keys * q[None, :], axis=1)  # [slots]
            if SOFTCAP:
                scores = softcap * _tanh(scores / softcap)
            allowed = (slot <= index) & ((slot >= start) | (slot == index))
            scores = tl.where(allowed, scores, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(scores, axis=0))
            # A block wholly masked (padding) keeps the max at -inf: shift by 0, so exp(-inf - -inf) never runs.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.exp(scores - shift)  # [slots]
            rescale = tl.exp(run_max - shift)
            values = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)  # [slots, Dh']
            run_sum = run_sum * rescale + tl.sum(p, axis=0)
            acc = acc * rescale + tl.sum(p[:, None] * values, axis=0)
            run_max = new_max
        # the slot `index` is always allowed: run_sum > 0
        tl.store(out_ptr + (row * H + head) * HEAD_DIM + dim, (acc / run_sum).to(out_ptr.dtype.element_ty),
                 mask=dim < HEAD_DIM)

    @triton.jit
    def _tanh(x):
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both ends (exp overflows to inf -> 1, underflows to 0 -> -1)
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

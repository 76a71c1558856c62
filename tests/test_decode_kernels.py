"""The decode step's kernels (blues_*/greedy_head.py, blues_*/decode_attention.py) on a CPU.

They run on GPUs only; here the Pallas kernels run in Pallas's interpreter against the functions
they compute (argmax of the head's logits; attention under the cache's mask), lower through Pallas's
Triton lowering for CUDA (a primitive the lowering lacks fails here, not on the GPU), and decode
through the model with the kernels' path forced, JAX's real kernels interpreted inside the compiled
decode loop. The Triton kernels compile to sm_90 cubins here (requirements/cpu.txt pins Triton);
tests/triton_interpreted.py runs them in Triton's interpreter, alone and through the model, and
tests/test_gpu.py runs both frameworks' kernels on a GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from blues.config import BluesConfig
from blues.sampling import SamplingParams
from blues_jax import generation as jgen
from blues_torch import generation as tgen
from oracle import random_canonical
from parity.convert import from_canonical

torch.set_num_threads(1)

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 9, 10, 11], [100, 200, 300, 400, 500, 11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def small_models():
    # head_dim 24: padded to 32 in the attention kernels; hidden 32: the greedy head's smallest depth step
    cfg = BluesConfig(vocab_size=512, max_position_embeddings=64, num_layers=2, hidden_size=32, head_dim=24,
                      num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                      embedding_multiplier_scale=2)
    arrays = random_canonical(cfg, seed=1)
    tm = from_canonical(arrays, cfg, "torch").eval()
    jm = from_canonical(arrays, cfg, "jax")
    jm.eval()
    return cfg, tm, jm


def _sm90(module, kernel: str, signature, constexprs):
    """module.kernel compiled by Triton for an H100/H200 (no GPU needed): its PTX."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(fn=getattr(module, kernel), signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})
    assert compiled.asm["cubin"]
    return compiled.asm["ptx"]


def _triton_calls(fn, *args) -> int:
    """Triton kernels in fn's program lowered for CUDA on this CPU-only machine."""
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text().count("custom_call @__gpu$xla.gpu.triton(")


# ---- the fused greedy head -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_fused_greedy_head_is_the_first_maximum_of_the_logits(dtype):
    """blues_jax/greedy_head.py's Pallas kernels in Pallas's interpreter (blues_torch/greedy_head.py's
    Triton kernels have the same tiles; tests/test_gpu.py runs both compiled, at the real vocabulary)
    against argmax of the head's logits: batches of one row tile, several and a partial one, a table
    with padding rows, and small-integer weights whose logits are exact in any summation order and
    tie everywhere (ties go to the lower id)."""
    from blues_jax.greedy_head import greedy_tokens
    from blues_jax.loss import lm_head_logits
    rng = np.random.default_rng(3)
    vocab, padded = 1001, 1024  # 8 blocks of 128, the last with 23 real columns
    for batch, depth in ((1, 64), (3, 96), (70, 32)):
        for draw in ("ties", "normal", "negative"):
            shape_h, shape_t = (batch, depth), (padded, depth)
            h, t = ((rng.integers(-2, 3, shape_h), rng.integers(-2, 3, shape_t)) if draw == "ties" else
                    (rng.standard_normal(shape_h), rng.standard_normal(shape_t)))
            if draw == "negative":  # every real logit < 0: a padding column read as 0 would win
                h, t = np.abs(h) + 0.5, -np.abs(t) - 0.5
            t[vocab:] = 9  # padding rows: large logits that must never win
            h, t = jnp.asarray(h, dtype), jnp.asarray(t, dtype)
            got = greedy_tokens(h, t, vocab, interpret=True)
            want = jnp.argmax(lm_head_logits(h, t, vocab), axis=-1)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{batch} x {depth}, {draw}")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_greedy_generation_through_the_fused_head_path(small_models, framework, monkeypatch):
    """Decoding with the fused head's path taken (it applies on GPUs only: forced here) emits what
    the logits' argmax emits: the model skips its head and the kernel reads the last position's
    hidden state and the tied table. JAX runs its real kernels in Pallas's interpreter inside the
    compiled decode loop; PyTorch's stand-in is the reference function the GPU test holds its
    kernels to (greedy_argmax of the head's logits), so this checks PyTorch's plumbing only (its kernels
    decode through the model in tests/triton_interpreted.py)."""
    cfg, tm, jm = small_models
    greedy = SamplingParams(temperature=0.0)
    if framework == "torch":
        from blues_torch import greedy_head
        from blues_torch.loss import lm_head_logits
        engine, model = tgen, tm
        want = engine.generate(model, PROMPTS, 12, greedy, eot_id=0, stop_at_eot=False)
        called = []
        monkeypatch.setattr(greedy_head, "fused_applies", lambda h: True)
        monkeypatch.setattr(greedy_head, "greedy_tokens", lambda h, table, v: called.append(h.shape) or
                            tgen.greedy_argmax(lm_head_logits(h, table, v)))
        tgen._DECODERS.clear()
        got = engine.generate(model, PROMPTS, 12, greedy, eot_id=0, stop_at_eot=False)
        tgen._DECODERS.clear()
        assert called[0] == (len(PROMPTS), cfg.hidden_size)
    else:
        from blues_jax import greedy_head
        engine, model = jgen, jm
        want = engine.generate(model, PROMPTS, 12, greedy, eot_id=0, stop_at_eot=False)
        monkeypatch.setattr(greedy_head, "fused_applies", lambda dtype, d: True)
        monkeypatch.setattr(greedy_head, "greedy_tokens",
                            functools.partial(greedy_head.greedy_tokens, interpret=True))
        jgen._compiled.cache_clear()
        got = engine.generate(model, PROMPTS, 12, greedy, eot_id=0, stop_at_eot=False)
        jgen._compiled.cache_clear()
    assert got == want


@pytest.mark.parametrize("batch", [1, 64, 100])
def test_fused_greedy_head_lowers_to_triton_for_a_gpu(batch):
    """(A planted jnp.sort in the tile kernel fails this test.)"""
    from blues_jax.greedy_head import greedy_tokens
    h = jax.ShapeDtypeStruct((batch, 192), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((200064, 192), jnp.bfloat16)
    assert _triton_calls(lambda h, t: greedy_tokens(h, t, 200019), h, table) == 2  # the tile and the pick kernels


def test_fused_greedy_head_triton_kernels_compile_for_sm90():
    from blues_torch import greedy_head
    tile = {"h_ptr": "*bf16", "table_ptr": "*bf16", "max_ptr": "*fp32", "arg_ptr": "*i32", "batch": "i32",
            "vocab": "i32", "blocks": "i32", "D": "constexpr", "ROWS": "constexpr", "VOCAB": "constexpr",
            "DEPTH": "constexpr"}
    for rows in (16, 64):
        ptx = _sm90(greedy_head, "_tile_kernel", tile, {"D": 192, "ROWS": rows, "VOCAB": 128, "DEPTH": 64})
        assert "mma" in ptx  # the tile's GEMM on tensor cores
    pick = {"max_ptr": "*fp32", "arg_ptr": "*i32", "ids_ptr": "*i64", "blocks": "i32", "WIDTH": "constexpr"}
    _sm90(greedy_head, "_pick_kernel", pick, {"WIDTH": 2048})


# ---- the decode step's attention -----------------------------------------------------------------

def _attention_case(rng, b, h, kv, dh, s):
    """q [B, H, Dh], k/v [B, S, K, Dh], the step's slot, each row's first real slot (row 0 all padding:
    its query is itself a padding token that sees only its own slot), and the cache's mask [B, 1, S]."""
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((b, h, dh), (b, s, kv, dh), (b, s, kv, dh)))
    index = s * 2 // 3
    start = rng.integers(0, s // 2, b)
    start[0] = index
    keys = np.arange(s)
    mask = ((keys <= index) & ((keys[None] >= start[:, None]) | (keys == index)))[:, None, :]
    return q, k, v, index, start, mask


@pytest.mark.parametrize("b, h, kv, dh, s, softcap", [(3, 4, 2, 48, 288, None), (2, 4, 1, 64, 100, 30.0),
                                                     (1, 8, 4, 16, 40, None)])
def test_decode_attention_is_attention_under_the_caches_mask(b, h, kv, dh, s, softcap):
    """blues_jax/decode_attention.py in Pallas's interpreter against the reference attention with the
    cache's mask: several blocks of slots, a partial last block, a padded head dimension (48 in 64),
    GQA groups of 2, 4 and 2, softcap, a row of padding. float32 both ways; 1e-5 allows the
    different order of the sums (observed 2e-7 to 7e-7). (Planted: the padding rule dropped, or
    the slot `index` not allowed: both fail.)"""
    from blues_jax.attention import reference_attention
    from blues_jax.decode_attention import decode_attention
    q, k, v, index, start, mask = _attention_case(np.random.default_rng(b * s), b, h, kv, dh, s)
    want = reference_attention(jnp.asarray(q)[:, None], jnp.asarray(k), jnp.asarray(v), softcap=softcap,
                               mask=jnp.asarray(mask))[:, 0]
    got = decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.int32(index), jnp.asarray(start),
                           softcap, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 64])
def test_decode_attention_lowers_to_triton_for_a_gpu(batch):
    from blues_jax.decode_attention import decode_attention
    sds = jax.ShapeDtypeStruct
    args = (sds((batch, 4, 48), jnp.bfloat16), sds((batch, 288, 2, 48), jnp.bfloat16),
            sds((batch, 288, 2, 48), jnp.bfloat16), sds((), jnp.int32), sds((batch,), jnp.int32))
    assert _triton_calls(lambda *a: decode_attention(*a, None), *args) == 1


def test_decode_attention_triton_kernel_compiles_for_sm90():
    from blues_torch import decode_attention
    signature = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "index_ptr": "*i64", "start_ptr": "*i64",
                 "out_ptr": "*bf16", "slots": "i32", "scale": "fp32", "softcap": "fp32", "H": "constexpr",
                 "GROUPS": "constexpr", "KV_WIDTH": "constexpr", "HEAD_DIM": "constexpr", "HEAD_DIM_P": "constexpr",
                 "SLOTS": "constexpr", "BLOCKS": "constexpr", "SOFTCAP": "constexpr"}
    for softcap in (False, True):
        _sm90(decode_attention, "_kernel", signature, dict(H=4, GROUPS=2, KV_WIDTH=96, HEAD_DIM=48, HEAD_DIM_P=64,
                                                        SLOTS=128, BLOCKS=3, SOFTCAP=softcap))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_decoding_through_the_decode_attention_path(small_models, framework, monkeypatch):
    """Greedy and sampled decoding with the decode step's attention kernel forced (it applies on GPUs
    only) emit what the cache's masked attention emits, prompts of three lengths in one batch (so
    rows of padding). JAX runs its real kernel in Pallas's interpreter inside the compiled loop;
    PyTorch's stand-in is the reference attention under the mask the kernel's rule must equal,
    built from `index` and `start` as the kernel reads them (so this checks PyTorch's plumbing and
    the rule; its kernel decodes through the model in tests/triton_interpreted.py)."""
    cfg, tm, jm = small_models
    settings = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=20, seed=4)]
    if framework == "torch":
        from blues_torch import decode_attention
        from blues_torch.attention import reference_attention

        def stand_in(q, k, v, index, start, softcap):
            keys = torch.arange(k.shape[1])
            mask = (keys <= index) & ((keys[None] >= start[:, None]) | (keys == index))  # [B, S]
            return reference_attention(q[:, None], k, v, softcap=softcap, mask=mask[:, None])[:, 0]

        want = [tgen.generate(tm, PROMPTS, 10, p, eot_id=0, stop_at_eot=False) for p in settings]
        calls = []
        monkeypatch.setattr(decode_attention, "applies", lambda q: q.shape[1] == 1)
        monkeypatch.setattr(decode_attention, "decode_attention", lambda *a: calls.append(1) or stand_in(*a))
        tgen._DECODERS.clear()
        got = [tgen.generate(tm, PROMPTS, 10, p, eot_id=0, stop_at_eot=False) for p in settings]
        tgen._DECODERS.clear()
        assert len(calls) == 2 * cfg.num_layers * 9  # two settings, every layer of the 9 one-token steps
    else:
        from blues_jax import decode_attention
        want = [jgen.generate(jm, PROMPTS, 10, p, eot_id=0, stop_at_eot=False) for p in settings]
        monkeypatch.setattr(decode_attention, "applies", lambda q: q.shape[1] == 1)
        monkeypatch.setattr(decode_attention, "decode_attention",
                            functools.partial(decode_attention.decode_attention, interpret=True))
        jgen._compiled.cache_clear()
        got = [jgen.generate(jm, PROMPTS, 10, p, eot_id=0, stop_at_eot=False) for p in settings]
        jgen._compiled.cache_clear()
    assert got == want

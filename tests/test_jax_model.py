"""blues_jax: the Flax NNX model against the design page (docs/architecture.md).

float32 on CPU with full-precision matmuls; the float64 numpy oracle (tests/oracle.py) is the
reference for whole-model parity. Tolerances: float32 has ~6e-8 relative rounding; a forward pass
of a few layers accumulates ~1e-6 on O(1) values, so 1e-5 (components) and 1e-4 (logits against
the float64 oracle, the acceptance bar) leave room without hiding a real bug, which shows as O(1e-2+).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from blues.config import BluesConfig
from blues.layout import canonical_layout
from blues_jax import BluesModel, gated_gelu
from blues_jax.attention import apply_rope, attention, reference_attention, rope_cos_sin
from blues_jax.experts import block_buckets, capacity_keep, expert_mlp, route
from blues_jax.grouped_matmul import grouped_matmul
from blues_jax.loss import chunked_lm_loss, cross_entropy, lm_head_logits
from oracle import oracle_forward, random_canonical
from parity.convert import from_canonical

jax.config.update("jax_default_matmul_precision", "highest")

SMALL = dict(vocab_size=300, max_position_embeddings=16, num_layers=2, hidden_size=32, head_dim=8,
             num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
             embedding_multiplier_scale=2)


def small_config(**overrides) -> BluesConfig:
    return BluesConfig(**(SMALL | overrides))


# Most model tests share this config and input shape, so `_forward` (nnx.jit, cached per graph
# and shapes) compiles each (mode, targets?) variant once for the whole file.
BASE = small_config(num_layers=1, router_noise_std=0.0)


def _walk(model, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


@nnx.jit
def _forward(model, input_ids, targets):
    return model(input_ids, targets)


def _loss_fn(model, input_ids, targets):
    out = model(input_ids, targets)
    return out.loss, out


@nnx.jit
def _loss_and_grads(model, input_ids, targets):
    (loss, out), grads = nnx.value_and_grad(_loss_fn, has_aux=True)(model, input_ids, targets)
    return loss, out, grads


def _ids(cfg, b=2, t=11, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


def _randn(shape, seed, scale=1.0):
    # numpy data and numpy checks throughout: every eager jax op costs an XLA compile on CPU
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _dense_moe_reference(x, indices, weights, keep, w_in, w_out):
    """Every expert on every token (float64 numpy), then pick: the definition, no dispatch."""
    x, w_in, w_out = (np.asarray(a, np.float64) for a in (x, w_in, w_out))
    f = w_out.shape[1]
    hidden = np.einsum("nd,edf->enf", x, w_in)  # [E, N, 2F]
    act = 0.5 * hidden[..., f:] * (1 + np.vectorize(math.erf)(hidden[..., f:] / math.sqrt(2))) * hidden[..., :f]
    all_out = np.einsum("enf,efd->end", act, w_out)  # [E, N, d]
    idx, w = np.asarray(indices), np.asarray(weights, np.float64) * np.asarray(keep)
    n = x.shape[0]
    return sum(w[:, j, None] * all_out[idx[:, j], np.arange(n)] for j in range(idx.shape[1]))


# ---- attention and RoPE ----------------------------------------------------------------------------

def test_causality():
    cfg = BASE
    model = BluesModel(cfg, rngs=nnx.Rngs(0))
    model.eval()
    ids = _ids(cfg)
    changed = ids.copy()
    changed[:, 7] = (ids[:, 7] + 1) % cfg.vocab_size
    a, b = np.asarray(_forward(model, ids, None).logits), np.asarray(_forward(model, changed, None).logits)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])  # the past never sees the future
    assert np.abs(a[:, 7:] - b[:, 7:]).max() > 1e-3  # and the change does propagate forward


def _naive_attention(q, k, v, softcap=None):
    """Per head, float64, KV heads repeated explicitly: the textbook loop."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    out = np.zeros_like(q)
    for head in range(h):
        s = np.einsum("btd,bsd->bts", q[:, :, head], k[:, :, head // group]) / math.sqrt(dh)
        if softcap is not None:
            s = softcap * np.tanh(s / softcap)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, head] = np.einsum("bts,bsd->btd", p / p.sum(-1, keepdims=True), v[:, :, head // group])
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_naive(kv_heads):
    q, k, v = _randn((2, 9, 4, 8), 1), _randn((2, 9, kv_heads, 8), 2), _randn((2, 9, kv_heads, 8), 3)
    want = _naive_attention(q, k, v)
    for impl in ("reference", "xla", "auto"):
        got = jax.jit(functools.partial(attention, softcap=None, impl=impl))(q, k, v)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=impl)
    got = jax.jit(functools.partial(reference_attention, softcap=2.0))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), _naive_attention(q, k, v, softcap=2.0), atol=1e-5)


def test_attention_decode_step_is_bottom_right_aligned():
    # The last query against all keys (a KV-cache decode step) equals the last row of the full pass.
    q, k, v = (_randn((1, 6, 2, 8), seed) for seed in (4, 5, 6))
    full = jax.jit(functools.partial(attention, softcap=None, impl="xla"))(q, k, v)
    for impl in ("reference", "xla"):
        step = jax.jit(functools.partial(attention, softcap=None, impl=impl))(q[:, -1:], k, v)
        np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, -1]), atol=1e-5, err_msg=impl)


def test_rope_formula():
    dh, theta = 8, 10000.0
    x = _randn((1, 5, 2, dh), 7)
    pos = np.arange(5)

    @jax.jit
    def rope(x, pos):
        cos, sin = rope_cos_sin(pos, dh, theta)
        return apply_rope(x, cos, sin), cos

    got, cos = (np.asarray(a) for a in rope(x, pos))
    want = np.empty_like(x, dtype=np.float64)
    half = dh // 2
    for t in pos:
        for i in range(half):  # dimension i pairs with i + Dh/2, angle t * theta^(-2i/Dh)
            a = t * theta ** (-2 * i / dh)
            xi, xj = x[0, t, :, i], x[0, t, :, i + half]
            want[0, t, :, i] = xi * math.cos(a) - xj * math.sin(a)
            want[0, t, :, i + half] = xj * math.cos(a) + xi * math.sin(a)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert cos.dtype == np.float32 and cos.shape == (5, dh)


def test_rope_relative_position():
    dh = 16
    q, k = _randn((1, 1, 1, dh), 8), _randn((1, 1, 1, dh), 9)

    @jax.jit
    def rotated_dot(m, n):
        cq, sq = rope_cos_sin(m, dh, 10000.0)
        ck, sk = rope_cos_sin(n, dh, 10000.0)
        return jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk))

    def score(m, n):
        return float(rotated_dot(np.asarray([m]), np.asarray([n])))

    # q.k after rotation depends on m - n only (angles up to ~40 rad: float32 sin/cos error ~1e-6)
    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


# ---- experts -----------------------------------------------------------------------------------------

def test_topk_ties_to_lower_index():
    # One-hot tokens read router rows directly: logits [1, 3, 3, 0, 3] and all-equal rows.
    router = np.asarray([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0] * 5], np.float32)  # [d=2, E=5]
    x = np.asarray([[1.0, 0.0], [0.0, 1.0]], np.float32)  # [N=2, d]
    r = jax.jit(functools.partial(route, k=3, noise_std=0.0, normalize=False, noise_key=None, training=False))(x, router)
    np.testing.assert_array_equal(np.asarray(r.indices), [[1, 2, 4], [0, 1, 2]])
    # and jax.lax.top_k itself, on exactly equal values
    top = jax.jit(lambda a: jax.lax.top_k(a, 4)[1])(np.zeros((1, 6), np.float32))
    np.testing.assert_array_equal(np.asarray(top), [[0, 1, 2, 3]])


def test_capacity_priority_rule():
    # All first choices in token order, then all second choices; capacity 2 per expert.
    indices = np.asarray([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0]], np.int32)
    keep = jax.jit(capacity_keep, static_argnums=(1, 2))(indices, 3, 2)
    want = [[True, True], [True, True], [False, False], [True, False], [True, False]]
    np.testing.assert_array_equal(np.asarray(keep), want)

    # Random routing against the rule written as a loop.
    rng = np.random.default_rng(0)
    idx = np.stack([rng.permutation(5)[:3] for _ in range(40)])  # [N=40, k=3], E=5, distinct per token
    keep = np.asarray(jax.jit(capacity_keep, static_argnums=(1, 2))(idx.astype(np.int32), 5, 17))
    load, want = np.zeros(5, int), np.zeros_like(keep)
    for j in range(3):
        for n in range(40):
            want[n, j] = load[idx[n, j]] < 17
            load[idx[n, j]] += 1
    np.testing.assert_array_equal(keep, want)


def test_grouped_matmul_and_its_backward():
    """grouped_matmul's hand-written backward (input and weight gradients by the grouped kernels,
    float32 weights cast inside) against float64 numpy, with an empty group."""
    sizes = np.asarray([3, 0, 5, 2], np.int32)  # M = 10
    lhs, rhs, cot = _randn((10, 6), 30), _randn((4, 6, 7), 31), _randn((10, 7), 32)
    starts = np.concatenate([[0], np.cumsum(sizes)])

    @jax.jit
    def run(lhs, rhs):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, impl="ragged_dot"), lhs, rhs)
        return (out, *vjp(cot))

    out, d_lhs, d_rhs = run(lhs, rhs)
    want_out, want_lhs, want_rhs = np.zeros((10, 7)), np.zeros((10, 6)), np.zeros((4, 6, 7))
    for g in range(4):
        rows = slice(starts[g], starts[g + 1])
        want_out[rows] = lhs[rows].astype(np.float64) @ rhs[g]
        want_lhs[rows] = cot[rows].astype(np.float64) @ rhs[g].T
        want_rhs[g] = lhs[rows].T.astype(np.float64) @ cot[rows]
    for got, want in ((out, want_out), (d_lhs, want_lhs), (d_rhs, want_rhs)):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("gemm", ["blocks", "ragged_dot"])
@pytest.mark.parametrize("capacity", [None, 5])
def test_expert_mlp_matches_dense(capacity, gemm):
    """Values against float64 numpy, gradients (custom gather VJPs) against autodiff of a dense form,
    for both forms of the expert compute (blocks; sorted, here with the reference grouped GEMM)."""
    n, d, f, e, k = 24, 8, 6, 4, 2
    x, w_in, w_out = _randn((n, d), 10), _randn((e, d, 2 * f), 11, d ** -0.5), _randn((e, f, d), 12, f ** -0.5)
    indices = np.stack([np.random.default_rng(13 + i).permutation(e)[:k] for i in range(n)]).astype(np.int32)
    weights = np.random.default_rng(14).uniform(0.1, 1.0, (n, k)).astype(np.float32)

    cotangent = _randn((n, d), 21)

    def dense(x, weights, w_in, w_out, keep):
        # every expert on every token, then pick: plain autodiff gives the reference gradients
        hidden = jnp.einsum("nd,edf->enf", x, w_in)  # [E, N, 2F]
        act = jax.nn.gelu(hidden[..., f:], approximate=False) * hidden[..., :f]
        all_out = jnp.einsum("enf,efd->ned", act, w_out)  # [N, E, d]
        picked = jnp.take_along_axis(all_out, indices[..., None], axis=1)  # [N, k, d]
        return jnp.einsum("nkd,nk->nd", picked, weights * keep)

    @jax.jit
    def run(x, weights, w_in, w_out):
        keep = None if capacity is None else capacity_keep(indices, e, capacity)
        mask = jnp.ones((n, k)) if keep is None else keep.astype(jnp.float32)

        def ours(*args):
            return jnp.sum(expert_mlp(args[0], indices, args[1], keep, args[2], args[3], capacity=capacity,
                                      gemm=gemm) * cotangent)

        def theirs(*args):
            return jnp.sum(dense(*args, mask) * cotangent)

        y = expert_mlp(x, indices, weights, keep, w_in, w_out, capacity=capacity, gemm=gemm)
        grads = jax.grad(ours, argnums=(0, 1, 2, 3))(x, weights, w_in, w_out)
        want_grads = jax.grad(theirs, argnums=(0, 1, 2, 3))(x, weights, w_in, w_out)
        return y, mask, grads, want_grads

    got, keep, grads, want_grads = run(x, weights, w_in, w_out)
    if capacity is not None:
        assert not np.all(np.asarray(keep))  # the capacity really binds
    np.testing.assert_allclose(np.asarray(got), _dense_moe_reference(x, indices, weights, keep, w_in, w_out), atol=1e-5)
    for name, g, w in zip(("x", "weights", "w_in", "w_out"), grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_gated_gelu_kernels_match_autodiff(dtype):
    """The Pallas kernels of the sorted experts' activation (run by Pallas's interpreter here; the
    GPU test runs them compiled) against the definition and its autodiff gradient. Rows 40 and F
    96 make blocks of 8 x 32: a 5 x 3 grid whose column blocks of value and gate sit F apart.
    float32: the same formula but for erf (the kernels' own approximation, 4.2e-7 from math.erf;
    the definition's, 3.0e-7), whose error reaches the outputs times at most |gate * value| / 2
    (< 18 here): atol 2e-5. bf16: both round one float32 result once, so they differ by at most one bf16 unit
    (2^-7 of the value at most: 8 significant bits) where the float32 results straddle a rounding
    boundary."""
    m, f = 40, 96
    assert gated_gelu._blocks(m, f, gated_gelu.FORWARD_LAUNCH.block_elements) == (8, 32)
    assert gated_gelu._blocks(m, f, gated_gelu.BACKWARD_LAUNCH.block_elements) == (8, 32)
    hidden = jnp.asarray(_randn((m, 2 * f), 30, 2.0), dtype)
    d_act = jnp.asarray(_randn((m, f), 31), dtype)
    want_act, want_vjp = jax.vjp(lambda h: gated_gelu.gated_gelu(h, f).astype(dtype), hidden)
    (want_d_hidden,) = want_vjp(d_act)
    act = gated_gelu.forward(hidden, f, fused=True, interpret=True)
    act_again, d_hidden = gated_gelu.backward(hidden, d_act, fused=True, interpret=True)
    assert act.dtype == d_hidden.dtype == dtype and d_hidden.shape == (m, 2 * f)
    np.testing.assert_array_equal(np.asarray(act_again, np.float32), np.asarray(act, np.float32))
    tol = dict(rtol=1e-6, atol=2e-5) if dtype == jnp.float32 else dict(rtol=2 ** -7, atol=2e-5)
    for got, want in ((act, want_act), (d_hidden, want_d_hidden)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def test_dropless_bucket_overflow():
    # Every token picks experts 0 and 1: loads of N overflow the small blocks (1.25x and 2x the mean).
    n, d, f, e, k = 40, 8, 6, 8, 2
    buckets = block_buckets(n, k, e, None, sharded=False)
    assert len(buckets) == 3 and buckets[1] < n <= buckets[-1]
    x, w_in, w_out = _randn((n, d), 15), _randn((e, d, 2 * f), 16, d ** -0.5), _randn((e, f, d), 17, f ** -0.5)
    indices = np.tile(np.asarray([[0, 1]], np.int32), (n, 1))
    weights = np.full((n, k), 0.5, np.float32)
    run = jax.jit(functools.partial(expert_mlp, keep=None))
    got = run(x, indices, weights, w_in=w_in, w_out=w_out)
    want = _dense_moe_reference(x, indices, weights, np.ones((n, k)), w_in, w_out)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # and a balanced load (the smallest bucket) through the same jitted function
    indices = np.stack([np.roll(np.arange(e), i)[:k] for i in range(n)]).astype(np.int32)
    got = run(x, indices, weights, w_in=w_in, w_out=w_out)
    np.testing.assert_allclose(np.asarray(got), _dense_moe_reference(x, indices, weights, np.ones((n, k)), w_in, w_out),
                               atol=1e-5)


@pytest.mark.parametrize("capacity", [None, 8])
def test_decode_sized_experts_on_a_gpu_run_densely(monkeypatch, capacity):
    """On one GPU, up to SMALL_BLOCK_ROWS assignments run every expert on every token (as
    blues_torch does): no scatter into blocks, no switch; the same function, refused assignments
    (capacity mode) included. Larger inputs keep the blocks form."""
    from blues_jax import experts

    monkeypatch.setattr(experts, "_on_gpu", lambda: True)
    n, d, f, e, k = 48, 8, 6, 4, 2
    x, w_in, w_out = _randn((n, d), 25), _randn((e, d, 2 * f), 26, d ** -0.5), _randn((e, f, d), 27, f ** -0.5)
    rng = np.random.default_rng(4)
    indices = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (n, k)).astype(np.float32)
    keep = None if capacity is None else capacity_keep(jnp.asarray(indices), e, capacity)
    assert keep is None or not bool(jnp.all(keep))  # some assignments refused
    run = jax.jit(functools.partial(expert_mlp, capacity=capacity))
    hlo = run.lower(x, indices, weights, keep, w_in, w_out).as_text()
    assert "scatter" not in hlo and "stablehlo.case" not in hlo
    want = _dense_moe_reference(x, indices, weights, np.ones((n, k)) if keep is None else np.asarray(keep),
                                w_in, w_out)
    np.testing.assert_allclose(np.asarray(run(x, indices, weights, keep, w_in, w_out)), want, atol=1e-5)
    big = experts.SMALL_BLOCK_ROWS // k + 8
    xb, ib = _randn((big, d), 28), np.tile(indices, (big // n + 1, 1))[:big]
    assert "scatter" in jax.jit(expert_mlp).lower(xb, ib, np.ones((big, k), np.float32), None, w_in, w_out).as_text()


def test_dropless_equals_nonbinding_capacity():
    base = BASE
    # c = E / k makes C = N: no expert can be refused anything.
    roomy = dataclasses.replace(BASE, capacity_factor=base.tot_num_experts / base.chosen_num_experts)
    arrays = random_canonical(base, 0)
    ids = _ids(base)
    outs = []
    for cfg in (base, roomy):
        model = from_canonical(arrays, cfg, "jax")
        model.eval()
        outs.append(_forward(model, ids, ids))
    np.testing.assert_allclose(np.asarray(outs[0].logits), np.asarray(outs[1].logits), atol=1e-6)
    assert int(np.asarray(outs[1].dropped).sum()) == 0
    assert float(outs[0].loss) == pytest.approx(float(outs[1].loss), rel=1e-6)


# ---- loss --------------------------------------------------------------------------------------------

def test_chunked_loss_matches_plain():
    b, t, d, v = 2, 13, 16, 200
    vp = 256
    h = _randn((b, t, d), 18)
    embed = _randn((vp, d), 19, 0.25)
    embed[v:] = 0.0
    targets = np.random.default_rng(20).integers(0, v, (b, t)).astype(np.int32)
    targets[0, :4] = -100

    def plain(h, embed, targets):
        return cross_entropy(lm_head_logits(h, embed, v), targets)

    def chunked(h, embed, targets, chunk):
        return chunked_lm_loss(h, embed, targets, v, chunk)

    want, want_grads = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(h, embed, targets)
    for chunk in (5, 1000):  # several chunks with a ragged tail; one chunk
        got, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)), static_argnums=3)(h, embed, targets, chunk)
        assert float(got) == pytest.approx(float(want), rel=1e-6), chunk
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, err_msg=f"chunk {chunk}")
        assert np.abs(np.asarray(grads[1])[v:]).max() == 0.0  # padding rows get exactly no gradient
    # The fused forward stores gradients for d(out)/d(loss) = 1; the backward must scale them.
    scaled = jax.jit(jax.grad(lambda h, e: -2.5 * chunked(h, e, targets, 5), argnums=(0, 1)))(h, embed)
    for g, w in zip(scaled, want_grads):
        np.testing.assert_allclose(np.asarray(g), -2.5 * np.asarray(w), atol=3e-6)
    # Not differentiated: the primal alone, same loss; [N, d] input as well as [B, T, d].
    assert float(jax.jit(chunked, static_argnums=3)(h, embed, targets, 5)) == pytest.approx(float(want), rel=1e-6)
    flat = chunked_lm_loss(h.reshape(b * t, d), embed, targets.reshape(-1), v, 7)
    assert float(flat) == pytest.approx(float(want), rel=1e-6)
    # no valid target: loss 0 and zero gradients (not NaN)
    none = np.full((b, t), -100, np.int32)
    loss, grads = jax.jit(jax.value_and_grad(chunked), static_argnums=3)(h, embed, none, 8)
    assert float(loss) == 0.0 and np.abs(np.asarray(grads)).max() == 0.0
    assert float(jax.jit(plain)(h, embed, none)) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("v, launch", [(977, (256, 1, 4)), (977, (128, 3, 4)), (300, (128, 3, 4))])
def test_softmax_xent_kernel_matches_reference(dtype, v, launch):
    """The Pallas loss kernels (Pallas's interpreter here; tests/test_gpu.py runs them compiled)
    against XLA's form. Vp 1000 in pieces of 256 or 128 ends in a partial piece (its load past Vp
    masked); split 3 ways (3 pieces each) the last split also holds a piece wholly past Vp, and with
    V 300 the middle split holds no real column at all (its max stays -inf). Columns V..Vp-1 must
    stay out of the softmax and get a zero gradient; a zero scale is an ignored row; targets sit on
    the first, a piece-boundary and the last real column.
    nll: an online (rescaled running) sum against max-then-sum, float32 rounding of a ~7 logsumexp:
    atol 4e-6. grad: the kernels take e^x as 2^(x log2 e), whose float32 exponent carries a rounding
    of 2^-24 of |x log2 e| (< 40 here: 2.4e-6 relative in the result), against XLA's e^x: rtol 4e-6
    for float32 logits; bf16 rounds either result once (2^-7)."""
    from blues_jax import xent_kernel
    r, vp = 12, 1000
    logits = jnp.asarray(_randn((r, vp), 40, 3.0), dtype)
    targets = np.random.default_rng(41).integers(0, v, r).astype(np.int32)
    targets[:3] = (0, 256, v - 1)
    scale = np.where(np.arange(r) % 5 == 0, 0.0, 0.25).astype(np.float32)
    want_nll, want_grad = xent_kernel.softmax_xent(logits, targets, scale, v, fused=False)
    nll, grad = xent_kernel.softmax_xent(logits, targets, scale, v, fused=True, interpret=True,
                                         launch=xent_kernel.Launch(*launch))
    assert grad.dtype == dtype and grad.shape == (r, vp) and nll.shape == (r,)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(want_nll), rtol=0, atol=4e-6)
    tol = dict(rtol=4e-6, atol=1e-9) if dtype == jnp.float32 else dict(rtol=2 ** -7, atol=1e-9)
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad, np.float32), **tol)
    assert np.abs(np.asarray(grad, np.float32)[:, v:]).max() == 0.0
    assert np.abs(np.asarray(grad, np.float32)[scale == 0]).max() == 0.0


def test_chunked_loss_with_the_kernel_matches_plain(monkeypatch):
    """chunked_lm_loss(fused=True) (the kernel in Pallas's interpreter) against the plain loss, bf16
    logits as in training: the loss and both gradients, a ragged last chunk and ignored targets."""
    import blues_jax.loss as loss_module
    from blues_jax import xent_kernel
    monkeypatch.setattr(loss_module, "softmax_xent", functools.partial(xent_kernel.softmax_xent, interpret=True))
    b, t, d, v, vp = 2, 13, 16, 200, 256
    h = jnp.asarray(_randn((b, t, d), 42), jnp.bfloat16)
    embed = _randn((vp, d), 43, 0.25)
    embed[v:] = 0.0
    targets = np.random.default_rng(44).integers(0, v, (b, t)).astype(np.int32)
    targets[1, 5:9] = -100

    def loss(h, embed, fused):
        return chunked_lm_loss(h, embed, targets, v, 10, fused=fused)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    want, want_grads = grad_fn(h, embed, False)
    got, grads = grad_fn(h, embed, True)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    # Both round the same float32 gradient of each logit to bf16 before the two GEMMs: a logit whose
    # float32 values straddle a rounding boundary differs by one bf16 unit, seen through the GEMMs.
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=2 ** -7, atol=1e-5)
    assert np.abs(np.asarray(grads[1])[v:]).max() == 0.0


# ---- the model ---------------------------------------------------------------------------------------

def test_parameter_count():
    cfg = small_config(vocab_size=250)
    model = BluesModel(cfg, rngs=nnx.Rngs(0))
    for spec in canonical_layout(cfg):
        param = _walk(model, spec.path)
        assert isinstance(param, nnx.Param), spec.path
        assert param.get_value().shape == spec.module_shape, spec.path
    total = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    padding = (cfg.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size
    assert total - padding == cfg.num_parameters()
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert ("layers", 1, "moe", "w_in") in paths and ("embed",) in paths


# Each case combines features so the set stays small (one XLA compile each): every non-default
# switch of the design page appears at least once, GQA/MQA/MHA each once.
ORACLE_CASES = {
    "gqa-capacity-drops": dict(capacity_factor=1.0),
    "softcap-no-post-norms": dict(attn_logit_softcap=3.0, use_post_norms=False),
    "mqa-normalized-k3": dict(num_key_value_heads=1, normalize_router_weights=True, chosen_num_experts=3,
                              tot_num_experts=5),
    "mha-k1": dict(num_key_value_heads=4, chosen_num_experts=1),
    "odd-sizes": dict(vocab_size=257, hidden_size=24, head_dim=6, num_attention_heads=3, num_key_value_heads=1,
                      tot_num_experts=3, chosen_num_experts=2, embedding_multiplier_scale=3,
                      capacity_factor=0.75, num_layers=3),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_matches_float64_oracle(case):
    cfg = small_config(**ORACLE_CASES[case])
    arrays = random_canonical(cfg, seed=1)
    model = from_canonical(arrays, cfg, "jax")
    model.eval()
    ids = _ids(cfg, b=2, t=11, seed=2)
    targets = np.array(_ids(cfg, b=2, t=11, seed=3))
    targets[1, 5:] = -100
    out = _forward(model, ids, targets)
    want = oracle_forward(arrays, cfg, ids, targets)
    assert out.logits.shape == want["logits"].shape
    np.testing.assert_allclose(np.asarray(out.logits), want["logits"], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.expert_indices), want["expert_indices"])
    np.testing.assert_allclose(np.asarray(out.router_probs), want["router_probs"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dropped), want["dropped"])
    for name in ("lm_loss", "aux_loss", "z_loss", "loss"):
        assert float(getattr(out, name)) == pytest.approx(want[name], rel=1e-5), name
    if cfg.capacity_factor is not None:
        assert int(np.asarray(out.dropped).sum()) > 0  # the case exercises the rule


def test_padding_rows_stay_zero_and_masked():
    cfg = BASE  # V = 300, Vp = 384
    v = cfg.vocab_size
    model = BluesModel(cfg, rngs=nnx.Rngs(0))
    assert model.embed.get_value().shape == (384, cfg.hidden_size)
    assert np.abs(np.asarray(model.embed.get_value())[v:]).max() == 0.0
    ids = _ids(cfg)
    _, out, grads = _loss_and_grads(model, ids, ids)  # training: the chunked loss
    assert out.logits is None  # training with targets never materialises the logits
    assert np.abs(np.asarray(grads["embed"].get_value())[v:]).max() == 0.0
    model.eval()
    before = _forward(model, ids, ids)
    garbage = np.asarray(model.embed.get_value()).copy()
    garbage[v:] = 5.0  # garbage in the padding rows
    model.embed.set_value(jnp.asarray(garbage))
    after = _forward(model, ids, ids)
    assert before.logits.shape == (2, 11, v)
    np.testing.assert_array_equal(np.asarray(before.logits), np.asarray(after.logits))
    assert float(before.loss) == float(after.loss)


def test_train_eval_noise():
    cfg = dataclasses.replace(BASE, router_noise_std=1.0, dropout=0.5)
    model = BluesModel(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg)
    model.eval()
    e1, e2 = _forward(model, ids, None), _forward(model, ids, None)
    np.testing.assert_array_equal(np.asarray(e1.logits), np.asarray(e2.logits))  # eval: deterministic
    model.train()
    twin = nnx.clone(model)  # the noise and dropout streams are model state: a copy replays them
    t1, t2, t3 = _forward(model, ids, None), _forward(model, ids, None), _forward(twin, ids, None)
    assert np.abs(np.asarray(t1.router_probs) - np.asarray(e1.router_probs)).max() > 1e-3  # noise in training
    assert np.abs(np.asarray(t1.router_probs) - np.asarray(t2.router_probs)).max() > 1e-3  # fresh every step
    np.testing.assert_array_equal(np.asarray(t1.logits), np.asarray(t3.logits))

    # Dropout alone (router noise off through the model's flag, dropout layers still training).
    model.eval()
    model.set_attributes(nnx.Dropout, deterministic=False)
    d1 = _forward(model, ids, None)
    assert np.abs(np.asarray(d1.logits) - np.asarray(e1.logits)).max() > 1e-3

    # Without noise and dropout, training and eval compute the same function.
    quiet = BluesModel(BASE, rngs=nnx.Rngs(0))
    a = _forward(quiet, ids, None).logits
    quiet.eval()
    np.testing.assert_allclose(np.asarray(a), np.asarray(_forward(quiet, ids, None).logits), atol=1e-6)


def test_remat_same_grads():
    cfg = dataclasses.replace(BASE, router_noise_std=0.3, dropout=0.1, capacity_factor=1.0)
    ids = _ids(cfg)
    results = []
    for remat in (False, True):
        model = BluesModel(cfg, rngs=nnx.Rngs(0), remat=remat)  # same init, same noise/dropout streams
        results.append(_loss_and_grads(model, ids, ids))
    (l0, _, g0), (l1, _, g1) = results
    assert float(l0) == pytest.approx(float(l1), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_scanned_layers_are_the_unrolled_layers():
    """lax.scan over the stacked blocks computes what the Python loop over them does: the loss, every
    gradient, and the dropout streams each block carries on to the next call (a scan that did not
    write them back would replay the first call's masks)."""
    cfg = dataclasses.replace(BASE, num_layers=3, router_noise_std=0.3, dropout=0.1, capacity_factor=1.0)
    ids = _ids(cfg)
    runs = []
    for scan in (False, True):
        model = BluesModel(cfg, rngs=nnx.Rngs(0), scan_layers=scan)  # same init and streams
        first = _loss_and_grads(model, ids, ids)
        runs.append((first, _loss_and_grads(model, ids, ids), nnx.state(model, nnx.RngState)))
    (unrolled, unrolled_next, unrolled_rng), (scanned, scanned_next, scanned_rng) = runs
    for a, b in ((unrolled, scanned), (unrolled_next, scanned_next)):
        assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-6)
        np.testing.assert_array_equal(np.asarray(a[1].expert_indices), np.asarray(b[1].expert_indices))
        for ga, gb in zip(jax.tree.leaves(a[2]), jax.tree.leaves(b[2])):
            np.testing.assert_allclose(np.asarray(ga), np.asarray(gb), atol=1e-6)
    assert float(unrolled[0]) != float(unrolled_next[0])  # the streams moved: the second call differs
    for ra, rb in zip(jax.tree.leaves(unrolled_rng), jax.tree.leaves(scanned_rng)):
        if jnp.issubdtype(ra.dtype, jax.dtypes.prng_key):
            ra, rb = jax.random.key_data(ra), jax.random.key_data(rb)
        np.testing.assert_array_equal(np.asarray(ra), np.asarray(rb))


def test_unrolled_blocks_share_one_trace():
    """The unrolled forward traces one block, not L: each block is a nested jit call
    (blues_jax.model._block_call) whose jaxpr JAX caches by the arguments' shapes, so the forward's
    L calls hold one jaxpr and the backward's L calls another (and lowering reuses them); traced one
    by one, the blocks cost L times the tracing. Training mode, with dropout's key stream passed through."""
    cfg = dataclasses.replace(BASE, num_layers=3, router_noise_std=0.3, dropout=0.1)
    graph, params, rng = nnx.split(BluesModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)  # arrays, as the training step passes them
    ids = _ids(cfg)

    def loss(params, rng):
        return nnx.merge(graph, params, rng)(ids, ids).loss

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, rng).jaxpr
    calls = [e.params["jaxpr"] for e in jaxpr.eqns if e.params.get("name") == "_block_call"]
    assert len(calls) == 2 * cfg.num_layers  # forward and backward
    assert len({id(j) for j in calls}) == 2


def test_bf16_runs():
    cfg = BASE
    ids = _ids(cfg)
    f32 = BluesModel(cfg, rngs=nnx.Rngs(0))
    bf16 = BluesModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    for model in (f32, bf16):
        model.eval()
    loss, out, grads = _loss_and_grads(bf16, ids, ids)
    assert bf16.embed.get_value().dtype == jnp.float32  # parameters stay float32
    assert out.logits.dtype == jnp.float32  # logits and losses are float32
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # bf16 keeps ~3 significant digits; a loss of ~ln(300) ~ 5.7 agrees to ~1e-2.
    assert float(loss) == pytest.approx(float(_forward(f32, ids, ids).loss), abs=5e-2)

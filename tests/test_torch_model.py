"""blues_torch: the model against its definition (CPU, float32, small configs).

The acceptance test is test_matches_float64_oracle: an independent float64 numpy implementation of
the design page (tests/oracle.py) loaded with the same canonical tensors. The other tests pin down
one property each, with hand-computable expectations where possible.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from blues.config import BluesConfig
from blues.errors import BluesError, ConfigError
from blues.layout import canonical_layout
from blues_torch import BluesModel
from blues_torch import attention as attn_mod
from blues_torch.attention import apply_rope, attention, reference_attention, resolve_attn_impl, rope_cos_sin
from blues_torch.experts import capacity_keep, expert_mlp, route
from blues_torch.loss import chunked_lm_loss, cross_entropy, lm_head_logits
from parity.convert import from_canonical
from oracle import oracle_forward, random_canonical

torch.set_num_threads(1)  # two cores shared with other test runs; these shapes gain nothing from more


def small_config(**overrides) -> BluesConfig:
    base = dict(vocab_size=300, max_position_embeddings=32, num_layers=2, hidden_size=32, head_dim=8,
                num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                embedding_multiplier_scale=2)
    return BluesConfig(**(base | overrides))


def random_ids(config: BluesConfig, b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, config.vocab_size, (b, t)))


# ---- attention ------------------------------------------------------------------------------------

def naive_attention(q, k, v, softcap=None):
    """One head at a time in float64, K/V heads repeated explicitly: a second reading of the page."""
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    out = torch.zeros(b, t, h, dh, dtype=torch.float64)
    mask = torch.ones(t, t).tril().bool()
    for head in range(h):
        s = q[:, :, head].double() @ k[:, :, head // group].double().transpose(1, 2) / math.sqrt(dh)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~mask, float("-inf"))
        out[:, :, head] = s.softmax(-1) @ v[:, :, head // group].double()
    return out


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_attention_matches_naive(heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, heads, 8, generator=g)
    k = torch.randn(2, 7, kv_heads, 8, generator=g)
    v = torch.randn(2, 7, kv_heads, 8, generator=g)
    expected = naive_attention(q, k, v)
    # float32 vs float64 on O(1) values: 1e-5 is ~100 float32 ulps, far below any real bug.
    for impl in ("reference", "sdpa"):
        got = attention(q, k, v, softcap=None, impl=impl)
        assert got.shape == (2, 7, heads, 8)
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference_attention(q, k, v, softcap=2.0).double(),
                               naive_attention(q, k, v, softcap=2.0), atol=1e-5, rtol=1e-5)


def test_softcap_with_sdpa_falls_back_visibly(caplog):
    attn_mod._RESOLVED.clear()  # the choice is logged once per process and key
    with caplog.at_level(logging.WARNING, logger="blues"):
        assert resolve_attn_impl("sdpa", "cpu", torch.float32, 5.0) == "reference"
    assert any("softcap" in r.message for r in caplog.records)
    n_records = len(caplog.records)
    with caplog.at_level(logging.INFO, logger="blues"):
        resolve_attn_impl("sdpa", "cpu", torch.float32, 5.0)  # decided already: no second log line
    assert len(caplog.records) == n_records
    assert resolve_attn_impl("auto", "cpu", torch.float32, None) == "sdpa"
    with pytest.raises(ConfigError, match="attn_impl"):
        resolve_attn_impl("flash", "cpu", torch.float32, None)
    with pytest.raises(ConfigError, match="attn_impl"):
        BluesModel(small_config(), attn_impl="flash")


def test_attention_choice_made_inside_torch_compile_keeps_one_graph(caplog):
    """The first call of a compiled model chooses the backend while dynamo traces it: a log line there
    is a graph break, and one inside the loop over layers sent the whole forward back to eager."""
    attn_mod._RESOLVED.clear()
    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)

    def rope_attention(q, k, v):
        cos, sin = rope_cos_sin(torch.arange(5), 8, 10000.0)
        return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, softcap=None)

    torch._dynamo.reset()
    compiled = torch.compile(rope_attention, fullgraph=True, backend="eager")  # fullgraph: a break raises
    got = compiled(q, k, v)
    assert not attn_mod._RESOLVED  # chosen, not recorded, while tracing
    with caplog.at_level(logging.INFO, logger="blues"):
        torch.testing.assert_close(got, rope_attention(q, k, v))  # the first eager call records and logs it
    assert any("attention backend: sdpa" in r.message for r in caplog.records)


def test_evaluation_does_not_recompile_the_compiled_blocks():
    """--compile's blocks choose the attention backend while traced, and the first evaluation (eager)
    records the choice. A compiled block guarded on that record would recompile after every run's
    first evaluation: the second training forward here must run from the cache."""
    import torch._dynamo

    config = small_config(num_layers=2)
    attn_mod._RESOLVED.clear()
    model = BluesModel(config).train()
    ids, targets = random_ids(config, 2, 10), random_ids(config, 2, 10, seed=1)
    torch._dynamo.reset()
    model.compile_blocks(backend="eager")
    first = model(ids, targets, generator=torch.Generator().manual_seed(7)).loss
    assert not attn_mod._RESOLVED  # chosen inside the trace only
    with torch.no_grad():
        model.eval()(ids, targets)  # the evaluation: eager, records the choice
    assert attn_mod._RESOLVED
    model.train()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model(ids, targets, generator=torch.Generator().manual_seed(7)).loss
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_sample_logits_come_from_one_padded_shape():
    """The trainers' sample continuations run every forward at [rows, window] (ids left-aligned,
    zero-padded; blues_jax's NextLogits does the same), so an eager GPU forward meets each kernel's
    per-shape set-up once, not once per token; each row's logits are its unpadded forward's last ones."""
    import contextlib
    import types

    from blues_torch.training import make_next_logits

    config = small_config(num_layers=2)
    torch.manual_seed(0)
    model = BluesModel(config).train()
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    dist = types.SimpleNamespace(device=torch.device("cpu"), world_size=1)
    next_logits = make_next_logits(model, dist, contextlib.nullcontext, window=16)
    ids = random_ids(config, 2, 16).numpy()
    for lengths in ((1, 7), (16, 3)):
        got = next_logits([ids[i, :t] for i, t in enumerate(lengths)])  # [2, V]
        assert model.training  # left as it was
        with torch.no_grad():
            want = [model.eval()(torch.from_numpy(ids[i:i + 1, :t])).logits[0, -1].numpy()
                    for i, t in enumerate(lengths)]
        model.train()
        np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
    assert set(shapes[0::3]) == {(2, 16)}  # every sample forward (the others are the references)


def test_rope_formula():
    dh, theta = 8, 500.0
    positions = torch.tensor([0, 1, 5, 31])
    x = torch.randn(1, 4, 3, dh, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_cos_sin(positions, dh, theta)
    assert cos.dtype == torch.float32 and cos.shape == (4, dh)
    got = apply_rope(x, cos, sin).double()
    # Element by element: dimension i pairs with i + Dh/2, angle = p * theta^(-2i/Dh).
    expected = torch.empty_like(got)
    half = dh // 2
    for ti, p in enumerate(positions.tolist()):
        for i in range(half):
            a = p * theta ** (-2 * i / dh)
            x1, x2 = x[0, ti, :, i].double(), x[0, ti, :, i + half].double()
            expected[0, ti, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            expected[0, ti, :, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # float32 angles up to 31 rad


def test_rope_relative_position():
    dh = 16
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 1, dh, generator=g), torch.randn(1, 1, 1, dh, generator=g)

    def score(m, n):
        cm, sm = rope_cos_sin(torch.tensor([m]), dh, 10000.0)
        cn, sn = rope_cos_sin(torch.tensor([n]), dh, 10000.0)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum().item()

    # q.k after rotation depends only on m - n.
    for offset in (0, 1, 7):
        assert score(3 + offset, 3) == pytest.approx(score(20 + offset, 20), abs=1e-5)
    assert score(5, 3) != pytest.approx(score(9, 3), abs=1e-3)  # and it does depend on m - n


# ---- whole model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(num_key_value_heads=1, attn_logit_softcap=3.0)],
                         ids=["gqa", "mqa_softcap"])
def test_causality(overrides):
    # Dropless only: in capacity mode a later token's first choice outranks an earlier token's
    # second choice, so capacity can make the forward non-causal by design.
    config = small_config(**overrides)
    torch.manual_seed(0)
    model = BluesModel(config).eval()
    ids = random_ids(config, 2, 12)
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 1) % config.vocab_size
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :7], b[:, :7])  # earlier positions: bit-identical
    assert torch.equal(a[1], b[1])  # the other sequence of the batch: untouched
    assert not torch.allclose(a[0, 7:], b[0, 7:])


def test_parameter_count():
    for config in (BluesConfig(), small_config(), small_config(use_post_norms=False, vocab_size=129),
                   small_config(num_key_value_heads=4, tot_num_experts=3, chosen_num_experts=3, num_layers=1)):
        model = BluesModel(config)
        params = dict(model.named_parameters())
        layout = canonical_layout(config)
        assert set(params) == {spec.path for spec in layout}
        for spec in layout:
            assert tuple(model.get_parameter(spec.path).shape) == spec.module_shape
        padding = (config.padded_vocab_size - config.vocab_size) * config.hidden_size
        assert sum(p.numel() for p in params.values()) - padding == config.num_parameters()
        del model, params


ORACLE_CONFIGS = {
    # capacity that really drops, top-2 of 4, softcap, GQA
    "gqa_capacity_softcap": dict(capacity_factor=0.5, attn_logit_softcap=5.0),
    # MQA without post norms, top-1 with binding capacity
    "mqa_prenorm_capacity": dict(num_key_value_heads=1, use_post_norms=False, chosen_num_experts=1,
                                 capacity_factor=0.75),
    # MHA, renormalised top-3 of 5 experts
    "mha_normalized": dict(num_key_value_heads=4, tot_num_experts=5, chosen_num_experts=3,
                           normalize_router_weights=True),
    # odd sizes everywhere: vocab 131 (padded to 256), d 20, 3 heads of 10, F 60, 3 layers
    "odd_sizes": dict(vocab_size=131, hidden_size=20, head_dim=10, num_attention_heads=3,
                      num_key_value_heads=1, embedding_multiplier_scale=3, tot_num_experts=3,
                      num_layers=3, capacity_factor=1.25, rope_theta=500.0, rms_norm_eps=1e-3),
    # the preset defaults' shape family (k=1, post norms) at a small size, reference backend
    "k1_postnorm_reference": dict(chosen_num_experts=1, attn_impl="reference"),
}


@pytest.mark.parametrize("name", list(ORACLE_CONFIGS))
def test_matches_float64_oracle(name):
    overrides = dict(ORACLE_CONFIGS[name])
    attn_impl = overrides.pop("attn_impl", "auto")
    config = small_config(**overrides)
    arrays = random_canonical(config, seed=3)
    model = from_canonical(arrays, config, "torch", attn_impl=attn_impl).eval()
    ids = random_ids(config, 2, 13, seed=4)
    targets = random_ids(config, 2, 13, seed=5)
    targets[0, :3] = -100  # ignored targets must not count
    with torch.no_grad():
        out = model(ids, targets)
    ref = oracle_forward(arrays, config, ids.numpy(), targets.numpy())

    # float32 through a few layers vs float64: observed errors ~1e-6; 1e-4 is the acceptance bound.
    np.testing.assert_allclose(out.logits.numpy(), ref["logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(out.expert_indices.numpy(), ref["expert_indices"])
    np.testing.assert_allclose(out.router_probs.numpy(), ref["router_probs"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out.dropped.numpy(), ref["dropped"])
    counts = np.stack([np.bincount(ix.reshape(-1), minlength=config.tot_num_experts)
                       for ix in ref["expert_indices"]])
    np.testing.assert_array_equal(out.expert_counts.numpy(), counts)
    for key in ("lm_loss", "aux_loss", "z_loss", "loss"):
        assert getattr(out, key).item() == pytest.approx(ref[key], rel=1e-5), key
    if config.capacity_factor is not None and name != "odd_sizes":
        assert ref["dropped"].sum() > 0  # these configs are meant to exercise dropping


def test_padding_rows_stay_zero_and_masked():
    config = small_config(vocab_size=200)  # Vp = 256
    torch.manual_seed(0)
    model = BluesModel(config)
    assert torch.count_nonzero(model.embed[200:]) == 0
    ids, targets = random_ids(config, 2, 9), random_ids(config, 2, 9, seed=1)
    for training in (True, False):  # chunked and materialised loss paths
        model.train(training)
        model.zero_grad()
        out = model(ids, targets, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        assert torch.count_nonzero(model.embed.grad[200:]) == 0
        assert torch.count_nonzero(model.embed.grad[:200]) > 0
    model.eval()
    with torch.no_grad():
        clean = model(ids, targets)
        assert clean.logits.shape == (2, 9, 200)
        model.embed[200:] = 1e3  # garbage in the padding rows must not reach any softmax
        dirty = model(ids, targets)
        assert torch.equal(clean.logits, dirty.logits) and torch.equal(clean.loss, dirty.loss)
        model.train()
        g = torch.Generator().manual_seed(0)
        dirty_train = model(ids, targets, generator=g).lm_loss
        model.embed[200:] = 0.0
        clean_train = model(ids, targets, generator=torch.Generator().manual_seed(0)).lm_loss
        assert torch.equal(dirty_train, clean_train)


def test_train_eval_noise():
    config = small_config(router_noise_std=0.5)
    torch.manual_seed(0)
    model = BluesModel(config)
    ids = random_ids(config, 2, 10)
    with torch.no_grad():
        model.eval()
        e1 = model(ids, generator=torch.Generator().manual_seed(1))
        e2 = model(ids, generator=torch.Generator().manual_seed(2))
        model.train()
        t1 = model(ids, generator=torch.Generator().manual_seed(1))
        t1_again = model(ids, generator=torch.Generator().manual_seed(1))
        t2 = model(ids, generator=torch.Generator().manual_seed(2))
    assert torch.equal(e1.router_probs, e2.router_probs)  # eval: no noise, generator unused
    assert torch.equal(t1.router_probs, t1_again.router_probs)  # same seed, same noise
    assert not torch.allclose(t1.router_probs, e1.router_probs)  # training adds noise
    assert not torch.allclose(t1.router_probs, t2.router_probs)  # which comes from the generator
    # The z-loss reads the logits before noise: route() reports those, noisy or not.
    x, router = torch.randn(5, 32), model.layers[0].moe.router.detach()
    noisy = route(x, router, k=2, noise_std=0.5, normalize=False, generator=None, training=True)
    clean = route(x, router, k=2, noise_std=0.5, normalize=False, generator=None, training=False)
    assert torch.equal(noisy.logits, clean.logits) and not torch.equal(noisy.probs, clean.probs)


def test_dropout_only_in_training():
    config = small_config(dropout=0.5, router_noise_std=0.0)
    torch.manual_seed(0)
    model = BluesModel(config)
    ids = random_ids(config, 1, 8)
    with torch.no_grad():
        model.eval()
        a, b = model(ids).logits, model(ids).logits
        model.train()
        torch.manual_seed(1)
        c = model(ids).logits
        d = model(ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(c, d)  # two dropout masks


def test_gradient_checkpointing_same_grads():
    config = small_config(dropout=0.1, router_noise_std=0.3, capacity_factor=1.0)
    torch.manual_seed(0)
    plain = BluesModel(config)
    ckpt = BluesModel(config, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    ids, targets = random_ids(config, 2, 10), random_ids(config, 2, 10, seed=1)
    losses = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(123)  # dropout draws from the global RNG
        out = model(ids, targets, generator=torch.Generator().manual_seed(7))
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        # Recomputation repeats the same float32 ops; allow only reordering-level differences.
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast_runs():
    config = small_config(capacity_factor=1.0)
    torch.manual_seed(0)
    model = BluesModel(config).train()
    ids, targets = random_ids(config, 2, 10), random_ids(config, 2, 10, seed=1)
    ref = model(ids, targets, generator=torch.Generator().manual_seed(0)).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.router_probs.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
    # bf16 has an 8-bit mantissa: a few-layer forward agrees with float32 to ~1%, not better.
    assert out.loss.item() == pytest.approx(ref, rel=3e-2)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(ids).logits.shape == (2, 10, config.vocab_size)


def test_sequence_longer_than_context_is_rejected():
    config = small_config(max_position_embeddings=8)
    with pytest.raises(BluesError, match="max_position_embeddings"):
        BluesModel(config)(random_ids(config, 1, 9))


# ---- experts -------------------------------------------------------------------------------------

def test_topk_ties_to_lower_index():
    x = torch.ones(3, 4)
    router = torch.zeros(4, 6)
    router[:, 1] = router[:, 3] = router[:, 5] = 1.0  # experts 1, 3, 5 tie for the top
    r = route(x, router, k=2, noise_std=0.0, normalize=False, generator=None, training=False)
    assert r.indices.tolist() == [[1, 3]] * 3
    r = route(x, torch.zeros(4, 6), k=4, noise_std=0.0, normalize=True, generator=None, training=False)
    assert r.indices.tolist() == [[0, 1, 2, 3]] * 3  # all tied: lowest indices, in order
    torch.testing.assert_close(r.weights, torch.full((3, 4), 0.25))


@pytest.mark.parametrize("k,capacity", [(2, None), (3, None), (3, 4)])
def test_expert_mlp_gradients_match_per_token_reference(k, capacity):
    """The sorted path's hand-written gather backwards (each token's k copies read back and summed,
    refused assignments reading a zero row) against autograd through a float64 per-token sum.
    float32 vs float64 over sums of ~10 terms of O(1): errors ~1e-6; bound 1e-4."""
    g = torch.Generator().manual_seed(k)
    n, d, f, e = 11, 8, 5, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float32, requires_grad=True)
    w_in = torch.randn(e, d, 2 * f, generator=g, dtype=torch.float32, requires_grad=True)
    w_out = torch.randn(e, f, d, generator=g, dtype=torch.float32, requires_grad=True)
    weights = torch.rand(n, k, generator=g, dtype=torch.float32, requires_grad=True)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])  # [n, k] distinct experts
    keep = None if capacity is None else capacity_keep(indices, e, capacity)
    if keep is not None:
        assert not keep.all()  # the capacity binds: refused assignments are exercised
    dy = torch.randn(n, d, generator=g, dtype=torch.float32)
    got = torch.autograd.grad((expert_mlp(x, indices, weights, keep, w_in, w_out) * dy).sum(), (x, weights, w_in, w_out))

    def reference(x, weights, w_in, w_out):
        rows = []
        for t in range(n):
            row = torch.zeros(d, dtype=torch.float64)
            for j in range(k):
                if keep is None or keep[t, j]:
                    hdn = x[t] @ w_in[indices[t, j]]
                    row = row + weights[t, j] * ((torch.nn.functional.gelu(hdn[f:]) * hdn[:f]) @ w_out[indices[t, j]])
            rows.append(row)
        return torch.stack(rows)

    leaves = [t.detach().double().requires_grad_() for t in (x, weights, w_in, w_out)]
    want = torch.autograd.grad((reference(*leaves) * dy.double()).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)


def test_capacity_priority_rule():
    # 4 tokens, top-2 of 3 experts, capacity 2. Priority order: first choices of tokens 0..3,
    # then second choices of tokens 0..3.
    indices = torch.tensor([[0, 1],   # token 0: e0 slot 0 keep | e1 slot 1 keep
                            [0, 2],   # token 1: e0 slot 1 keep | e2 slot 0 keep
                            [0, 1],   # token 2: e0 slot 2 DROP | e1 slot 2 DROP
                            [1, 0]])  # token 3: e1 slot 0 keep | e0 slot 3 DROP
    keep = capacity_keep(indices, num_experts=3, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert capacity_keep(indices, 3, capacity=4).all()
    # A refused assignment contributes nothing: token 2 gets 0, token 3 only its first expert.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    w_in, w_out = torch.randn(3, 8, 2 * 5, generator=g), torch.randn(3, 5, 8, generator=g)
    weights = torch.rand(4, 2, generator=g)
    y = expert_mlp(x, indices, weights, keep, w_in, w_out)

    def expert(e, v):
        hdn = v @ w_in[e]
        return (torch.nn.functional.gelu(hdn[5:]) * hdn[:5]) @ w_out[e]

    expected = torch.stack([weights[0, 0] * expert(0, x[0]) + weights[0, 1] * expert(1, x[0]),
                            weights[1, 0] * expert(0, x[1]) + weights[1, 1] * expert(2, x[1]),
                            torch.zeros(8),
                            weights[3, 0] * expert(1, x[3])])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_dropless_equals_nonbinding_capacity():
    # c = E / k gives C = N: every expert could take every token, so nothing is ever refused.
    dropless = small_config()
    binding_free = small_config(capacity_factor=dropless.tot_num_experts / dropless.chosen_num_experts)
    torch.manual_seed(0)
    a = BluesModel(dropless).eval()
    b = BluesModel(binding_free).eval()
    b.load_state_dict(a.state_dict())
    ids, targets = random_ids(dropless, 2, 11), random_ids(dropless, 2, 11, seed=1)
    with torch.no_grad():
        oa, ob = a(ids, targets), b(ids, targets)
    assert ob.dropped.sum() == 0
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.loss, ob.loss)


# ---- loss ----------------------------------------------------------------------------------------

def test_chunked_loss_matches_plain():
    g = torch.Generator().manual_seed(0)
    n, d, v, vp = 23, 16, 100, 128
    h = torch.randn(n, d, generator=g)
    embed = torch.randn(vp, d, generator=g)
    embed.data[v:] = 0.0
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[0, 5, 22]] = -100

    h_ref, e_ref = h.clone().requires_grad_(), embed.clone().requires_grad_()
    plain = cross_entropy(lm_head_logits(h_ref, e_ref, v), targets)
    plain.backward()
    valid = targets != -100
    expected = torch.nn.functional.cross_entropy((h @ embed.t())[:, :v][valid], targets[valid])
    torch.testing.assert_close(plain, expected)

    for chunk in (1, 4, 7, n, 1000):
        hc, ec = h.clone().requires_grad_(), embed.clone().requires_grad_()
        loss = chunked_lm_loss(hc, ec, targets, v, chunk)
        loss.backward()
        torch.testing.assert_close(loss, plain, rtol=1e-6, atol=0)  # float32 rounding only
        torch.testing.assert_close(hc.grad, h_ref.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ec.grad, e_ref.grad, rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(ec.grad[v:]) == 0

    # The fused forward stores gradients for d(out)/d(loss) = 1; backward must scale them by the
    # real upstream gradient (gradient accumulation divides the loss, DeepSpeed may scale it).
    hc, ec = h.clone().requires_grad_(), embed.clone().requires_grad_()
    (-2.5 * chunked_lm_loss(hc, ec, targets, v, 4)).backward()
    torch.testing.assert_close(hc.grad, -2.5 * h_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ec.grad, -2.5 * e_ref.grad, rtol=1e-5, atol=1e-7)
    # Under no_grad only the loss is computed, and it is the same loss.
    with torch.no_grad():
        torch.testing.assert_close(chunked_lm_loss(h, embed, targets, v, 4), plain.detach(), rtol=1e-6, atol=0)
    # Only the gradient asked for: embed frozen.
    hc = h.clone().requires_grad_()
    chunked_lm_loss(hc, embed, targets, v, 4).backward()
    torch.testing.assert_close(hc.grad, h_ref.grad, rtol=1e-5, atol=1e-7)

    # Nothing to predict: loss 0 (documented convention), gradients 0, no NaN.
    hc, ec = h.clone().requires_grad_(), embed.clone().requires_grad_()
    ignored = torch.full((n,), -100)
    loss = chunked_lm_loss(hc, ec, ignored, v, 5)
    loss.backward()
    assert loss.item() == 0.0 and cross_entropy(h @ embed.t(), ignored).item() == 0.0
    assert torch.count_nonzero(hc.grad) == 0 and torch.count_nonzero(ec.grad) == 0


# ---- hand-written backwards and the decode-sized expert path --------------------------------------

def test_rmsnorm_and_gated_gelu_backwards_match_autograd():
    """The memory-saving autograd Functions (RMSNorm keeps x and rsqrt only; the gated GeLU keeps
    its input only) against autograd of the plain formulas. Both compute in float32 by design, so
    the comparison is float32 (a float64 gradcheck would measure float32 rounding)."""
    from blues_torch.gated_gelu import _GatedGelu
    from blues_torch.model import RMSNorm
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    scale = (torch.rand(12, generator=g) + 0.5).requires_grad_()
    ref = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * scale
    upstream = torch.randn(ref.shape, generator=g)
    grads_ref = torch.autograd.grad((ref * upstream).sum(), (x, scale))
    norm = RMSNorm(12, 1e-5)
    with torch.no_grad():
        norm.scale.copy_(scale)
    out = norm(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the forward is the same arithmetic
    grads = torch.autograd.grad((out * upstream).sum(), (x, norm.scale))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    hidden = torch.randn(7, 10, generator=g, requires_grad=True)
    value, gate = hidden.chunk(2, dim=-1)
    ref = torch.nn.functional.gelu(gate) * value
    upstream = torch.randn(ref.shape, generator=g)
    want = torch.autograd.grad((ref * upstream).sum(), hidden)[0]
    out = _GatedGelu.apply(hidden)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad((out * upstream).sum(), hidden)[0], want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_under_torch_compile_keeps_its_gradient():
    """The norm's Function must not return an alias of an intermediate (a no-op `.to(x.dtype)` on
    float32 input): torch 2.11's torch.compile routed such an output's gradient to a phantom second
    output (pytorch#180642), and compiled training with float32 weights gave every layer a zero
    gradient (found on the H200, docs/performance.md round 8). A Function of that form gets a zero
    gradient under 2.11's compile on CPU and CUDA alike; torch builds with the fix pass either way."""
    from blues_torch.model import RMSNorm
    g = torch.Generator().manual_seed(5)
    norm = RMSNorm(12, 1e-5)
    x = torch.randn(3, 12, generator=g, requires_grad=True)
    upstream = torch.randn(3, 12, generator=g)
    want = torch.autograd.grad((norm(x) * upstream).sum(), (x, norm.scale))
    got = torch.autograd.grad((torch.compile(norm)(x) * upstream).sum(), (x, norm.scale))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dense_small_block_path_matches_sorted_path():
    """Decode-sized CUDA blocks compute every expert densely (experts._dense_small_block_mlp);
    on any device it must equal the sorted per-expert path, capacity refusals included."""
    from blues_torch.experts import _dense_small_block_mlp
    g = torch.Generator().manual_seed(4)
    n, d, f, e, k = 9, 8, 6, 4, 2
    x = torch.randn(n, d, generator=g)
    w_in, w_out = torch.randn(e, d, 2 * f, generator=g), torch.randn(e, f, d, generator=g)
    r = route(x, torch.randn(d, e, generator=g), k=k, noise_std=0.0, normalize=False, generator=None,
              training=False)
    for keep in (None, capacity_keep(r.indices, e, 2)):
        with torch.no_grad():
            want = expert_mlp(x, r.indices, r.weights, keep, w_in, w_out)  # CPU: the sorted loop path
            got = _dense_small_block_mlp(x, r.indices, r.weights, keep, w_in, w_out)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert keep is not None and not keep.all()  # the capacity case did refuse something


def test_greedy_argmax_is_first_maximum():
    from blues_torch.generation import greedy_argmax
    g = torch.Generator().manual_seed(5)
    for b, v in ((1, 1), (2, 127), (3, 128), (2, 129), (4, 1000), (2, 200019)):
        x = torch.randint(-2, 3, (b, v), generator=g).float()  # ties everywhere, within and across blocks
        assert torch.equal(greedy_argmax(x), x.argmax(-1)), (b, v)


def test_compile_blocks_shares_one_graph_and_leaves_eval_eager():
    """--compile's per-block compile: three blocks run one compiled `_run_block` entry (the blocks pass
    the same guards: no per-layer recompile, compile time independent of depth), the training forward
    and backward equal eager's, and eval mode never enters the compiled function. aot_eager: dynamo and
    AOTAutograd without inductor's C++ build; the same ops, so only reordering-level differences."""
    import torch._dynamo
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from blues_torch import model as tm

    config = small_config(num_layers=3, router_noise_std=0.3)
    torch.manual_seed(0)
    eager, compiled = BluesModel(config).train(), BluesModel(config).train()
    compiled.load_state_dict(eager.state_dict())
    ids, targets = random_ids(config, 2, 10), random_ids(config, 2, 10, seed=1)
    torch._dynamo.reset()
    compiled.compile_blocks(backend="aot_eager")
    losses = []
    for model in (eager, compiled):
        out = model(ids, targets, generator=torch.Generator().manual_seed(7))
        out.loss.backward()
        losses.append(out.loss.detach())
    assert len(_debug_get_cache_entry_list(tm._run_block.__code__)) == 1
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)

    calls = []
    compiled.compiled_block = lambda *args: calls.append(args)  # eval mode must not reach it
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager.eval()(ids).logits, rtol=0, atol=0)
    assert calls == []

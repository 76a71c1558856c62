"""Generation and evaluation (issue 7): sampling spec, KV caches, perplexity, the CLI and the API.

CPU, float32, small configs. The sampling tests compare the torch and JAX samplers with the numpy
statement of the spec (blues/sampling.py) on hand-built distributions. The cache tests compare
cached decoding with the plain forward pass of each row's own unpadded sequence, step by step. The
perplexity tests recompute the expected numbers from plain forwards. The CLI tests run
generate.py's `main` through `run_main` (exactly what `python generate.py` does) and a few real
subprocesses.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # generate.py and train_jax.py are scripts at the repository root

import generate  # noqa: E402
from blues.cli import run_main
from blues.config import BluesConfig
from blues.evaluation import RoutingStats, format_utilization, plan_windows
from blues.sampling import SamplingParams, kept_mask, reference_sample
from blues.tokenizer import load_tokenizer
from blues_jax import generation as jgen
from blues_torch import generation as tgen
from oracle import random_canonical
from parity import generate as pgen
from parity.convert import from_canonical, load_canonical, to_canonical
from blues.safetensors_io import read_safetensors, save_export

torch.set_num_threads(1)  # two cores shared with other test runs

# Float32 logits of these models are O(1-10); two float32 computations of the same logit that sum in a
# different order (cache vs full forward, torch vs JAX) differ by a few ulps of the intermediate
# activations, ~1e-6 relative. 2e-5 absolute (plus 1e-5 relative) is tight enough to catch a wrong
# position, mask or cache slot (those move logits by O(0.1) and more).
ATOL, RTOL = 2e-5, 1e-5


def small_config(**overrides) -> BluesConfig:
    base = dict(vocab_size=512, max_position_embeddings=64, num_layers=2, hidden_size=32, head_dim=16,
                num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                embedding_multiplier_scale=2)
    return BluesConfig(**(base | overrides))


def text_config(**overrides) -> BluesConfig:
    """Small, but with the tokenizer's vocabulary, so text goes in and out."""
    base = dict(max_position_embeddings=32, num_layers=2, hidden_size=16, head_dim=8, num_attention_heads=2,
                num_key_value_heads=1, tot_num_experts=4, chosen_num_experts=1, embedding_multiplier_scale=2)
    return BluesConfig(**(base | overrides))


@pytest.fixture(scope="module")
def small_models():
    cfg = small_config()
    arrays = random_canonical(cfg, seed=1)
    tm = from_canonical(arrays, cfg, "torch").eval()
    jm = from_canonical(arrays, cfg, "jax")
    jm.eval()
    return cfg, tm, jm


@pytest.fixture(scope="module")
def text_arrays():
    cfg = text_config()
    return cfg, random_canonical(cfg, seed=2)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, text_arrays):
    cfg, arrays = text_arrays
    path = tmp_path_factory.mktemp("export")
    save_export(path, arrays, cfg)
    return path


@pytest.fixture(scope="module")
def loaded(export_dir):
    return {backend: generate.load_model(str(export_dir), backend=backend, device="cpu")
            for backend in ("torch", "jax")}


# ---- the sampling specification ------------------------------------------------------------------

def torch_kept(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    vals, ids = tgen.filter_logits(torch.from_numpy(logits[None]), params)
    mask = np.zeros(logits.shape[-1], dtype=bool)
    mask[ids[0][torch.isfinite(vals[0])].numpy()] = True
    return mask


# Jitted once per sampling setting: eager JAX would compile every primitive of the sampler one by one.
_jax_filter = jax.jit(jgen.filter_logits, static_argnums=1)
_jax_sample = jax.jit(jgen.sample, static_argnums=1)


def jax_kept(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    vals, ids = _jax_filter(jnp.asarray(logits[None]), params)
    mask = np.zeros(logits.shape[-1], dtype=bool)
    mask[np.asarray(ids[0])[np.isfinite(np.asarray(vals[0]))]] = True
    return mask


def torch_sample(logits, params, step=0, rows=None):
    rows = torch.arange(len(logits)) if rows is None else torch.as_tensor(rows)
    return tgen.sample(torch.from_numpy(logits), params, torch.tensor(step), rows).numpy()


def jax_sample(logits, params, step=0, rows=None):
    rows = jnp.arange(len(logits)) if rows is None else jnp.asarray(rows)
    return np.asarray(_jax_sample(jnp.asarray(logits), params, jnp.int32(step), rows))


# probabilities by id: 0.1, 0.4, 0.2, 0.2, 0.1 (ties at 0.2 and at 0.1), then 3 tokens of ~0.
HAND_PROBS = np.array([0.1, 0.4, 0.2, 0.2, 0.1, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("top_p,kept", [
    (0.3, [1]),  # 0.4 alone reaches 0.3
    (0.5, [1, 2]),  # 0.4 < 0.5: add the next; of the tied 0.2s the lower id (2) ranks first
    (0.7, [1, 2, 3]),  # 0.6 < 0.7
    (0.85, [0, 1, 2, 3]),  # 0.8 < 0.85: of the tied 0.1s, id 0 ranks before id 4
    (0.95, [0, 1, 2, 3, 4]),  # 0.9 < 0.95
    (1.0, list(range(8))),  # top_p = 1 is off: every token stays a candidate
])
def test_top_p_keeps_exactly_the_specified_tokens(top_p, kept):
    # p values sit >= 0.05 away from the cumulative sums (0.4, 0.6, 0.8, 0.9), so float32 rounding of
    # log/softmax cannot move a token across the boundary.
    logits = np.log(np.maximum(HAND_PROBS, 1e-12)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=top_p)
    expected = np.isin(np.arange(8), kept)
    for name, fn in (("numpy", kept_mask), ("torch", torch_kept), ("jax", jax_kept)):
        assert np.array_equal(fn(logits, params), expected), name


def test_top_p_after_top_k_and_temperature():
    # Temperature 0.5 squares the odds: p ∝ HAND_PROBS^2 = 0.01, 0.16, 0.04, 0.04, 0.01 (/0.26);
    # top_k=3 keeps ids 1, 2, 3 (tie at the 3rd place: ids 2 and 3 equal, both fit; 0 and 4 out);
    # renormalised 0.667, 0.167, 0.167: top_p 0.7 keeps 1 and 2 (0.667 < 0.7), not 3.
    logits = np.log(np.maximum(HAND_PROBS, 1e-12)).astype(np.float32)
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.7)
    expected = np.isin(np.arange(8), [1, 2])
    for name, fn in (("numpy", kept_mask), ("torch", torch_kept), ("jax", jax_kept)):
        assert np.array_equal(fn(logits, params), expected), name


def test_top_k_ties_go_to_the_lower_ids():
    logits = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.5], dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=3)  # 3.0, then two of the three 2.0s: ids 2 and 3
    expected = np.isin(np.arange(6), [1, 2, 3])
    for name, fn in (("numpy", kept_mask), ("torch", torch_kept), ("jax", jax_kept)):
        assert np.array_equal(fn(logits, params), expected), name
    flat = np.full(300, -1.5, dtype=np.float32)  # all tied (and negative): the 5 lowest ids
    params = SamplingParams(temperature=1.0, top_k=5)
    for name, fn in (("numpy", kept_mask), ("torch", torch_kept), ("jax", jax_kept)):
        assert np.array_equal(fn(flat, params), np.arange(300) < 5), name


def test_greedy_and_top_k_1_pick_the_argmax_ties_to_lower_id():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 300)).astype(np.float32)
    logits[3, [7, 9, 200]] = 50.0  # a three-way tie at the top: id 7 wins
    want = np.argmax(logits, axis=-1)
    assert want[3] == 7
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.7, top_k=1, seed=5),
                   SamplingParams(temperature=0.3, top_k=1, top_p=0.5, seed=9)):
        for step in range(3):
            assert np.array_equal(reference_sample(logits, params, step), want)
            assert np.array_equal(torch_sample(logits, params, step), want)
            assert np.array_equal(jax_sample(logits, params, step), want)


@pytest.mark.parametrize("params", [SamplingParams(1.0, 0, 1.0, 3), SamplingParams(0.7, 20, 1.0, 4),
                                    SamplingParams(0.9, 0, 0.8, 5), SamplingParams(1.3, 40, 0.9, 2**40 + 7)],
                         ids=["plain", "top_k", "top_p", "both"])
def test_device_samplers_follow_the_reference(params):
    # The counter-based uniforms make sampling a pure function of (logits, seed, step, row): torch,
    # JAX and numpy must pick the very same ids (logits here are far from Gumbel-score ties).
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((8, 1000))).astype(np.float32)
    for step in (0, 1, 77):
        want = reference_sample(logits, params, step)
        assert np.array_equal(torch_sample(logits, params, step), want)
        assert np.array_equal(jax_sample(logits, params, step), want)
    other = reference_sample(logits, SamplingParams(params.temperature, params.top_k, params.top_p, params.seed + 1))
    assert not np.array_equal(other, reference_sample(logits, params)), "the seed must matter"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    base = np.array([0.0, 1.0, 2.0, 3.0], dtype=np.float32)
    # Step 1 of the spec is logits / temperature, exactly.
    params = SamplingParams(temperature=temperature)
    vals, _ = tgen.filter_logits(torch.from_numpy(base[None]), params)
    assert torch.equal(vals[0], torch.from_numpy(base) / temperature)
    vals, _ = _jax_filter(jnp.asarray(base[None]), params)
    assert np.array_equal(np.asarray(vals[0]), base / np.float32(temperature))
    # And the samples follow softmax(logits / T): 40,000 rows, each with its own random numbers.
    n = 40_000
    logits = np.tile(base, (n, 1))
    ids = torch_sample(logits, SamplingParams(temperature=temperature, seed=11))
    assert np.array_equal(ids[:64], jax_sample(logits[:64], SamplingParams(temperature=temperature, seed=11)))
    freq = np.bincount(ids, minlength=4) / n
    p = np.exp(base / temperature) / np.exp(base / temperature).sum()
    sigma = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) < 5 * sigma + 1e-4), (freq, p)


def test_sampling_params_are_validated():
    from blues.errors import UsageError
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=-0.1),
                dict(temperature=float("nan")), dict(top_k=2.5)):
        with pytest.raises(UsageError):
            SamplingParams(**bad)


# ---- KV cache ------------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 9, 10, 11], [100, 200, 300, 400, 500, 11, 12, 13, 14, 15, 16, 17]]


def cached_steps(framework, model, prompts, steps):
    """Prefill the left-padded prompts, then feed greedy tokens; logits [B, V] of every step."""
    cfg = model.config
    ids, start = tgen.left_pad(prompts, pad_id=0)
    if framework == "torch":
        cache = tgen.KVCache.allocate(cfg, len(prompts), cfg.max_position_embeddings, device="cpu")
        cache.reset(torch.from_numpy(start))
        with torch.no_grad():
            cache.load_qkv(model)
            logits = model(torch.from_numpy(ids), cache=cache).logits[:, -1]
            out = [logits.numpy()]
            for _ in range(steps):
                logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
                out.append(logits.numpy())
        return out
    graphdef, state = nnx.split(model)
    cache = jgen.KVCache.allocate(cfg, len(prompts), cfg.max_position_embeddings)
    cache.start = jnp.asarray(start, jnp.int32)
    cache.load_qkv(model)
    logits, cache = _jax_cached_call(graphdef, state, jnp.asarray(ids), cache)
    out = [np.asarray(logits)]
    for _ in range(steps):
        logits, cache = _jax_cached_call(graphdef, state, jnp.argmax(logits, -1)[:, None], cache)
        out.append(np.asarray(logits))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _jax_cached_call(graphdef, state, ids, cache):
    # The model replaces the cache's arrays as it goes; the updated cache comes back out as a pytree.
    logits = nnx.merge(graphdef, state)(ids, cache=cache).logits[:, -1]  # [B, V]
    return logits, cache


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_cached_decoding_equals_full_forward(small_models, framework):
    cfg, tm, jm = small_models
    model = tm if framework == "torch" else jm
    plain = tgen.plain_logits if framework == "torch" else jgen.plain_logits
    steps = cached_steps(framework, model, PROMPTS, steps=8)
    for b, prompt in enumerate(PROMPTS):
        seq = list(prompt) + [int(np.argmax(s[b])) for s in steps[:-1]]
        full = plain(model, np.asarray([seq]))[0]  # [T, V]: this row alone, no padding, no cache
        for i, s in enumerate(steps):
            np.testing.assert_allclose(s[b], full[len(prompt) - 1 + i], atol=ATOL, rtol=RTOL,
                                       err_msg=f"row {b}, step {i}")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_padding_invariance(small_models, framework):
    cfg, tm, jm = small_models
    engine, model = (tgen, tm) if framework == "torch" else (jgen, jm)
    alone_prompt = PROMPTS[1]
    settings = [SamplingParams(temperature=0.0)]
    if framework == "torch":  # (JAX: the same code path; its sampler is checked above, compiles cost time)
        settings.append(SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=3))
    for params in settings:
        # The prompt sits in row 1 of a batch with a shorter and a longer prompt, and alone with
        # row_offset 1 (so it draws the same random numbers): same tokens either way.
        batch = engine.generate(model, [PROMPTS[0], alone_prompt, PROMPTS[2]], 12, params, eot_id=0,
                                stop_at_eot=False)
        alone = engine.generate(model, [alone_prompt], 12, params, eot_id=0, stop_at_eot=False, row_offset=1)
        assert batch[1] == alone[0]
        assert len(batch[0]) == len(batch[2]) == 12


def test_greedy_ids_identical_across_frameworks(small_models):
    cfg, tm, jm = small_models
    greedy = SamplingParams(temperature=0.0)
    ids_t = tgen.generate(tm, PROMPTS, 32, greedy, eot_id=0, stop_at_eot=False)
    ids_j = jgen.generate(jm, PROMPTS, 32, greedy, eot_id=0, stop_at_eot=False)
    assert ids_t == ids_j
    assert all(len(r) == 32 for r in ids_t)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_the_head_can_be_skipped_for_the_hidden_state(small_models, framework):
    """return_logits=False without targets: no logits, and the hidden state the fused greedy head
    reads is the head's input (the head applied to it gives the model's logits)."""
    cfg, tm, jm = small_models
    ids = np.asarray([PROMPTS[0][:5]])
    if framework == "torch":
        from blues_torch.loss import lm_head_logits
        with torch.no_grad():
            full, bare = tm(torch.from_numpy(ids), return_logits=True), tm(torch.from_numpy(ids), return_logits=False)
            head = lm_head_logits(bare.hidden, tm.embed, cfg.vocab_size)
        assert bare.logits is None
        np.testing.assert_array_equal(head.numpy(), full.logits.numpy())
    else:
        from blues_jax.loss import lm_head_logits
        full, bare = jm(jnp.asarray(ids), return_logits=True), jm(jnp.asarray(ids), return_logits=False)
        assert bare.logits is None
        np.testing.assert_array_equal(np.asarray(lm_head_logits(bare.hidden, jm.embed[...], cfg.vocab_size)),
                                      np.asarray(full.logits))


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_generation_follows_weights_changed_between_calls(framework):
    """A later generate call of the same model (its decoder and cache reused) projects with the
    current q, k, v weights, as the trainers' samples need while training changes them: the cache's
    packed copy is reloaded every call. Each greedy token must be the full forward's argmax of the
    current model (no cache involved); a copy kept from the first call fails this."""
    cfg = small_config()
    before, after = random_canonical(cfg, seed=1), random_canonical(cfg, seed=5)
    gen = {"torch": tgen, "jax": jgen}[framework]
    greedy = SamplingParams(temperature=0.0)
    model = from_canonical(before, cfg, framework)
    gen.generate(model, PROMPTS, 8, greedy, eot_id=0, stop_at_eot=False)
    changed = {name: a for name, a in after.items() if name.rsplit(".", 1)[-1] in ("q", "k", "v")}
    assert changed, "no attention projections among the canonical names"
    load_canonical(model, before | changed)
    for prompt, tokens in zip(PROMPTS, gen.generate(model, PROMPTS, 8, greedy, eot_id=0, stop_at_eot=False)):
        seq = np.asarray([prompt + tokens[:-1]])  # [1, P + 7]
        predicted = gen.plain_logits(model, seq)[0, len(prompt) - 1:].argmax(-1)  # [8]
        assert predicted.tolist() == tokens


def test_jax_generation_after_a_model_of_another_width(small_models):
    """JAX reuses the last call's cache buffers for the next call of the same batch size: only for a
    model of the same shape (a model with another head width got them and failed in attention)."""
    cfg, tm, jm = small_models
    other_cfg = small_config(head_dim=8, num_attention_heads=8, num_key_value_heads=4)
    other = from_canonical(random_canonical(other_cfg, seed=5), other_cfg, "jax")
    other.eval()
    greedy = SamplingParams(temperature=0.0)
    alone = jgen.generate(jm, PROMPTS, 6, greedy, eot_id=0, stop_at_eot=False)
    jgen.generate(other, PROMPTS, 6, greedy, eot_id=0, stop_at_eot=False)
    assert jgen.generate(jm, PROMPTS, 6, greedy, eot_id=0, stop_at_eot=False) == alone


def test_generation_stops_at_endoftext(small_models):
    cfg, tm, jm = small_models
    greedy = SamplingParams(temperature=0.0)
    out_t = tgen.generate(tm, PROMPTS, 10, greedy, eot_id=0, stop_at_eot=False)
    eot = out_t[0][2]  # pretend the third generated token of row 0 is <|endoftext|>
    stopped_t = tgen.generate(tm, PROMPTS, 10, greedy, eot_id=eot, stop_at_eot=True)
    stopped_j = jgen.generate(jm, PROMPTS, 10, greedy, eot_id=eot, stop_at_eot=True)
    assert stopped_t == stopped_j
    for full, cut in zip(out_t, stopped_t):
        want = full[:full.index(eot)] if eot in full else full
        assert cut == want


def test_jax_decoding_in_chunks_keeps_every_budget_exact(small_models):
    """JAX decodes DECODE_CHUNK steps per loop iteration and drops the steps past the budget: every
    budget gives exactly that many tokens, the prefix of a longer call's, and a budget that fills the
    whole context (the dropped steps' cache writes clamped at its last slot) still equals PyTorch's."""
    cfg, tm, jm = small_models
    greedy = SamplingParams(temperature=0.0)
    longest = jgen.generate(jm, PROMPTS, 2 * jgen.DECODE_CHUNK + 3, greedy, eot_id=0, stop_at_eot=False)
    for n in (1, 2, jgen.DECODE_CHUNK, jgen.DECODE_CHUNK + 1, 2 * jgen.DECODE_CHUNK + 3):
        assert jgen.generate(jm, PROMPTS, n, greedy, eot_id=0, stop_at_eot=False) == [r[:n] for r in longest], n
    full = cfg.max_position_embeddings - len(PROMPTS[2])
    assert jgen.generate(jm, PROMPTS, full, greedy, eot_id=0, stop_at_eot=False) == \
        tgen.generate(tm, PROMPTS, full, greedy, eot_id=0, stop_at_eot=False)


def test_jax_decode_chunk_is_a_loop_of_known_trip_count(small_models):
    """The chunk's steps are a loop XLA knows the trip count of, so it runs them without reading a
    condition back to the host (a while loop of unknown count reads it every iteration)."""
    cfg, _, jm = small_models
    graphdef, state = nnx.split(jm)
    generate_all = jgen._compiled(graphdef, SamplingParams(temperature=0.0), True)[0]
    ids, start = jgen.left_pad(PROMPTS, 0, 16, dtype=np.int32)
    cache = jgen.KVCache.allocate(cfg, len(PROMPTS), cfg.max_position_embeddings)
    hlo = generate_all.lower(state, jnp.asarray(ids), jnp.asarray(start), jnp.arange(3, dtype=jnp.int32),
                             jnp.uint32(0), jnp.int32(0), jnp.bool_(False), jnp.int32(9), cache).compile().as_text()
    counts = re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', hlo)
    assert str(jgen.DECODE_CHUNK) in counts, counts


# ---- perplexity and expert utilization -----------------------------------------------------------

TEXT = "This is a test sentence to evaluate the model's perplexity."
LONG_TEXT = ("The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary election "
             "produced no evidence that any irregularities took place. The jury further said in term-end "
             "presentments that the City Executive Committee, which had over-all charge of the election, "
             "deserves the praise and thanks of the City of Atlanta for the manner in which the election "
             "was conducted.")


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_perplexity_equals_exp_mean_nll_of_the_plain_forward(loaded, backend):
    lm = loaded[backend]
    tok = lm.tokenizer
    seq = np.asarray([[tok.eot_id, *tok.encode(TEXT)]])
    result = generate.evaluate_text(lm, TEXT)
    if backend == "torch":
        with torch.no_grad():
            out = lm.model(torch.from_numpy(seq[:, :-1]), torch.from_numpy(seq[:, 1:]))
        lm_loss, idx = float(out.lm_loss), out.expert_indices.numpy()
    else:
        out = nnx.jit(lambda m, x, y: m(x, y))(lm.model, jnp.asarray(seq[:, :-1]), jnp.asarray(seq[:, 1:]))
        lm_loss, idx = float(out.lm_loss), np.asarray(out.expert_indices)
    assert result["tokens"] == seq.shape[1] - 1
    assert result["nll"] == pytest.approx(lm_loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(lm_loss), rel=1e-5)
    # Expert utilization: the routing of the scored predictor positions, per layer.
    report = result["expert_utilization"]
    assert report["tokens"] == seq.shape[1] - 1
    for layer, row in enumerate(report["layers"]):
        counts = np.bincount(idx[layer].reshape(-1), minlength=4)
        np.testing.assert_allclose(row["fractions"], counts / counts.sum(), atol=1e-6)
        share = counts[counts > 0] / counts.sum()
        assert row["entropy"] == pytest.approx(float(-(share * np.log(share)).sum()), abs=1e-6)
        assert 0 <= row["router_entropy"] <= math.log(4) + 1e-6


def test_window_plan_scores_every_token_once_with_its_context():
    for n, context, stride in [(5, 8, 4), (8, 8, 4), (9, 8, 4), (100, 8, 1), (100, 8, 3), (100, 8, 8), (37, 16, 5)]:
        windows = plan_windows(n, context, stride)
        scored = [p for w in windows for p in range(w.score_from, w.end)]
        assert scored == list(range(n))  # each predictor position exactly once, in order
        for w in windows:
            assert 0 <= w.begin and w.length <= context
            for p in range(w.score_from, w.end):
                seen = p - w.begin + 1  # tokens of context the prediction at p reads
                if w.begin == 0:
                    assert seen == p + 1  # everything before it
                else:
                    assert seen >= context - stride + 1


def brute_force_nll(model, seq, context_begin):
    """Mean NLL of seq[j], j >= 1, each from its own plain forward over seq[context_begin(j):j]."""
    total = 0.0
    for j in range(1, len(seq)):
        logits = tgen.plain_logits(model, np.asarray([seq[context_begin(j):j]]))[0, -1].astype(np.float64)
        m = logits.max()
        total += m + math.log(np.exp(logits - m).sum()) - logits[seq[j]]
    return total / (len(seq) - 1)


def test_sliding_window_perplexity_beyond_the_context(small_models):
    cfg, tm, jm = small_models
    context = cfg.max_position_embeddings  # 64
    seq = np.random.default_rng(3).integers(0, cfg.vocab_size, 2 * context + 23).tolist()
    n = len(seq) - 1
    lm_t, lm_j = generate.wrap_model(tm), generate.wrap_model(jm)
    # stride 1: every token predicted from the full context (its last T tokens, or all before it).
    result = generate.evaluate_ids(lm_t, [seq], stride=1)
    assert result["tokens"] == result["expert_utilization"]["tokens"] == n
    assert result["nll"] == pytest.approx(brute_force_nll(tm, seq, lambda j: max(0, j - context)), rel=1e-5)
    # the default stride (T/2): token j is predicted from where its window begins.
    begin = {p + 1: w.begin for w in plan_windows(n, context) for p in range(w.score_from, w.end)}
    result = generate.evaluate_ids(lm_t, [seq])
    assert result["nll"] == pytest.approx(brute_force_nll(tm, seq, begin.__getitem__), rel=1e-5)
    # the JAX backend agrees (same weights, same windows), routing report included
    result_j = generate.evaluate_ids(lm_j, [seq])
    assert result_j["nll"] == pytest.approx(result["nll"], rel=1e-5)
    assert result_j["expert_utilization"] == result["expert_utilization"]


def window_reference(model, sequences, context):
    """(mean NLL, tokens) with every window of plan_windows in its own unpadded one-row forward."""
    total, count = 0.0, 0
    for seq in sequences:
        for w in plan_windows(len(seq) - 1, context):
            logits = tgen.plain_logits(model, np.asarray([seq[w.begin:w.end]]))[0].astype(np.float64)  # [T, V]
            for p in range(w.score_from, w.end):
                row = logits[p - w.begin]
                total += row.max() + math.log(np.exp(row - row.max()).sum()) - row[seq[p + 1]]
                count += 1
    return total / count, count


def test_batched_evaluation_equals_one_window_at_a_time(small_models, monkeypatch):
    """Windows of many lengths (short texts, texts beyond the context), batched longest first and
    right-padded: the same perplexity and routing as each window alone, in both frameworks, whatever
    the batch size. Float32 sums in another order: 1e-5 relative."""
    cfg, tm, jm = small_models
    context = cfg.max_position_embeddings  # 64
    rng = np.random.default_rng(4)
    sequences = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (2, 5, 9, 17, 30, 31, 64, 65, 100, 150, 3)]
    nll, count = window_reference(tm, sequences, context)
    reports = []
    for positions in (1 << 20, 100):  # everything in one batch per width / many small batches
        monkeypatch.setitem(pgen.EVAL_LOGITS_BYTES, "cpu", positions * cfg.vocab_size * 4)
        for model in (tm, jm):
            result = generate.evaluate_ids(generate.wrap_model(model), sequences)
            assert result["tokens"] == count
            assert result["nll"] == pytest.approx(nll, rel=1e-5)
            reports.append(result["expert_utilization"])
    assert all(r == reports[0] for r in reports)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_batch_plan_covers_every_window_once_with_little_padding(backend):
    lengths = np.random.default_rng(5).integers(1, 257, 300).tolist()
    batches = list(pgen.plan_batches(lengths, 256, 700, backend))
    assert sorted(w for _, _, batch in batches for w in batch) == list(range(300))
    for rows, width, batch in batches:
        assert len(batch) <= rows and max(lengths[w] for w in batch) <= width <= 256
        assert rows * width <= 700 or rows == 1
        assert width % 8 == 0 if backend == "torch" else width & (width - 1) == 0
    padded = sum(rows * width for rows, width, _ in batches)
    # longest first: padding is what rounds a batch's width up (up to 2x for JAX's powers of two)
    assert padded <= (1.1 if backend == "torch" else 2.0) * sum(lengths)


def test_entropy_table_prints_no_negative_zero():
    stats = RoutingStats(num_layers=2, num_experts=4)
    # layer 0: every token to expert 0 (load entropy 0); router entropies as -xlogy gives them: -0.0
    stats.add(np.stack([np.zeros((3, 1), np.int64), np.arange(3)[:, None]]), -np.zeros((2, 3)))
    table = format_utilization(stats.report())
    assert "-0.000" not in table and " 0.000" in table


# ---- the Python API ------------------------------------------------------------------------------

def test_sample_text_api(loaded):
    a = generate.sample_text(loaded["torch"], "Write a story about", max_length=12, temperature=0.8, top_p=0.9,
                             top_k=50, seed=0)
    assert a.startswith("Write a story about") and len(a) > len("Write a story about")
    batch = generate.sample_texts(loaded["torch"], ["Write a story about", "Hello"], max_length=12, seed=0)
    assert batch[0] == a  # batching does not change a prompt's sample (row 0 both times)
    again = generate.sample_texts(loaded["torch"], ["Write a story about", "Hello"], max_length=12, seed=0)
    assert again == batch
    other = generate.sample_texts(loaded["torch"], ["Write a story about", "Hello"], max_length=12, seed=1)
    assert other != batch


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sample_text_is_fresh_unless_seeded(loaded, backend):
    # 20 tokens from top-50 of a random model: two fresh samples coincide with probability ~50^-20.
    fresh = {generate.sample_text(loaded[backend], "Hello", max_length=20) for _ in range(3)}
    assert len(fresh) == 3
    seeded = {generate.sample_text(loaded[backend], "Hello", max_length=20, seed=7) for _ in range(3)}
    assert len(seeded) == 1


# ---- the command line ----------------------------------------------------------------------------

def run_cli(argv, capsys):
    saved, sys.argv = sys.argv, ["generate.py", *argv]  # run_main names the program from argv[0]
    try:
        code = run_main(generate.main, argv)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_generation_and_evaluation(export_dir, capsys):
    code, out, err = run_cli(["--checkpoint", str(export_dir), "--prompt", "Once upon a time", "--max_length", "6",
                              "--num_samples", "2", "--seed", "4", "--json"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 2
    tok = load_tokenizer()
    for rec in lines:
        assert set(rec) == {"text", "completion", "completion_ids"}
        assert rec["text"] == "Once upon a time" + rec["completion"]
        assert tok.decode(rec["completion_ids"]) == rec["completion"]
        assert 1 <= len(rec["completion_ids"]) <= 6
    code, out2, _ = run_cli(["--checkpoint", str(export_dir), "--prompt", "Once upon a time", "--max_length", "6",
                             "--num_samples", "2", "--seed", "4", "--json", "--backend", "jax"], capsys)
    assert code == 0 and out2 == out  # same checkpoint, same seed: same samples in JAX
    code, out, err = run_cli(["--checkpoint", str(export_dir), "--eval_text", TEXT, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert {"tokens", "nll", "perplexity", "expert_utilization"} <= set(result)
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert "evaluating: 100%" in err  # the progress bar goes to stderr, stdout stays one JSON object
    code, out, err = run_cli(["--checkpoint", str(export_dir), "--eval_text", TEXT], capsys)
    assert code == 0 and "perplexity" in out and "expert utilization" in out and "router_H" in out


def test_cli_stream_prints_the_same_text(export_dir, capsys):
    args = ["--checkpoint", str(export_dir), "--prompt", "Once upon a time", "--max_length", "8", "--seed", "2"]
    code, plain, _ = run_cli(args, capsys)
    code2, streamed, _ = run_cli(args + ["--stream"], capsys)
    assert code == code2 == 0 and streamed == plain


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, export_dir):
    d = tmp_path_factory.mktemp("bad")
    (d / "no_text.csv").write_text("Title,Body\na,b\n")
    (d / "empty.csv").write_text("")
    (d / "blank.csv").write_text("Text\n \n\t\n")
    (d / "latin1.csv").write_bytes("Text\ncaf\xe9\n".encode("latin-1"))
    (d / "random.bin").write_bytes(b"just some bytes, not a checkpoint\n" * 8)
    raw = (export_dir / "model.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[:len(raw) // 2])
    (d / "config_only").mkdir()
    (d / "config_only" / "config.json").write_text("{}")
    (d / "binary.csv").write_bytes(b"Text\n\x00\x01\x02binary\n")
    for name, config in (("bad_json", "{not json"), ("bad_value", json.dumps({"hidden_size": -3})),
                         ("other_config", json.dumps(text_config(hidden_size=32, head_dim=16).to_dict()))):
        (d / name).mkdir()
        (d / name / "model.safetensors").write_bytes(raw)
        (d / name / "config.json").write_text(config)
    return d


BAD_INPUT = [
    # (id, argv after the program name (EXPORT / BAD are substituted), exit code, words in the message)
    ("top_p_zero", ["EXPORT", "--prompt", "x", "--top_p", "0"], 2, ["--top_p", "(0, 1]"]),
    ("top_p_big", ["EXPORT", "--prompt", "x", "--top_p", "1.5"], 2, ["--top_p"]),
    ("top_k_negative", ["EXPORT", "--prompt", "x", "--top_k", "-1"], 2, ["--top_k"]),
    ("temperature_negative", ["EXPORT", "--prompt", "x", "--temperature", "-0.5"], 2, ["--temperature"]),
    ("temperature_nan", ["EXPORT", "--prompt", "x", "--temperature", "nan"], 2, ["--temperature"]),
    ("max_length_zero", ["EXPORT", "--prompt", "x", "--max_length", "0"], 2, ["--max_length"]),
    ("max_length_text", ["EXPORT", "--prompt", "x", "--max_length", "ten"], 2, ["--max_length"]),
    ("num_samples_zero", ["EXPORT", "--prompt", "x", "--num_samples", "0"], 2, ["--num_samples"]),
    ("unknown_backend", ["EXPORT", "--prompt", "x", "--backend", "tf"], 2, ["--backend", "tf"]),
    ("unknown_flag", ["EXPORT", "--prompt", "x", "--topp", "0.9"], 2, ["--topp"]),
    ("nothing_to_do", ["EXPORT"], 2, ["--prompt", "--eval_text"]),
    ("stream_and_json", ["EXPORT", "--prompt", "x", "--stream", "--json"], 2, ["--stream", "--json"]),
    ("stride_zero", ["EXPORT", "--eval_text", "x", "--stride", "0"], 2, ["--stride"]),
    ("stride_beyond_context", ["EXPORT", "--eval_text", "x", "--stride", "33"], 2, ["--stride", "32"]),
    ("unknown_device", ["EXPORT", "--prompt", "x", "--device", "quantum"], 2, ["--device"]),
    ("prompt_too_long", ["EXPORT", "--prompt", "word " * 20, "--max_length", "20"], 2,
     ["context length is 32", "--max_length"]),
    ("missing_checkpoint", ["--checkpoint", "BAD/nope", "--prompt", "x"], 2, ["does not exist"]),
    ("not_a_checkpoint", ["--checkpoint", "BAD/random.bin", "--prompt", "x"], 2, ["not a Blues checkpoint"]),
    ("seed_name_no_step", ["--checkpoint", "BAD/model_iter_5.pt", "--prompt", "x"], 2,
     ["does not exist", "step 5", "step_00000005"]),
    ("truncated_export", ["--checkpoint", "BAD/truncated.safetensors", "--prompt", "x"], 1, ["truncated"]),
    ("dir_without_weights", ["--checkpoint", "BAD/config_only", "--prompt", "x"], 2, ["no Blues checkpoint"]),
    ("eval_file_missing", ["EXPORT", "--eval_file", "BAD/none.csv"], 1, ["does not exist"]),
    ("eval_file_no_text", ["EXPORT", "--eval_file", "BAD/no_text.csv"], 1, ["'Text'", "'Title', 'Body'"]),
    ("eval_file_empty", ["EXPORT", "--eval_file", "BAD/empty.csv"], 1, ["empty"]),
    ("eval_file_blank", ["EXPORT", "--eval_file", "BAD/blank.csv"], 1, ["blank"]),
    ("eval_file_not_utf8", ["EXPORT", "--eval_file", "BAD/latin1.csv"], 1, ["UTF-8"]),
    ("eval_file_binary", ["EXPORT", "--eval_file", "BAD/binary.csv"], 1, ["binary"]),
    ("eval_text_empty", ["EXPORT", "--eval_text", "  "], 2, ["--eval_text"]),
    ("config_not_json", ["--checkpoint", "BAD/bad_json", "--prompt", "x"], 1, ["config.json", "not valid JSON"]),
    ("config_bad_value", ["--checkpoint", "BAD/bad_value", "--prompt", "x"], 1, ["config.json", "'hidden_size'"]),
    ("config_mismatch", ["--checkpoint", "BAD/other_config", "--prompt", "x"], 1, ["config.json", "does not match"]),
    ("unknown_dtype", ["EXPORT", "--prompt", "x", "--dtype", "fp8"], 2, ["--dtype"]),
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_cli_bad_input_is_one_line(case, export_dir, bad_files, capsys):
    _, argv, want_code, words = case
    argv = [a.replace("BAD", str(bad_files)) for a in argv]
    argv = sum((["--checkpoint", str(export_dir)] if a == "EXPORT" else [a] for a in argv), [])
    code, out, err = run_cli(argv, capsys)
    assert code == want_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("generate.py: error: "), err
    assert "Traceback" not in err and out == ""
    for word in words:
        assert word in lines[0], lines[0]


def test_cli_subprocess_exit_codes_and_debug(export_dir):
    cmd = [sys.executable, str(REPO / "generate.py"), "--checkpoint", str(export_dir), "--prompt", "x", "--top_p", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "--top_p" in res.stderr
    res = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode != 0 and "Traceback" in res.stderr  # --debug lets the traceback through


def test_pickle_payload_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {"embed": torch.zeros(2, 2)}, "extra": Payload()}, path)
    code, out, err = run_cli(["--checkpoint", str(path), "--prompt", "x"], capsys)
    assert code == 1 and "refused" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


# ---- checkpoints of the trainers -----------------------------------------------------------------

def test_reads_a_train_jax_checkpoint_and_runs_it_in_torch(tmp_path, text_arrays):
    """A checkpoint written by train_jax.py's own Checkpointer: --backend auto picks JAX, torch can run it."""
    from flax import nnx

    import train_jax
    cfg, arrays = text_arrays
    model = from_canonical(arrays, cfg, "jax")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    checkpointer = train_jax.Checkpointer((tmp_path / "run" / "checkpoints").resolve(), 2, True)
    checkpointer.save(7, params, {}, {}, {"step": 7, "model_config": cfg.to_dict(), "train_args": {}})
    checkpointer.close()
    jm = generate.load_model(str(tmp_path / "run"))
    assert jm.backend == "jax" and "step_00000007" in jm.source
    tm = generate.load_model(str(tmp_path / "run" / "checkpoints" / "model_iter_7.pt"), backend="torch")
    restored = to_canonical(tm.model)
    for name, value in arrays.items():  # bit-exact through Orbax and the canonical layout
        assert np.array_equal(restored[name], value), name
    greedy = dict(max_length=10, temperature=0.0, top_p=1.0, top_k=0)
    assert generate.sample_text(jm, "Once upon", **greedy) == generate.sample_text(tm, "Once upon", **greedy)


def test_reads_a_pt_state_dict_with_config_json_next_to_it(tmp_path, text_arrays):
    """A bare bfloat16 state dict by layout path (padded embedding), its config in config.json beside it."""
    from blues.canonical import to_module_arrays

    cfg, arrays = text_arrays
    module = to_module_arrays(arrays, cfg)
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in module.items()}, tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(cfg.to_json())
    lm = generate.load_model(str(tmp_path / "weights.pt"), backend="auto", device="cpu")
    assert lm.backend == "torch" and lm.source.endswith("(pt)")
    restored = to_canonical(lm.model)
    for name, value in arrays.items():  # exactly the bf16 values, widened to float32
        assert np.array_equal(restored[name], torch.from_numpy(value).to(torch.bfloat16).float().numpy()), name


# The seed README's example commands, verbatim.
SEED_COMMANDS = [
    'python generate.py --checkpoint checkpoints/model_iter_1000.pt --prompt "Once upon a time"',
    'python generate.py --checkpoint checkpoints/model_iter_1000.pt \\\n    --prompt "The future of AI is" \\\n'
    '    --max_length 200 \\\n    --temperature 0.9 \\\n    --top_p 0.95 \\\n    --top_k 40',
    'python generate.py --checkpoint checkpoints/model_iter_1000.pt \\\n'
    '    --eval_text "This is a test sentence to evaluate the model\'s perplexity."',
]


@pytest.mark.slow
def test_seed_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    """Train briefly with train_torch.py, put the checkpoint where the seed README's commands look for
    it (a `.pt` state dict with its config, the seed's format), and run the commands verbatim."""
    cfg = text_config(max_position_embeddings=256, num_layers=1)  # 256: the seed's context, fits --max_length 200
    overrides = {k: v for k, v in cfg.to_dict().items() if v != BluesConfig().to_dict()[k]}
    run = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(REPO / "train_torch.py"), "--config", json.dumps(overrides), "--max_steps", "2",
         "--batch_size", "1", "--eval_every", "2", "--eval_batches", "1", "--save_every", "2", "--out_dir", str(run)],
        capture_output=True, text=True, cwd=REPO, env=dict(os.environ, BLUES_CACHE=str(tmp_path / "cache")))
    assert train.returncode == 0, train.stderr[-2000:]
    step_dir = run / "checkpoints" / "step_00000002"
    weights, _ = read_safetensors(step_dir / "model.safetensors")
    state = json.loads((step_dir / "trainer_state.json").read_text())
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}, "config": state["model_config"]},
               tmp_path / "checkpoints" / "model_iter_1000.pt")
    monkeypatch.chdir(tmp_path)
    for command in SEED_COMMANDS:
        argv = shlex.split(command.replace("\\\n", " "))
        assert argv[:2] == ["python", "generate.py"]
        code, out, err = run_cli(argv[2:], capsys)
        assert code == 0, err
        if "--eval_text" in argv:
            assert "perplexity" in out
        else:
            prompt = argv[argv.index("--prompt") + 1]
            assert out.startswith(prompt)
    # The trainer's own run directory and the seed-style name for its step work too, in both frameworks.
    greedy = ["--prompt", "Once upon a time", "--max_length", "20", "--temperature", "0", "--json"]
    outs = []
    for checkpoint, backend in ((run, "auto"), (run / "checkpoints" / "model_iter_2.pt", "jax")):
        code, out, err = run_cli(["--checkpoint", str(checkpoint), "--backend", backend, *greedy], capsys)
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    # And one command as a real process, from the directory the README assumes.
    res = subprocess.run([sys.executable, str(REPO / "generate.py"), *shlex.split(SEED_COMMANDS[0])[2:],
                          "--max_length", "5"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Once upon a time")

"""The benchmark's fast-path checks (bench/checks.py) can fail: each planted bug makes the check fail
on the figure that bug moves, and the real paths pass.

On a CPU the one fast path of either model is its attention (PyTorch: SDPA; JAX: XLA's) against the
reference attention, in bf16; every other fast path needs a GPU, so the bugs are planted through the
check's `fast_paths` hook, as a broken kernel would show them:
- wrong expert: tokens computed by the next expert (a permuted routing inside the expert compute);
- zeroed expert output: expert 0 contributes nothing;
- lost gradient path: the gate weights detached (the forward is unchanged; only gradients show it);
- wrong loss chunk: the first chunk's loss (and gradient) counted twice.
A two-layer toy with top-2 of 4 experts, one sequence of 64 tokens, chunks of 16 tokens.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

from bench import checks
from bench.train_step import random_batch
from blues.config import BluesConfig

CONFIG = BluesConfig(vocab_size=1000, max_position_embeddings=64, num_layers=2, hidden_size=64, head_dim=16,
                     num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                     embedding_multiplier_scale=2)
CHUNK = 16
IDS, TGT = random_batch(CONFIG, 1, 64, seed=0)


def _stop_gradient(x):
    if hasattr(x, "detach"):
        return x.detach()
    import jax
    return jax.lax.stop_gradient(x)


def planted(model_module, bug: str):
    """A fast_paths factory: `bug` planted into `model_module` (blues_torch.model / blues_jax.model)
    for the fast run only."""
    expert_mlp, chunked_lm_loss = model_module.expert_mlp, model_module.chunked_lm_loss

    def wrong_expert(x, indices, weights, keep, w_in, w_out, *rest, **kw):  # rest: the expert-parallel exchange
        return expert_mlp(x, (indices + 1) % CONFIG.tot_num_experts, weights, keep, w_in, w_out, *rest, **kw)

    def zeroed_expert(x, indices, weights, keep, w_in, w_out, *rest, **kw):  # rest: the expert-parallel exchange
        return expert_mlp(x, indices, weights * (indices != 0), keep, w_in, w_out, *rest, **kw)

    def lost_gradient(x, indices, weights, keep, w_in, w_out, *rest, **kw):  # rest: the expert-parallel exchange
        return expert_mlp(x, indices, _stop_gradient(weights), keep, w_in, w_out, *rest, **kw)

    def double_chunk(h, embed, targets, vocab_size, chunk_size, **kw):
        c = chunk_size // h.shape[0]  # positions of the first chunk (both frameworks chunk B x c tokens)
        first = chunked_lm_loss(h[:, :c], embed, targets[:, :c], vocab_size, chunk_size, **kw)
        return chunked_lm_loss(h, embed, targets, vocab_size, chunk_size, **kw) + first * (c / h.shape[1])

    name, fn = {"wrong expert": ("expert_mlp", wrong_expert), "zeroed expert": ("expert_mlp", zeroed_expert),
                "lost gradient": ("expert_mlp", lost_gradient), "wrong loss chunk": ("chunked_lm_loss", double_chunk)}[bug]
    return lambda model: mock.patch.object(model_module, name, fn)


# The figure each bug must fail on (others may fail too): the lost gradient changes no forward value.
FAILS_ON = {"wrong expert": ("layer", "grad"), "zeroed expert": ("layer", "grad"), "lost gradient": ("grad",),
            "wrong loss chunk": ("loss", "grad")}
BUGS = tuple(FAILS_ON)


def assert_fails_on(ok: bool, text: str, bug: str):
    assert not ok, f"{bug} passed: {text}"
    for figure in FAILS_ON[bug]:
        part = next(p for p in text.split(": ", 1)[1].split(", ") if p.startswith(figure + " "))
        assert "NOT <" in part, f"{bug}: {figure} did not fail: {text}"


def test_compare_flags_each_figure():
    """compare() alone: a fast probe equal to the reference passes; each figure pushed past its
    threshold fails, naming it; a missing gradient counts as 1.0."""
    rng = np.random.default_rng(0)
    layer = rng.standard_normal((1, 8, 4))
    routes = np.stack([np.argsort(rng.standard_normal((1, 8, 4)), -1)[..., :2]])  # [1, 1, 8, 2]
    exact = checks.Probe([layer], routes, 5.0, {"w": np.ones(3)})
    noisy = checks.Probe([layer * 1.001], routes, 5.001, {"w": np.ones(3) * 1.01})
    ok, text = checks.compare(noisy, noisy, exact)
    assert ok, text
    for bad, figure in ((checks.Probe([layer * 1.5], routes, 5.001, noisy.grads), "layer"),
                        (checks.Probe(noisy.layers, routes[..., ::-1] + 1, 5.001, noisy.grads), "routing"),
                        (checks.Probe(noisy.layers, routes, 6.0, noisy.grads), "loss"),
                        (checks.Probe(noisy.layers, routes, 5.001, {}), "grad")):
        ok, text = checks.compare(bad, noisy, exact)
        assert not ok and f"{figure} " in text.split("NOT <")[0].rsplit(", ", 1)[-1], text


# ---- PyTorch ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_inputs():
    import torch
    from blues_torch import BluesModel
    torch.manual_seed(0)
    model = BluesModel(CONFIG, loss_chunk_size=CHUNK)
    return model, torch.from_numpy(IDS).long(), torch.from_numpy(TGT).long()


def test_torch_model_check_passes_on_the_real_paths(torch_inputs):
    model, ids, tgt = torch_inputs
    ok, text = checks.check_torch_model_paths(model, ids, tgt)
    assert ok, text


@pytest.mark.parametrize("bug", BUGS)
def test_torch_model_check_catches(torch_inputs, bug):
    import blues_torch.model as tm
    model, ids, tgt = torch_inputs
    ok, text = checks.check_torch_model_paths(model, ids, tgt, fast_paths=planted(tm, bug))
    assert_fails_on(ok, text, bug)


def test_torch_compiled_check_passes_and_catches_a_lost_path(torch_inputs):
    """The compiled step through dynamo and AOTAutograd (aot_eager: no C++ build on a CPU), the whole
    model and block by block as train_torch.py --compile runs it, passes; a "compiler" whose step
    keeps the forward but loses every gradient path but the embedding's (what torch 2.11 did to the
    layers) fails on the gradients."""
    import types

    import torch
    model, ids, tgt = torch_inputs
    ok, text = checks.check_torch_compiled_gradients(model, ids, tgt,
                                                     compile_fn=lambda m: torch.compile(m, backend="aot_eager"))
    assert ok and text.startswith("compiled ") and "layer " in text, text

    def per_block(m):  # train_torch.py --compile's form (checks.training_compile), on aot_eager
        m.compile_blocks(backend="aot_eager")
        return m

    ok, text = checks.check_torch_compiled_gradients(model, ids, tgt, compile_fn=per_block)
    assert ok and text.startswith("compiled ") and "layer " in text, text
    assert model.compiled_block is None  # the check compiled its own copy

    def losing_compiler(m):
        def step(ids, tgt):
            out = m(ids, tgt)
            return types.SimpleNamespace(loss=out.loss.detach() + 0.0 * m.embed.sum(), expert_indices=out.expert_indices)
        return step

    ok, text = checks.check_torch_compiled_gradients(model, ids, tgt, compile_fn=losing_compiler)
    assert_fails_on(ok, text, "lost gradient")
    assert model.config.router_noise_std == CONFIG.router_noise_std  # the check works on a copy


# ---- JAX --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jax_probes():
    """The check's models and its reference and float32 runs, once: each test runs the fast path."""
    import jax.numpy as jnp
    model = checks.jax_check_model(CONFIG, IDS, loss_chunk_size=CHUNK)
    ids, tgt = jnp.asarray(IDS), jnp.asarray(TGT)
    return (model, ids, tgt, checks.jax_probe(model, ids, tgt, "reference"),
            checks.jax_probe(model, ids, tgt, "float32"))


@pytest.mark.slow
def test_jax_model_check_passes_and_catches_each_bug(jax_probes):
    import blues_jax.model as jm
    model, ids, tgt, reference, exact = jax_probes
    ok, text = checks.compare(checks.jax_probe(model, ids, tgt, "fast"), reference, exact)
    assert ok, text
    for bug in BUGS:
        fast = checks.jax_probe(model, ids, tgt, "fast", fast_paths=planted(jm, bug))
        assert_fails_on(*checks.compare(fast, reference, exact), bug)

"""The trainers' evaluation: one forward per batch with the loss computed chunk by chunk (no
[B, T, V] logits), equal to the materialised loss, in both frameworks; the samples' batched forward."""
from __future__ import annotations

import contextlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import blues_jax.model as jax_model
import blues_torch.model as torch_model
from blues.data import eval_batches
from blues.train_args import parse_args
from blues_jax import BluesModel as JaxModel
from blues_jax.loss import cross_entropy as jax_cross_entropy
from blues_jax.sharding import make_mesh
from blues_jax.training import evaluate as jax_evaluate
from blues_jax.training import NextLogits, make_eval_step, plan_train_state, split_model
from blues_torch import BluesModel as TorchModel
from blues_torch.distributed import Dist
from blues_torch.loss import cross_entropy as torch_cross_entropy
from blues_torch.training import evaluate as torch_evaluate

# Small widths, the real 200k vocabulary: the case where materialised logits cost the most.
CONFIG = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "num_layers": 2,
          "max_position_embeddings": 32, "tot_num_experts": 4, "embedding_multiplier_scale": 2,
          "router_noise_std": 0.0}
BATCH, SEQ, BATCHES = 4, 32, 2


def _args(framework: str, tmp_path):
    return parse_args(["--config", json.dumps(CONFIG), "--batch_size", str(BATCH),
                       "--eval_batches", str(BATCHES), "--out_dir", str(tmp_path)], framework)


def _tokens(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab_size, 16 * BATCH * (SEQ + 1)).astype(np.int32)


def _no_materialised_logits(monkeypatch, module):
    def refuse(*_, **__):
        raise AssertionError("evaluation materialised the [B, T, V] logits")
    monkeypatch.setattr(module, "lm_head_logits", refuse)


def test_torch_evaluation_runs_one_chunked_forward_per_batch(tmp_path, monkeypatch):
    args = _args("torch", tmp_path)
    assert args.seq_len == SEQ
    cfg, tokens = args.model_config, _tokens(args.model_config.vocab_size)
    torch.manual_seed(0)
    model = TorchModel(cfg)
    batches = list(eval_batches(tokens, SEQ, BATCH, BATCHES, vocab_size=cfg.vocab_size))
    model.eval()
    with torch.no_grad():  # the materialised loss of each batch, token-weighted (equal-sized batches)
        want = np.mean([torch_cross_entropy(model(torch.from_numpy(x).long()).logits, torch.from_numpy(y).long()).item()
                        for x, y in batches])
    forwards = []
    model.final_norm.register_forward_hook(lambda *_: forwards.append(1))
    _no_materialised_logits(monkeypatch, torch_model)
    acc = torch_evaluate(model, tokens, args, Dist(False), contextlib.nullcontext)
    assert len(forwards) == BATCHES
    # float32 throughout: the chunked and materialised sums differ by summation order only
    assert acc.loss == pytest.approx(want, rel=1e-6)
    assert acc.tokens == BATCHES * BATCH * SEQ


def test_jax_evaluation_runs_one_chunked_forward_per_batch(tmp_path, monkeypatch):
    args = _args("jax", tmp_path)
    cfg, tokens = args.model_config, _tokens(args.model_config.vocab_size)
    mesh = make_mesh("data=1", jax.devices()[:1])
    plan = plan_train_state(cfg, mesh, seed=0, dtype=jnp.float32, lr=1e-3, weight_decay=0.0)
    model = JaxModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    model.set_attributes(mesh=mesh, raise_if_not_found=False)
    (_, eval_graph, _), params, rng = split_model(model)
    params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)
    model = nnx.merge(eval_graph, params, rng)
    with jax.default_matmul_precision("float32"):
        want = np.mean([float(jax_cross_entropy(model(jnp.asarray(x)).logits, jnp.asarray(y)))
                        for x, y in eval_batches(tokens, SEQ, BATCH, BATCHES, vocab_size=cfg.vocab_size)])
        _no_materialised_logits(monkeypatch, jax_model)
        topo = {"process": 0, "processes": 1, "dp": 1, "local_devices": 1, "local_batch": BATCH}
        acc = jax_evaluate(make_eval_step(eval_graph, plan.shardings), params, rng, tokens, args, topo,
                           plan.shardings)
    assert acc.loss == pytest.approx(want, rel=1e-5)
    assert acc.tokens == BATCHES * BATCH * SEQ and math.isfinite(acc.loss)


def test_jax_sample_logits_come_from_one_padded_shape():
    """NextLogits runs every sample forward at [rows, window] (one compile), each row's logits its
    unpadded forward's last ones (as blues_torch's make_next_logits, tests/test_torch_model.py)."""
    cfg = parse_args(["--config", json.dumps(CONFIG)], "jax").model_config
    mesh = make_mesh("data=1", jax.devices()[:1])
    model = JaxModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
    (_, _, sample_graph), params, rng = split_model(model)
    params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)
    sampler = NextLogits(sample_graph, {"replicated": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())},
                         window=16)
    next_logits = sampler.bind(params, rng)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    plain = nnx.merge(sample_graph, params, rng)
    with jax.default_matmul_precision("float32"):
        for lengths in ((1, 7), (16, 3)):
            got = next_logits([ids[i, :t] for i, t in enumerate(lengths)])  # [2, V]
            want = [np.asarray(plain(jnp.asarray(ids[i:i + 1, :t])).logits[0, -1]) for i, t in enumerate(lengths)]
            np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
    assert sampler.last_logits._cache_size() == 1  # one shape, one compile

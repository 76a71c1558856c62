"""blues_jax on a device mesh: expert parallelism over 8 CPU devices (tests/conftest.py sets
XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported).

Sharded and single-device runs compute the same function; they differ only in the order of
float32 sums (per-device partial sums, psums of gradients), so 1e-5 absolute on O(1) values.
Routing and capacity decisions are integers and must match exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from blues.config import BluesConfig
from blues.errors import BluesError
from blues_jax import BluesModel, make_mesh, shard_batch, shard_model
from blues_jax.experts import capacity_keep, expert_mlp
from blues_jax.sharding import param_shardings

jax.config.update("jax_default_matmul_precision", "highest")

CFG = BluesConfig(vocab_size=300, max_position_embeddings=16, num_layers=2, hidden_size=32, head_dim=8,
                  num_attention_heads=4, num_key_value_heads=2, tot_num_experts=8, chosen_num_experts=2,
                  embedding_multiplier_scale=2, router_noise_std=0.1, dropout=0.1)


def _batch(b=8, t=8, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    targets = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    targets[0, :3] = -100
    return ids, targets


def _step(graphdef, state, ids, targets):
    """Loss, outputs and gradients of a training step, as a pure function of the state."""
    def loss_fn(model):
        out = model(ids, targets)
        return out.loss, out
    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(nnx.merge(graphdef, state))
    return loss, out, grads


def _compiled_step(model, ids, targets):
    graphdef, state = nnx.split(model)
    compiled = jax.jit(_step, static_argnums=0).lower(graphdef, state, ids, targets).compile()
    return compiled, compiled(state, ids, targets)


def test_make_mesh_shapes():
    assert dict(make_mesh("data=2,expert=4").shape) == {"data": 2, "expert": 4}
    assert dict(make_mesh({"expert": 8}).shape) == {"data": 1, "expert": 8}  # omitted axes are 1
    assert dict(make_mesh(" data = 8 ").shape) == {"data": 8, "expert": 1}


@pytest.mark.parametrize("spec, message", [
    ("data=2,model=4", "unknown axis 'model'"),
    ("data=3,expert=2", "6 devices but 8 are available"),
    ("data=2,expert=2", "4 devices but 8 are available"),
    ("data=2;expert=4", "not of the form axis=size"),
    ("data=0,expert=8", "positive integer size"),
    ("data=2,data=4", "given twice"),
    ({"data": 2, "expert": "4"}, "positive integer size"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(BluesError, match=message):
        make_mesh(spec)


def test_shard_model_splits_experts_over_mesh():
    mesh = make_mesh("data=2,expert=4")
    model = shard_model(BluesModel(CFG, rngs=nnx.Rngs(0)), mesh)
    e = CFG.tot_num_experts
    for layer in model.layers:
        for param in (layer.moe.w_in, layer.moe.w_out):
            value = param.get_value()
            assert value.sharding.spec[0] == "expert"
            shards = value.addressable_shards
            assert len(shards) == 8 and all(s.data.shape[0] == e // 4 for s in shards)  # E/4 experts each
            # devices along "expert" hold different experts; along "data" the same ones
            starts = {s.device: s.index[0].start for s in shards}
            for i in range(2):
                assert sorted(starts[d] for d in mesh.devices[i]) == [0, 2, 4, 6]
        assert layer.attn.q.get_value().sharding.is_fully_replicated
        assert layer.moe.router.get_value().sharding.is_fully_replicated
    assert model.embed.get_value().sharding.is_fully_replicated
    # the sharding tree fits the state (jit in/out_shardings, checkpoint restore)
    tree = param_shardings(nnx.state(model), mesh)
    assert jax.tree.structure(tree) == jax.tree.structure(nnx.state(model))


def test_shard_model_rejects_indivisible_experts():
    model = BluesModel(dataclasses.replace(CFG, tot_num_experts=6), rngs=nnx.Rngs(0))
    with pytest.raises(BluesError, match="cannot be split 4 ways"):
        shard_model(model, make_mesh("data=2,expert=4"))


def test_shard_batch_splits_and_rejects_indivisible():
    mesh = make_mesh("data=2,expert=4")
    ids, _ = _batch()
    sharded = shard_batch(ids, mesh)
    assert [s.data.shape for s in sharded.addressable_shards] == [(1, 8)] * 8
    with pytest.raises(BluesError, match="batch size 6"):
        shard_batch(ids[:6], mesh)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_sharded_step_matches_single_device_mesh(capacity_factor):
    cfg = dataclasses.replace(CFG, capacity_factor=capacity_factor)
    ids, targets = _batch()
    single = BluesModel(cfg, rngs=nnx.Rngs(0))
    _, (loss0, out0, grads0) = _compiled_step(single, ids, targets)

    mesh = make_mesh("data=2,expert=4")
    sharded = shard_model(BluesModel(cfg, rngs=nnx.Rngs(0)), mesh)
    compiled, (loss1, out1, grads1) = _compiled_step(sharded, *shard_batch((ids, targets), mesh))
    # the experts really are split: tokens travel to them by all-to-all
    assert "all-to-all" in compiled.as_text()
    assert grads1["layers"][0]["moe"]["w_in"].get_value().sharding.spec[0] == "expert"

    assert float(loss1) == pytest.approx(float(loss0), abs=1e-5)
    for name in ("expert_indices", "expert_counts", "dropped"):  # routing decisions: exact
        np.testing.assert_array_equal(np.asarray(getattr(out1, name)), np.asarray(getattr(out0, name)), err_msg=name)
    if capacity_factor is not None:
        assert int(np.asarray(out0.dropped).sum()) > 0  # the capacity binds
    flat0, flat1 = nnx.to_flat_state(grads0), dict(nnx.to_flat_state(grads1))
    for path, g0 in flat0:
        np.testing.assert_allclose(np.asarray(flat1[path].get_value()), np.asarray(g0.get_value()),
                                   atol=1e-5, err_msg=str(path))


def test_data_only_mesh_matches_single_device():
    cfg = dataclasses.replace(CFG, capacity_factor=1.0, router_noise_std=0.0, dropout=0.0)
    ids, targets = _batch()

    @nnx.jit
    def forward(model, ids, targets):
        return model(ids, targets)

    single = BluesModel(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh("data=8")
    sharded = shard_model(BluesModel(cfg, rngs=nnx.Rngs(0)), mesh)
    for m in (single, sharded):
        m.eval()
    out0 = forward(single, ids, targets)
    out1 = forward(sharded, *shard_batch((ids, targets), mesh))
    np.testing.assert_allclose(np.asarray(out1.logits), np.asarray(out0.logits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out1.dropped), np.asarray(out0.dropped))


def test_sharded_capacity_drops_match_unsharded_mesh():
    # Skewed routing (expert 0 popular, so shards disagree on its load) over 64 tokens, k = 3.
    mesh = make_mesh("data=2,expert=4")
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((64, 8)) + np.where(np.arange(8) == 0, 2.0, 0.0)
    logits[:24, 3] += 3.0  # the first shards also love expert 3
    indices = np.argsort(-logits, axis=1, kind="stable")[:, :3].astype(np.int32)
    for capacity in (5, 17, 30):
        want = np.asarray(jax.jit(lambda i: capacity_keep(i, 8, capacity))(indices))
        got = np.asarray(jax.jit(lambda i: capacity_keep(i, 8, capacity, mesh=mesh))(shard_batch(indices, mesh)))
        np.testing.assert_array_equal(got, want, err_msg=f"capacity {capacity}")
        assert 0 < want.sum() < want.size  # some kept, some refused

    # and expert_mlp with those decisions, experts split over the mesh
    x = rng.standard_normal((64, 16)).astype(np.float32)
    w_in = (rng.standard_normal((8, 16, 12)) / 4).astype(np.float32)
    w_out = (rng.standard_normal((8, 6, 16)) / 4).astype(np.float32)
    weights = rng.uniform(0.1, 1.0, (64, 3)).astype(np.float32)

    def run(x, indices, weights, w_in, w_out, mesh=None):
        keep = capacity_keep(indices, 8, 17, mesh=mesh)
        return expert_mlp(x, indices, weights, keep, w_in, w_out, capacity=17, mesh=mesh)

    want = jax.jit(run)(x, indices, weights, w_in, w_out)
    got = jax.jit(lambda *a: run(*a, mesh=mesh))(x, indices, weights, w_in, w_out)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)

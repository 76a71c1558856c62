"""The JAX training step's update rule (blues_jax/training.py) against PyTorch's, piece by piece, in this process (fast, one device).

- clip_by_global_norm is torch.nn.utils.clip_grad_norm_ (same norm, same 1e-6, same clamp);
- make_optimizer's optax AdamW is torch.optim.AdamW with the same param groups (decay on
  matrices only), betas, eps and per-step learning rate: same bias correction, decoupled decay;
- the compiled step's gradient accumulation (G micro-batches of B) equals one batch of G*B when the
  loss is a mean over tokens (router noise, dropout and the non-linear balancing loss off);
- the step compiled ahead from TrainPlan's abstract state (train_jax.py does so while the weights
  are drawn) is the program the first real call runs: no second trace or compile.

The optimizer comparison is float32 against float32, the same formula with its operations in a
different order (torch computes lr/bias_correction in float64 on the host), so agreement is to a
few ulps: 1e-6 relative on the parameters after 6 steps.
"""
import json
import logging

import numpy as np
import pytest

from blues.adamw import BETAS, EPS
from blues.train_args import parse_args
from blues_jax import training




def test_clip_matches_torch_clip_grad_norm():
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(7, 5)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    for max_norm in (0.5, 100.0, 0.0):
        got, norm = training.clip_by_global_norm({k: jnp.asarray(v) for k, v in grads.items()}, max_norm)
        tensors = [torch.nn.Parameter(torch.zeros(v.shape)) for v in grads.values()]
        for t, v in zip(tensors, grads.values()):
            t.grad = torch.from_numpy(v.copy())
        ref_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm if max_norm > 0 else float("inf"))
        assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
        for t, k in zip(tensors, grads):
            np.testing.assert_allclose(np.asarray(got[k]), t.grad.numpy(), rtol=1e-6, atol=0)
    assert float(norm) > 1  # the last case (0 = off) left a large gradient alone


def test_optax_adamw_matches_torch_adamw():
    import jax
    import jax.numpy as jnp
    import optax
    import torch

    from blues.schedule import learning_rate

    args = parse_args(["--lr", "3e-2", "--min_lr", "1e-3", "--warmup_steps", "2", "--max_steps", "6",
                       "--weight_decay", "0.1"], "jax")
    rng = np.random.default_rng(1)
    init = {"w": rng.normal(size=(6, 4)).astype(np.float32), "scale": rng.normal(size=(4,)).astype(np.float32)}
    params = {k: jnp.asarray(v) for k, v in init.items()}
    tx = training.make_optimizer(params, lr=args.lr, weight_decay=args.weight_decay)
    state = tx.init(params)

    w, scale = (torch.nn.Parameter(torch.from_numpy(init[k].copy())) for k in ("w", "scale"))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [scale], "weight_decay": 0.0}],
                            lr=args.lr, betas=BETAS, eps=EPS)

    @jax.jit
    def update(params, state, grads, lr):
        state = state._replace(hyperparams=dict(state.hyperparams, learning_rate=lr))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for step in range(6):
        lr = learning_rate(step, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                           max_steps=args.max_steps)
        grads = {k: rng.normal(size=v.shape).astype(np.float32) * 10 ** rng.uniform(-3, 1) for k, v in init.items()}
        params, state = update(params, state, {k: jnp.asarray(v) for k, v in grads.items()}, np.float32(lr))
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad, scale.grad = torch.from_numpy(grads["w"]), torch.from_numpy(grads["scale"])
        opt.step()
        np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(params["scale"]), scale.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(params["w"]), init["w"])


def test_gradient_accumulation_equals_one_big_batch():
    import jax

    from blues_jax.sharding import make_mesh

    fields = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_layers": 1, "max_position_embeddings": 8, "tot_num_experts": 4, "embedding_multiplier_scale": 2,
              "router_noise_std": 0.0, "dropout": 0.0, "router_aux_loss_coef": 0.0}
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    rng = np.random.default_rng(2)
    x = rng.integers(0, 50_000, size=(4, 8)).astype(np.int32)  # 4 sequences of 8 tokens
    y = rng.integers(0, 50_000, size=(4, 8)).astype(np.int32)
    results = {}
    for g in (1, 2):
        args = parse_args(["--config", json.dumps(fields), "--grad_accum", str(g), "--batch_size", str(4 // g)], "jax")
        graphs, tx, shardings, params, opt_state, rng_state = training.build_train_state(
            args.model_config, mesh, seed=args.seed, dtype=training.run_dtype(args.precision), lr=args.lr,
            weight_decay=args.weight_decay)
        step = training.make_train_step(graphs[0], tx, shardings, grad_accum=args.grad_accum, grad_clip=args.grad_clip,
                                        weight_decay=args.weight_decay)
        xs = training.put_batch(x.reshape(g, 4 // g, 8), shardings["micro_batches"], (g, 4 // g, 8))
        ys = training.put_batch(y.reshape(g, 4 // g, 8), shardings["micro_batches"], (g, 4 // g, 8))
        params, opt_state, rng_state, out = step(params, opt_state, rng_state, xs, ys, np.float32(1e-2),
                                                 np.bool_(False))
        results[g] = (np.asarray(out["losses"]), float(out["grad_norm"]),
                      {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)})
    (l1, n1, p1), (l2, n2, p2) = results[1], results[2]
    # loss, lm_loss, z_loss: means over tokens, so a mean of micro-batch means is the batch mean; the
    # balancing loss (reported, weight 0 here) is a product of two batch means and is not.
    np.testing.assert_allclose(l2[[0, 1, 3]], l1[[0, 1, 3]], rtol=1e-6)
    assert n2 == pytest.approx(n1, rel=1e-5)
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=1e-6, err_msg=str(k))


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_step_compiled_ahead_is_the_one_the_first_step_runs():
    """The train state init_train_state makes, passed as JaxTrainer.step passes it with its batches
    and host scalars, has exactly train_step_arguments' shapes, dtypes, weak types and shardings:
    the first call traces and compiles nothing (a mismatch would trace, lower and load the step a
    second time on the critical path)."""
    import jax

    from blues_jax.distributed import topology
    from blues_jax.precompile import BackgroundCompile
    from blues_jax.sharding import make_mesh

    fields = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_layers": 1, "max_position_embeddings": 8, "tot_num_experts": 4, "embedding_multiplier_scale": 2}
    args = parse_args(["--config", json.dumps(fields), "--grad_accum", "2", "--batch_size", "2"], "jax")
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    topo = topology(mesh, args.batch_size)
    plan = training.plan_train_state(args.model_config, mesh, seed=args.seed, dtype=training.run_dtype("bf16"),
                                     lr=args.lr, weight_decay=args.weight_decay)
    step = training.make_train_step(plan.graphs[0], plan.tx, plan.shardings, grad_accum=args.grad_accum,
                                    grad_clip=args.grad_clip, weight_decay=args.weight_decay)
    records, jax_logger, logged = _Records(), logging.getLogger("jax"), jax.config.jax_log_compiles
    jax_logger.addHandler(records)
    jax.config.update("jax_log_compiles", True)  # process-wide: the background thread's compile logs too
    try:
        with BackgroundCompile([(step, training.train_step_arguments(plan, args, topo))]) as ahead:
            params, opt_state, rng = training.init_train_state(plan, mesh)
        assert not ahead.failures
        assert any("Finished tracing step" in m for m in records.messages)  # the ahead compile logs
        shape = training.micro_batch_shape(args, topo)
        batch = training.put_batch(np.zeros(shape, np.int32), plan.shardings["micro_batches"], shape)
        records.messages.clear()
        out = step(params, opt_state, rng, batch, batch, np.float32(1e-2), np.bool_(False))[3]
    finally:
        jax.config.update("jax_log_compiles", logged)
        jax_logger.removeHandler(records)
    assert np.isfinite(np.asarray(out["losses"])).all()
    assert not [m for m in records.messages if "step" in m], records.messages

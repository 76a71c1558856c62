"""The JAX training step: the optimizer, the compiled step, evaluation and the train state.
train_jax.py's loop (blues/loop.py) and the benchmark (bench/train_step.py) run this same step, so a
benchmark figure is what training runs.

Optimizer: optax AdamW with blues/adamw.py's betas, eps and decay rule (decoupled weight decay on
matrices only): torch.optim.AdamW's update (tests/test_train_jax_step.py). The learning rate of each
step comes from blues/schedule.py on the host (step-indexed like train_torch.py, so a skipped step does
not shift the schedule, while Adam's bias correction counts applied updates, like torch). Gradients are
clipped by global norm as torch's clip_grad_norm_ does (coef = max_norm / (norm + 1e-6), at most 1);
`grad_norm` is the norm before clipping. Gradient accumulation averages the micro-batch losses (a
lax.scan inside the step). `--precision bf16`: bf16 matmuls, float32 parameters, gradients and
optimizer state. A non-finite loss or gradient norm leaves the parameters and optimizer state as they
were, inside the compiled step.

Parallelism: one `jax.jit` step with explicit input/output shardings (parameters by
blues_jax/sharding.py's logical-axis rules, the batch over every device of the mesh, optimizer moments
like their parameters) and donated state buffers.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from blues.adamw import BETAS, EPS, decays
from blues.canonical import flatten, from_module_arrays
from blues.config import BluesConfig
from blues.data import eval_batches
from blues.train_args import TrainArgs
from blues.train_loop import SAMPLES, EvalAccumulator
from blues_jax import BluesModel
from blues_jax.checkpoint import data_to_keys, keys_to_data, restore_arrays
from blues_jax.distributed import gather_to_host
from blues_jax.sharding import BATCH_AXES, mesh_is_trivial, param_shardings, shard_model
from blues_jax.state_dict_adapter import load_canonical

# ---- the optimizer and the step ---------------------------------------------------------------------

def make_optimizer(params, *, lr: float, weight_decay: float):
    """optax AdamW whose learning rate (and weight decay) each step sets from the host.

    inject_hyperparams keeps them in the optimizer state, so the compiled step takes this step's lr
    from blues.schedule as an argument: the same float train_torch.py puts in its param groups.
    """
    decay_mask = jax.tree.map(lambda p: decays(p.ndim), params)
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=weight_decay, mask=decay_mask)


def clip_by_global_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms; scale by
    min(1, max_norm / (norm + 1e-6)); max_norm 0 = no clipping. Returns (grads, norm before clipping)."""
    norm = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in jax.tree.leaves(grads)]))
    if max_norm > 0:
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        grads = jax.tree.map(lambda g: g * coef, grads)
    return grads, norm


def make_train_step(graph, tx, shardings: dict, *, grad_accum: int, grad_clip: float, weight_decay: float):
    """The compiled optimizer step: (params, opt_state, rng, inputs [G, B, T], targets [G, B, T], lr,
    inject_nan) -> (params, opt_state, rng, {"losses": [4], "grad_norm"}). State buffers are donated; a
    non-finite loss or gradient norm leaves params and optimizer state as they were (the RNG streams
    still advance). G = grad_accum micro-batches."""

    def micro_loss(params, rng, x, y, inject):
        model = nnx.merge(graph, params, rng)
        out = model(x, y)  # x, y [B, T]
        rng = nnx.to_pure_dict(nnx.state(model, nnx.RngState))  # the streams advanced by this call
        # --inject_nan: a NaN factor before the backward (not jnp.where(inject, loss * nan, loss), whose
        # gradient is NaN either way: the unselected branch's cotangent 0 times d(loss * nan) = nan)
        loss = out.loss * jnp.where(inject, jnp.nan, 1.0)
        losses = jnp.stack([loss, out.lm_loss, out.aux_loss, out.z_loss])  # [4], as logged
        return loss / grad_accum, (rng, losses)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(params, opt_state, rng, inputs, targets, lr, inject):
        def micro(carry, batch):  # one micro-batch: gradients summed, like repeated torch backward()
            grads, rng = carry
            g, (rng, losses) = grad_fn(params, rng, batch[0], batch[1], inject)
            return (jax.tree.map(jnp.add, grads, g), rng), losses

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, rng), losses = jax.lax.scan(micro, (zeros, rng), (inputs, targets))  # losses [G, 4]
        losses = jnp.mean(losses, axis=0)  # [4]: loss, lm_loss, aux_loss, z_loss
        grads, grad_norm = clip_by_global_norm(grads, grad_clip)
        hyper = dict(opt_state.hyperparams, learning_rate=lr, weight_decay=jnp.float32(weight_decay))
        opt_state = opt_state._replace(hyperparams=hyper)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(losses[0]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        return (keep(new_params, params), keep(new_opt_state, opt_state), rng,
                {"losses": losses, "grad_norm": grad_norm})

    s = shardings
    return jax.jit(step, donate_argnums=(0, 1, 2),
                   in_shardings=(s["params"], s["opt_state"], s["rng"], s["micro_batches"], s["micro_batches"],
                                 s["replicated"], s["replicated"]),
                   out_shardings=(s["params"], s["opt_state"], s["rng"], s["replicated"]))


# ---- the model and its state ------------------------------------------------------------------------

def model_factory(config: BluesConfig, *, seed: int, dtype, attn_impl: str = "auto", remat: bool = False,
                  scan_layers: bool = False) -> Callable[[], BluesModel]:
    """The function that builds the model with its random weights. The seed fixes the weights and the
    router-noise and dropout streams, whatever the mesh (threefry keys are sharding-invariant)."""

    def make():
        key = jax.random.key(seed)
        rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), noise=jax.random.fold_in(key, 1),
                        dropout=jax.random.fold_in(key, 2))
        return BluesModel(config, rngs=rngs, attn_impl=attn_impl, remat=remat, scan_layers=scan_layers, dtype=dtype)

    return make


def lower_init(make: Callable[[], BluesModel], mesh) -> tuple[nnx.GraphDef, nnx.State, jax.stages.Lowered]:
    """The model's graph, its abstract state and its initialisation: one program that draws every
    weight straight into its sharding (not op by op on one device), lowered but not yet compiled.
    The threefry flag (`threefry_kernel`) is process-wide and read while lowering, so it is set
    only here."""
    graph, abstract = nnx.split(nnx.eval_shape(make))
    with threefry_kernel(mesh_is_trivial(mesh)):
        init = jax.jit(lambda: nnx.state(make()), out_shardings=param_shardings(abstract, mesh)).lower()
    return graph, abstract, init


def materialise(graph: nnx.GraphDef, init: jax.stages.Lowered, mesh, init_arrays: dict | None = None):
    """Compile and run the initialisation; `init_arrays` (canonical weights, --init_from) replace the
    random ones; the model is placed on the mesh by blues_jax.sharding."""
    model = nnx.merge(graph, init.compile()())
    if init_arrays is not None:
        load_canonical(model, init_arrays)  # checked against the config in load_init_weights
    return shard_model(model, mesh)


def create_model(config: BluesConfig, mesh, *, seed: int, dtype, attn_impl: str = "auto", remat: bool = False,
                 scan_layers: bool = False, init_arrays: dict | None = None):
    """The model, initialised by one compiled program (`lower_init`) and placed on the mesh."""
    make = model_factory(config, seed=seed, dtype=dtype, attn_impl=attn_impl, remat=remat, scan_layers=scan_layers)
    graph, _, init = lower_init(make, mesh)
    return materialise(graph, init, mesh, init_arrays)


@contextlib.contextmanager
def threefry_kernel(on: bool):
    """Draw threefry bits with JAX's GPU kernel instead of XLA's inlined form: the same bits, and the
    bench model's initialisation (~100 draws) compiles in seconds instead of ~29 s on an H200. The
    kernel is one custom call that XLA cannot partition, so a mesh of several devices keeps the
    inlined form (each device draws only its shards). No effect off GPU."""
    before = jax.config.jax_threefry_gpu_kernel_lowering
    jax.config.update("jax_threefry_gpu_kernel_lowering", on or before)
    try:
        yield
    finally:
        jax.config.update("jax_threefry_gpu_kernel_lowering", before)


class TrainPlan(NamedTuple):
    """Everything the compiled steps need, known before any weight exists: the model's graphs (train,
    eval, one-device sampling), the optimizer, every sharding, the train state as abstract arrays
    (shapes, dtypes, shardings) and the lowered initialisation (`materialise` runs it)."""
    graphs: tuple
    tx: optax.GradientTransformation
    shardings: dict
    abstract: tuple  # (params, opt_state, rng)
    init: tuple  # (graph, lowered initialisation)


def plan_train_state(config: BluesConfig, mesh, *, seed: int, dtype, lr: float, weight_decay: float,
                     attn_impl: str = "auto", remat: bool = False, scan_layers: bool = False) -> TrainPlan:
    """The train state's TrainPlan, from the model's shapes alone (nothing is computed on a device):
    the training step can compile from it while the weights are drawn."""
    make = model_factory(config, seed=seed, dtype=dtype, attn_impl=attn_impl, remat=remat, scan_layers=scan_layers)
    graph, abstract_state, init = lower_init(make, mesh)
    model = nnx.merge(graph, abstract_state)
    model.set_attributes(mesh=mesh, raise_if_not_found=False)  # as shard_model leaves the real one
    graphs, params, rng = split_model(model)
    replicated = NamedSharding(mesh, P())
    shardings = {"params": nnx.to_pure_dict(param_shardings(params, mesh)),
                 "rng": jax.tree.map(lambda x: replicated, nnx.to_pure_dict(rng)),
                 "batch": NamedSharding(mesh, P(BATCH_AXES, None)),  # [B, T]
                 "micro_batches": NamedSharding(mesh, P(None, BATCH_AXES, None)),  # [G, B, T]
                 "replicated": replicated}
    params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)
    tx = make_optimizer(params, lr=lr, weight_decay=weight_decay)
    shardings["opt_state"] = _optimizer_shardings(tx, params, shardings["params"], replicated)
    abstract = (abstract_arrays(params, shardings["params"]),
                abstract_arrays(jax.eval_shape(tx.init, params), shardings["opt_state"]),
                abstract_arrays(rng, shardings["rng"]))
    return TrainPlan(graphs, tx, shardings, abstract, (graph, init))


def split_model(model) -> tuple[tuple, nnx.State, nnx.State]:
    """((train_graph, eval_graph, sample_graph), params, rng): the graphs in train mode, in eval mode,
    and in eval mode on one device (the samples: no mesh). Leaves the model in that last form."""
    model.train()
    train_graph, params, rng, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    assert not jax.tree.leaves(rest), "the model holds state that is neither a parameter nor an RNG stream"
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.RngState)[0]
    model.set_attributes(mesh=None, raise_if_not_found=False)
    sample_graph = nnx.split(model, nnx.Param, nnx.RngState)[0]
    return (train_graph, eval_graph, sample_graph), params, rng


def init_train_state(plan: TrainPlan, mesh, init_arrays: dict | None = None):
    """The plan's train state on the mesh: (params, opt_state, rng), a fresh optimizer state."""
    _, params, rng = split_model(materialise(*plan.init, mesh, init_arrays))
    params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)
    opt_state = jax.jit(plan.tx.init, out_shardings=plan.shardings["opt_state"])(params)
    return params, opt_state, rng


def build_train_state(config: BluesConfig, mesh, *, seed: int, dtype, lr: float, weight_decay: float,
                      attn_impl: str = "auto", remat: bool = False, scan_layers: bool = False,
                      init_arrays: dict | None = None):
    """`plan_train_state` and `init_train_state` in one:
    ((train_graph, eval_graph, sample_graph), tx, shardings, params, opt_state, rng)."""
    plan = plan_train_state(config, mesh, seed=seed, dtype=dtype, lr=lr, weight_decay=weight_decay,
                            attn_impl=attn_impl, remat=remat, scan_layers=scan_layers)
    return (plan.graphs, plan.tx, plan.shardings, *init_train_state(plan, mesh, init_arrays))


def run_dtype(precision: str):
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def _optimizer_shardings(tx, params, param_shardings, replicated):
    """Each optimizer-state leaf shaped like a parameter is sharded like it; the rest (counts,
    hyperparameters) is replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated)


def abstract_arrays(tree, shardings):
    """Abstract values (shape, dtype, weak type, sharding) of a tree of arrays placed on `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                                          weak_type=getattr(x, "weak_type", False)),
                        tree, shardings)


def restore_state(path: Path, params, opt_state, rng, shardings):
    """A checkpoint's params, optimizer state and RNG streams, placed on this run's shardings."""
    abstract = {"params": abstract_arrays(params, shardings["params"]),
                "opt_state": abstract_arrays(opt_state, shardings["opt_state"]),
                "rng": abstract_arrays(keys_to_data(rng), shardings["rng"])}
    restored = restore_arrays(path, abstract)
    return restored["params"], restored["opt_state"], data_to_keys(restored["rng"], rng)


def canonical_arrays(params, config: BluesConfig) -> dict:
    """The canonical float32 tensors of the (possibly sharded) parameters; collective when several
    processes hold the shards."""
    return from_module_arrays(flatten(gather_to_host(params)), config)


# ---- batches and evaluation -------------------------------------------------------------------------

def put_batch(array: np.ndarray, sharding, global_shape):
    """This process's rows of a global batch, as one array on the mesh."""
    return jax.make_array_from_process_local_data(sharding, array, global_shape)


def make_eval_step(graph, shardings: dict):
    """(params, rng, inputs [B, T], targets [B, T]) -> (lm_loss, expert_counts [L, E], dropped [L]), eval mode."""

    def step(params, rng, x, y):
        out = nnx.merge(graph, params, rng)(x, y, return_logits=False)
        return out.lm_loss, out.expert_counts, out.dropped

    s = shardings
    return jax.jit(step, in_shardings=(s["params"], s["rng"], s["batch"], s["batch"]), out_shardings=s["replicated"])


def eval_batch_shape(args: TrainArgs, topo: dict) -> tuple[int, int]:
    """The global shape of one evaluation forward's inputs: a micro-batch on every data-parallel shard."""
    return topo["dp"] * args.batch_size, args.seq_len


def micro_batch_shape(args: TrainArgs, topo: dict) -> tuple[int, int, int]:
    """The global shape of one training step's inputs (and targets): [G, global B, T]."""
    return args.grad_accum, args.batch_size * topo["dp"], args.seq_len


def train_step_arguments(plan: TrainPlan, args: TrainArgs, topo: dict) -> tuple:
    """The training step's arguments as abstract values, to compile it ahead: the train state, the
    micro-batches and the host scalars lr and inject_nan (NumPy float32 and bool, as passed)."""
    batch = jax.ShapeDtypeStruct(micro_batch_shape(args, topo), jnp.int32, sharding=plan.shardings["micro_batches"])
    return (*plan.abstract, batch, batch, jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.bool_))


def eval_step_arguments(params, rng, args: TrainArgs, topo: dict, shardings: dict) -> tuple:
    """The evaluation step's arguments as abstract values (shapes, dtypes, shardings), to compile it ahead."""
    batch = jax.ShapeDtypeStruct(eval_batch_shape(args, topo), jnp.int32, sharding=shardings["batch"])
    return abstract_arrays(params, shardings["params"]), abstract_arrays(rng, shardings["rng"]), batch, batch


def evaluate(eval_step, params, rng, val_tokens, args: TrainArgs, topo: dict, shardings: dict) -> EvalAccumulator:
    """Token-weighted validation loss and expert utilization over `--eval_batches` global batches, one
    forward per batch: the loss is computed chunk by chunk, as in training (no [B, T, V] logits)."""
    cfg = args.model_config
    shape = eval_batch_shape(args, topo)
    acc = EvalAccumulator()
    for x, y in eval_batches(val_tokens, args.seq_len, topo["local_batch"], args.eval_batches, rank=topo["process"],
                             world_size=topo["processes"], vocab_size=cfg.vocab_size):
        # x, y [local devices * B, T]: this process's rows of the global batch
        lm_loss, counts, dropped = eval_step(params, rng, put_batch(x, shardings["batch"], shape),
                                             put_batch(y, shardings["batch"], shape))
        acc.update(float(lm_loss), shape[0] * shape[1], np.asarray(counts), np.asarray(dropped))
    return acc


class NextLogits:
    """`bind(params, rng)` -> `next_logits(rows) -> [len(rows), V]` for blues.train_loop's sample
    continuations (one id array per continuation: SAMPLES of them).

    The samples are a host loop of tiny forwards, so they run on ONE local device of each process
    (`graph` has no mesh): the parameters are gathered once per evaluation, and no token pays for a
    mesh-wide launch and all-to-all. Every call has the shape [len(SAMPLES), window] (ids
    left-aligned, zero-padded; the causal mask keeps the padding out of each row's last position),
    so it compiles once.
    """

    def __init__(self, graph, shardings: dict, window: int):
        self.window = window
        self.device = shardings["replicated"].mesh.local_devices[0]
        self.gather = jax.jit(lambda tree: tree, out_shardings=shardings["replicated"])  # every device holds all

        @jax.jit
        def last_logits(params, rng, ids, last):
            logits = nnx.merge(graph, params, rng)(ids).logits  # [R, window, V]
            return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [R, V]

        self.last_logits = last_logits

    def bind(self, params, rng):
        device, one = self.device, SingleDeviceSharding(self.device)

        def on_device(x):  # this device's copy of a gathered array (the whole array: no transfer)
            return jax.device_put(next(s.data for s in x.addressable_shards if s.device == device), one)

        local = jax.tree.map(on_device, self.gather((params, rng)))

        def next_logits(rows: list[np.ndarray]) -> np.ndarray:
            buf = np.zeros((len(rows), self.window), dtype=np.int32)  # [R, window]
            for i, ids in enumerate(rows):
                buf[i, :len(ids)] = ids
            last = np.array([len(ids) - 1 for ids in rows], dtype=np.int32)  # [R]
            out = self.last_logits(*local, jax.device_put(buf, device), jax.device_put(last, device))
            return np.asarray(out, dtype=np.float32)

        return next_logits

    def arguments(self, params, rng) -> tuple:
        """`last_logits`' arguments as abstract values on the sampling device, to compile it ahead."""
        one = SingleDeviceSharding(self.device)  # as `bind` places them
        on_device = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one)  # noqa: E731
        rows = len(SAMPLES)
        ids = jax.ShapeDtypeStruct((rows, self.window), jnp.int32, sharding=one)  # [R, window]
        return (*jax.tree.map(on_device, (params, rng)), ids, jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=one))

"""Train Blues with JAX / Flax NNX on whatever devices JAX sees, sharded over a device mesh.

    python train_jax.py                                      # tiny preset, embedded corpus (CPU: minutes)
    python train_jax.py --preset small --precision bf16 --max_steps 2000 --batch_size 16   # one GPU
    python train_jax.py --mesh data=2,expert=4 ...           # 8 devices: tokens over all 8, experts 4 ways
    python train_jax.py --out_dir runs/x --resume auto       # continue a run (or start it if new)

Flags: `python train_jax.py --help` (shared with train_torch.py: blues/train_args.py). `--batch_size`
is per data-parallel shard; tokens are split over every device of the mesh (data x expert,
blues_jax/sharding.py), so the global batch is batch_size x devices.

Parallelism: one `jax.jit` train step with explicit input/output shardings (parameters by
blues_jax.sharding's logical-axis rules, the batch over every device, optimizer moments like their
parameters) and donated state buffers. `--mesh data=D,expert=X` (default: all devices on `data`)
needs D * X = the number of devices and X dividing tot_num_experts.

Multi-process / multi-host (one process per host, or per GPU): every process runs the same command
and `jax.distributed.initialize()` is called first, either from the flags

    python train_jax.py --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0 ...   # host 0
    python train_jax.py --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 1 ...   # host 1

or, with none of those flags, from the cluster's environment when the job was launched by SLURM
(`srun`), Open MPI (`mpirun`) or with JAX_COORDINATOR_ADDRESS set (JAX detects the rest). The
mesh then spans the devices of all processes; each process reads its own slice of every global
batch; `--out_dir` must be a shared filesystem (Orbax writes each process's shards, process 0 the
metadata, metrics and plots). Between CPU processes the collectives go through gloo
(tests/test_train_jax_mesh.py runs two processes that way).

Optimizer: optax AdamW, betas (0.9, 0.95), eps 1e-8, decoupled weight decay on matrices only
(ndim >= 2): torch.optim.AdamW's update (tests/test_train_jax_step.py). The learning rate of each
step comes from blues/schedule.py on the host (step-indexed like train_torch.py, so a skipped step does not shift
the schedule, while Adam's bias correction counts applied updates, like torch). Gradients are
clipped by global norm as torch's clip_grad_norm_ does (coef = max_norm / (norm + 1e-6), at most
1); `grad_norm` in the metrics is the norm before clipping. Gradient accumulation averages the
micro-batch losses (a lax.scan inside the step). `--precision bf16`: bf16 matmuls, float32
parameters, gradients and optimizer state.

Checkpoints: Orbax `CheckpointManager` (asynchronous saves, max_to_keep = --keep_checkpoints) in
DIR/checkpoints/step_XXXXXXXX/: `arrays/` (parameters, optimizer state, RNG key data; restored onto
whatever mesh the resumed run uses) and `trainer_state/` (step, config, flags, data position,
bad-step counter), then, once Orbax has finalized the save, `trainer_state.json` and the COMMITTED
manifest with every file's sha256 (blues/checkpointing.py): a checkpoint counts only when sealed,
and a damaged one is detected on resume and the previous one used. Resuming restores all of it, so
a resumed run repeats an uninterrupted one bit for bit on CPU in float32. A save that Orbax had
finished when the process was killed, before it was sealed, is sealed on the next --resume.

Faults: SIGINT/SIGTERM finish the step, checkpoint and exit 0; a non-finite loss or gradient norm
skips the update (inside the compiled step) and `--max_bad_steps` consecutive ones stop the run
(exit 1) with a checkpoint of the last good state. Tests inject NaNs with `--inject_nan STEP[,STEP]`
and interrupt deterministically with `--stop_after N` (blues/train_args.py).

Compiled programs are cached on disk (BLUES_CACHE/xla, or JAX_COMPILATION_CACHE_DIR), so a second run
of the same configuration starts training within seconds.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from blues import checkpointing as ckpt
from blues.cli import run_main
from blues.safetensors_io import load_init_weights
from blues.errors import BluesError, UsageError
from blues.loop import StepResult, finish, train as train_loop
from blues.metrics import MetricsLogger
from blues.plots import plot_experts, plot_losses
from blues.train_args import TrainArgs, parse_args
from blues_jax.checkpoint import (Checkpointer, data_to_keys, discard_later_checkpoints, keys_to_data,
                                  restore_arrays, seal_finished_saves)
from blues.train_loop import (SAMPLE_PROMPT, SAMPLE_TOKENS, BadStepGuard, BestExport, EvalAccumulator, GracefulStop,
                              RunDir, TimeBudget, log, log_samples, settings_lines)

SCRIPT = "train_jax.py"
BETAS, EPS = (0.9, 0.95), 1e-8
# Evaluation materialises [rows, T, V] float32 logits; rows are chosen so one forward holds at
# most this many tokens per device (~0.8 GB of logits at V = 200k), as train_torch.py does.
EVAL_TOKENS_PER_FORWARD = 1024


# ---- processes and the mesh -------------------------------------------------------------------------

def cluster_launcher() -> str | None:
    """The multi-process launcher this process was started by (None: a plain single-process run)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def init_distributed(args: TrainArgs) -> None:
    """jax.distributed.initialize() for a multi-process run; must come before any other JAX call."""
    import jax

    if args.coordinator is not None or cluster_launcher() is not None:
        # CPU processes exchange data through gloo (GPUs use NCCL whatever this says).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif cluster_launcher() is not None:
        jax.distributed.initialize()  # JAX reads the coordinator, process count and id from the cluster


def enable_compilation_cache(jax) -> None:
    """Keep compiled programs on disk (BLUES_CACHE/xla), so a second run skips most of the compile
    time. JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    from blues.data import default_cache_dir

    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))


def build_mesh(args: TrainArgs):
    """The ("data", "expert") mesh over every device of every process; a bad --mesh is a usage error."""
    import jax

    from blues_jax.sharding import MeshError, make_mesh

    spec = args.mesh or {"data": jax.device_count()}
    try:
        mesh = make_mesh(spec)
    except MeshError as e:
        raise UsageError(f"--mesh: {e}") from None
    experts = args.model_config.tot_num_experts
    if experts % mesh.shape["expert"]:
        raise UsageError(f"--mesh: the expert axis ({mesh.shape['expert']}) must divide tot_num_experts "
                         f"({experts}); use expert=1, or a divisor of {experts}")
    return mesh


# ---- optimizer and the compiled steps ---------------------------------------------------------------

def make_optimizer(args: TrainArgs, params):
    """optax AdamW whose learning rate (and weight decay) each step sets from the host.

    inject_hyperparams keeps them in the optimizer state, so the compiled step takes this step's lr
    from blues.schedule as an argument: the same float train_torch.py puts in its param groups.
    """
    import jax
    import optax

    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)  # matrices decay, RMSNorm scales do not
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=args.lr, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=args.weight_decay, mask=decay_mask)


def clip_by_global_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: the norm of the per-tensor norms; scale by
    min(1, max_norm / (norm + 1e-6)); max_norm 0 = no clipping. Returns (grads, norm before clipping)."""
    import jax
    import jax.numpy as jnp

    norm = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in jax.tree.leaves(grads)]))
    if max_norm > 0:
        coef = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
        grads = jax.tree.map(lambda g: g * coef, grads)
    return grads, norm


def make_train_step(graph, tx, args: TrainArgs, shardings: dict):
    """The compiled optimizer step: (params, opt_state, rng, inputs [G, B, T], targets [G, B, T], lr,
    inject_nan) -> (params, opt_state, rng, metrics). State buffers are donated; a non-finite loss
    or gradient norm leaves params and optimizer state as they were (the RNG streams still advance)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    grad_accum = args.grad_accum

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
        grads, grad_norm = clip_by_global_norm(grads, args.grad_clip)
        hyper = dict(opt_state.hyperparams, learning_rate=lr, weight_decay=jnp.float32(args.weight_decay))
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


def make_eval_step(graph, shardings: dict):
    """(params, rng, inputs [B, T], targets [B, T]) -> (lm_loss, expert_counts [L, E], dropped [L]), eval mode."""
    import jax
    from flax import nnx

    def step(params, rng, x, y):
        out = nnx.merge(graph, params, rng)(x, y)
        return out.lm_loss, out.expert_counts, out.dropped

    s = shardings
    return jax.jit(step, in_shardings=(s["params"], s["rng"], s["batch"], s["batch"]), out_shardings=s["replicated"])


def make_next_logits(graph, shardings: dict, window: int):
    """`bind(params, rng)` -> `next_logits(ids [1, t]) -> [V]` for blues.train_loop's sample continuations.

    The samples are a host loop of tiny forwards, so they run on ONE local device of each process
    (`graph` has no mesh): the parameters are gathered once per evaluation, and no token pays for a
    mesh-wide launch and all-to-all. Every call has the shape [1, window] (ids left-aligned,
    zero-padded; the causal mask keeps the padding out of position t-1), so it compiles once.
    """
    import jax
    from flax import nnx

    gather = jax.jit(lambda tree: tree, out_shardings=shardings["replicated"])  # every device holds all

    @jax.jit
    def last_logits(params, rng, ids, t):
        logits = nnx.merge(graph, params, rng)(ids).logits  # [1, window, V]
        return jax.lax.dynamic_index_in_dim(logits[0], t - 1, axis=0, keepdims=False)  # [V]

    def bind(params, rng):
        local = jax.tree.map(lambda x: x.addressable_data(0), gather((params, rng)))  # on one local device
        device = jax.tree.leaves(local)[0].device

        def next_logits(ids: np.ndarray) -> np.ndarray:
            t = ids.shape[1]
            buf = np.zeros((1, window), dtype=np.int32)  # [1, window]
            buf[:, :t] = ids
            x = jax.device_put(buf, device)
            return np.asarray(last_logits(*local, x, jax.device_put(np.int32(t), device)), dtype=np.float32)

        return next_logits

    return bind


# ---- state <-> checkpoint ---------------------------------------------------------------------------

def _abstract(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ---- batches ----------------------------------------------------------------------------------------

def put_batch(array: np.ndarray, sharding, global_shape):
    import jax

    return jax.make_array_from_process_local_data(sharding, array, global_shape)


def eval_rows(batch_size: int, seq_len: int) -> int:
    """Rows per device per evaluation forward: the largest divisor of batch_size within the budget."""
    budget = max(1, EVAL_TOKENS_PER_FORWARD // seq_len)
    return max(r for r in range(1, batch_size + 1) if batch_size % r == 0 and r <= budget)


def evaluate(eval_step, params, rng, val_tokens, args: TrainArgs, topo: dict, shardings: dict) -> EvalAccumulator:
    """Token-weighted validation loss and expert utilization over `--eval_batches` global batches."""
    from blues.data import eval_batches

    cfg, t = args.model_config, args.seq_len
    rows = eval_rows(args.batch_size, t)
    acc = EvalAccumulator()
    for x, y in eval_batches(val_tokens, t, topo["local_batch"], args.eval_batches, rank=topo["process"],
                             world_size=topo["processes"], vocab_size=cfg.vocab_size):
        # x, y [local devices * B, T]: device d's rows are [d*B, (d+1)*B); take `rows` of each per forward
        xs = x.reshape(topo["local_devices"], args.batch_size, t)  # [D, B, T]
        ys = y.reshape(topo["local_devices"], args.batch_size, t)
        for start in range(0, args.batch_size, rows):
            xc = xs[:, start:start + rows].reshape(-1, t)  # [D * rows, T]
            yc = ys[:, start:start + rows].reshape(-1, t)
            shape = (topo["dp"] * rows, t)
            lm_loss, counts, dropped = eval_step(params, rng, put_batch(xc, shardings["batch"], shape),
                                                 put_batch(yc, shardings["batch"], shape))
            acc.update(float(lm_loss), shape[0] * t, np.asarray(counts), np.asarray(dropped))
    return acc


# ---- main -------------------------------------------------------------------------------------------

def main(argv) -> int:
    args = parse_args(argv, "jax")
    started = time.time()
    budget = TimeBudget(args.max_minutes)
    init_distributed(args)
    import jax

    run_dir = RunDir(args.out_dir, is_main=jax.process_index() == 0)  # did it exist? (before any process makes it)
    run = prepare(args)  # everything that can be refused is checked before the run directory exists
    mesh, topo, resume_path, state = run["mesh"], run["topo"], run["resume_path"], run["state"]
    is_main = topo["process"] == 0
    enable_compilation_cache(jax)
    graphs, tx, shardings, params, opt_state, rng = build_train_state(args, mesh, run["init_arrays"])
    guard = BadStepGuard(args.max_bad_steps)
    step = 0
    if state is not None:  # resume: every array onto this run's mesh, then the host-side state
        params, opt_state, rng = restore_state(resume_path, params, opt_state, rng, shardings)
        step = int(state["step"])
        run["train_iter"].load_state_dict(state["data"])
        guard.load_state_dict(state["bad_steps"])

    ckpt_root = Path(args.out_dir) / "checkpoints"
    with run_dir, GracefulStop() as stop:
        run_dir.create()
        if is_main and args.resume is not None:
            discard_later_checkpoints(ckpt_root, step)
        _sync("checkpoint directory")
        checkpointer = Checkpointer(ckpt_root, args.keep_checkpoints, is_main)
        checkpointer.last = resume_path
        metrics = MetricsLogger(args.out_dir, enabled=is_main, resume_step=step if args.resume is not None else None)
        if is_main:
            write_run_config(args, mesh, topo)
            log(f"{'resuming from ' + str(resume_path) + ' at step ' + str(step) if resume_path else 'starting'}: "
                f"preset {args.preset}, {args.model_config.num_parameters() / 1e6:.1f}M parameters, data "
                f"{run['splits'].source} ({len(run['splits'].train):,} train / {len(run['splits'].val):,} val "
                f"tokens), {jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}; "
                f"writing to {args.out_dir}\n"
                + settings_lines(args, ranks=topo["dp"], rank_word="data-parallel shard"))

        state_step = step
        loop = Loop(args, topo, shardings, graphs, tx, run["train_iter"], run["splits"], run["tokenizer"],
                    checkpointer, guard, metrics, stop, budget,
                    BestExport(args.out_dir, args.model_config, enabled=args.save_best, is_main=is_main,
                               resuming=resume_path is not None))
        loop.params, loop.opt_state, loop.rng = params, opt_state, rng
        try:
            result = train_loop(loop, args, step, guard=guard, metrics=metrics, stop=stop, is_main=is_main,
                                tokens_per_step=args.batch_size * topo["dp"] * args.seq_len * args.grad_accum)
        finally:
            checkpointer.close()  # waits for the asynchronous save in flight, then seals it
        metrics.close()
        if is_main:
            plot_losses(metrics.path, Path(args.out_dir) / "loss.png")
            plot_experts(metrics.path, Path(args.out_dir) / "experts.png")
        return finish(result, script=SCRIPT, argv=argv, args=args, stop=stop, checkpoint=checkpointer.last,
                      guard=guard, elapsed=time.time() - started, first_step=state_step, best=loop.best, is_main=is_main)


def prepare(args: TrainArgs) -> dict:
    """Mesh, tokenizer, data, --init_from weights and the checkpoint to resume, all checked: a bad
    flag, file or checkpoint fails here, before anything is written or compiled."""
    import jax
    import jax.numpy as jnp

    from blues.data import BatchIterator, eval_batches, prepare_data
    from blues.tokenizer import load_tokenizer
    from blues_jax.attention import resolve_attn_impl

    cfg = args.model_config
    mesh = build_mesh(args)
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    try:
        resolve_attn_impl(args.attn_impl, jax.default_backend(), dtype, cfg.attn_logit_softcap, cfg.head_dim)
    except BluesError as e:
        raise UsageError(f"--attn_impl: {e}") from None
    topo = {"process": jax.process_index(), "processes": jax.process_count(), "dp": mesh.size,
            "local_devices": jax.local_device_count()}
    topo["local_batch"] = args.batch_size * topo["local_devices"]  # this process's rows of a global batch
    tokenizer = load_tokenizer()
    cfg.check_tokenizer(tokenizer.n_vocab)

    splits = prepare_data(args.data, seq_len=args.seq_len, tokenizer=tokenizer, show_progress=topo["process"] == 0,
                          text_column=args.text_column, workers=args.workers, val_fraction=args.val_fraction)
    train_iter = BatchIterator(splits.train, seq_len=args.seq_len, batch_size=topo["local_batch"], seed=args.seed,
                               rank=topo["process"], world_size=topo["processes"], vocab_size=cfg.vocab_size)
    eval_batches(splits.val, args.seq_len, topo["local_batch"], args.eval_batches, rank=topo["process"],
                 world_size=topo["processes"], vocab_size=cfg.vocab_size)  # a too-small split fails here

    if args.resume is not None and topo["process"] == 0:
        seal_finished_saves(Path(args.out_dir) / "checkpoints")
    _sync("resume")
    resume_path = ckpt.resolve_resume(args.resume, args.out_dir)
    state = None
    if resume_path is not None:
        state = ckpt.read_trainer_state(resume_path, framework="jax")
        for note in ckpt.check_resume(state, args.to_dict(), world_size=topo["dp"], checkpoint=resume_path):
            if topo["process"] == 0:
                log(f"note: {note}")
        if int(state["step"]) >= args.max_steps:
            raise UsageError(f"--max_steps {args.max_steps}: the checkpoint {resume_path} is already at step "
                             f"{state['step']}; pass a larger --max_steps to train further")
    init_arrays = None
    if args.init_from is not None:
        if resume_path is None:
            init_arrays = load_init_weights(args.init_from, args.model_config)
        elif topo["process"] == 0:
            log(f"note: --init_from {args.init_from} is ignored: the run resumes from {resume_path}")
    return {"mesh": mesh, "topo": topo, "tokenizer": tokenizer, "splits": splits, "train_iter": train_iter,
            "resume_path": resume_path, "state": state, "init_arrays": init_arrays}


def build_train_state(args: TrainArgs, mesh, init_arrays: dict | None):
    """The model split into graphs (train, eval, one-device sampling) and state (params, RNG streams),
    the optimizer, every sharding the compiled steps use, and a fresh optimizer state."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from blues_jax.sharding import BATCH_AXES

    model = create_model(args, mesh, init_arrays)
    model.train()
    train_graph, params, rng, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    assert not jax.tree.leaves(rest), "the model holds state that is neither a parameter nor an RNG stream"
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.RngState)[0]
    model.set_attributes(mesh=None, raise_if_not_found=False)
    sample_graph = nnx.split(model, nnx.Param, nnx.RngState)[0]  # eval mode on one device (the samples)
    params, rng = nnx.to_pure_dict(params), nnx.to_pure_dict(rng)

    tx = make_optimizer(args, params)
    replicated = NamedSharding(mesh, P())
    shardings = {"params": jax.tree.map(lambda x: x.sharding, params),
                 "rng": jax.tree.map(lambda x: replicated, rng),
                 "batch": NamedSharding(mesh, P(BATCH_AXES, None)),  # [B, T]
                 "micro_batches": NamedSharding(mesh, P(None, BATCH_AXES, None)),  # [G, B, T]
                 "replicated": replicated}
    shardings["opt_state"] = _optimizer_shardings(tx, params, shardings["params"], replicated)
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return (train_graph, eval_graph, sample_graph), tx, shardings, params, opt_state, rng


def restore_state(path: Path, params, opt_state, rng, shardings):
    """A checkpoint's params, optimizer state and RNG streams, placed on this run's shardings."""
    abstract = {"params": _abstract(params, shardings["params"]),
                "opt_state": _abstract(opt_state, shardings["opt_state"]),
                "rng": _abstract(keys_to_data(rng), shardings["rng"])}
    restored = restore_arrays(path, abstract)
    return restored["params"], restored["opt_state"], data_to_keys(restored["rng"], rng)


def write_run_config(args: TrainArgs, mesh, topo: dict) -> None:
    with open(Path(args.out_dir) / "config.json", "w", encoding="utf-8") as f:
        json.dump({"model_config": args.model_config.to_dict(), "train_args": args.to_dict(),
                   "world_size": topo["dp"], "mesh": dict(mesh.shape), "processes": topo["processes"]}, f, indent=1)


def create_model(args: TrainArgs, mesh, init_arrays: dict | None):
    """The model, initialised by one compiled program straight into its shardings (not op by op on
    one device), then placed on the mesh by blues_jax.sharding; --init_from weights replace the
    random ones. The seed fixes the weights and the router-noise and dropout streams, whatever the mesh
    (threefry keys are sharding-invariant)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from blues_jax import BluesModel
    from blues_jax.sharding import param_shardings, shard_model

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32

    def make():
        key = jax.random.key(args.seed)
        rngs = nnx.Rngs(params=jax.random.fold_in(key, 0), noise=jax.random.fold_in(key, 1),
                        dropout=jax.random.fold_in(key, 2))
        return BluesModel(args.model_config, rngs=rngs, attn_impl=args.attn_impl, dtype=dtype)

    graph, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.state(make()), out_shardings=param_shardings(abstract, mesh))()
    model = nnx.merge(graph, state)
    if init_arrays is not None:
        from parity.convert import load_canonical

        load_canonical(model, init_arrays)  # checked against the config in load_init_weights
    return shard_model(model, mesh)


def _optimizer_shardings(tx, params, param_shardings, replicated):
    """Each optimizer-state leaf shaped like a parameter is sharded like it; the rest (counts,
    hyperparameters) is replicated."""
    import jax
    import optax

    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated)


def _sync(name: str) -> None:
    """A barrier across processes (no-op in a single-process run)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def canonical_arrays(params, config, topo: dict) -> dict:
    """The canonical float32 tensors of the (possibly sharded) parameters; collective when several
    processes hold the shards."""
    from parity.convert import flatten, from_module_arrays

    if topo["processes"] > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    return from_module_arrays(flatten(params), config)


class Loop:
    """blues.loop's Trainer for JAX: the compiled step, evaluation and checkpoints, holding the state."""

    def __init__(self, args, topo, shardings, graphs, tx, train_iter, splits, tokenizer,
                 checkpointer, guard, metrics, stop, budget, best):
        self.args, self.topo, self.shardings = args, topo, shardings
        self.budget, self.best = budget, best  # --max_minutes, --save_best
        self.train_iter, self.splits, self.tokenizer = train_iter, splits, tokenizer
        self.checkpointer, self.guard, self.metrics, self.stop = checkpointer, guard, metrics, stop
        self.is_main = topo["process"] == 0
        train_graph, eval_graph, sample_graph = graphs
        self.train_step = make_train_step(train_graph, tx, args, shardings)
        self.eval_step = make_eval_step(eval_graph, shardings)
        prompt = len(tokenizer.encode(SAMPLE_PROMPT))
        self.sample_window = min(args.seq_len, 1 << (prompt + SAMPLE_TOKENS - 1).bit_length())
        self.next_logits = make_next_logits(sample_graph, shardings, self.sample_window)

    def batches(self):
        """The next optimizer step's micro-batches, on the mesh: inputs and targets [G, global B, T]."""
        g, t = self.args.grad_accum, self.args.seq_len
        xs, ys = zip(*(next(self.train_iter) for _ in range(g)))  # G x [local B, T]
        shape = (g, self.args.batch_size * self.topo["dp"], t)
        sharding = self.shardings["micro_batches"]
        return put_batch(np.stack(xs), sharding, shape), put_batch(np.stack(ys), sharding, shape)

    def trainer_state(self, step: int) -> dict:
        args = self.args
        return {"step": step, "framework": "jax", "model_config": args.model_config.to_dict(),
                "train_args": args.to_dict(), "world_size": self.topo["dp"], "processes": self.topo["processes"],
                "data": self.train_iter.state_dict(), "bad_steps": self.guard.state_dict()}

    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.params, self.opt_state, self.rng, self.trainer_state(step))

    def step(self, lr: float, inject_nan: bool) -> StepResult:
        inputs, targets = self.batches()
        self.params, self.opt_state, self.rng, out = self.train_step(self.params, self.opt_state, self.rng, inputs,
                                                                     targets, np.float32(lr), np.bool_(inject_nan))
        losses = [float(v) for v in np.asarray(out["losses"])]  # waits for the step
        return StepResult(losses, float(out["grad_norm"]), out_of_time=self.out_of_time())

    def after_step(self) -> None:
        self.checkpointer.poll()

    def evaluate(self, step: int) -> float:
        return self.run_eval(self.params, self.rng, step)

    def out_of_time(self) -> bool:
        """--max_minutes, decided by process 0 so that every process stops after the same step."""
        expired = self.budget.expired()
        if self.topo["processes"] > 1 and self.budget.seconds is not None:
            from jax.experimental import multihost_utils
            expired = bool(multihost_utils.broadcast_one_to_all(np.bool_(expired)))
        return expired

    def run_eval(self, params, rng, step: int) -> float:
        acc = evaluate(self.eval_step, params, rng, self.splits.val, self.args, self.topo, self.shardings)
        self.best.update(step, acc.loss, lambda: canonical_arrays(params, self.args.model_config, self.topo))
        next_logits = self.next_logits(params, rng)
        if self.is_main:
            self.metrics.log_eval(step=step, val_loss=acc.loss, experts=acc.experts.summary())
            log(f"step {step}: val loss {acc.loss:.4f} (perplexity {math.exp(min(acc.loss, 700)):.1f})")
            log_samples(self.tokenizer, next_logits, step=step, context=self.sample_window, seed=self.args.seed,
                        metrics=self.metrics)
            self.metrics.flush()
        else:  # every process runs the (collective) forwards; only process 0 prints them
            with contextlib.redirect_stderr(io.StringIO()):
                log_samples(self.tokenizer, next_logits, step=step, context=self.sample_window, seed=self.args.seed)
        return acc.loss


if __name__ == "__main__":
    sys.exit(run_main(main))

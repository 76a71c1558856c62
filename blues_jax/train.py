"""Train Blues with JAX / Flax NNX on whatever devices JAX sees, sharded over a device mesh.

    python train_jax.py                                      # tiny preset, embedded corpus (CPU: minutes)
    python train_jax.py --preset small --precision bf16 --max_steps 2000 --batch_size 16   # one GPU
    python train_jax.py --mesh data=2,expert=4 ...           # 8 devices: tokens over all 8, experts 4 ways
    python train_jax.py --out_dir runs/x --resume auto       # continue a run (or start it if new)
    python train_jax.py --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0 ...   # multi-host

Flags: `python train_jax.py --help` (shared with train_torch.py: blues/train_args.py). `--batch_size`
is per data-parallel shard; tokens are split over every device of the mesh (data x expert,
blues_jax/sharding.py), so the global batch is batch_size x devices. `--mesh data=D,expert=X`
(default: all devices on `data`) needs D * X = the number of devices and X dividing tot_num_experts.
The step is blues_jax/training.py, the loop blues/loop.py, checkpoints blues_jax/checkpoint.py (Orbax,
asynchronous, sealed by blues/checkpointing.py's manifest; a resumed run repeats an uninterrupted one
bit for bit on CPU in float32), processes and the mesh blues_jax/distributed.py (SLURM, Open MPI,
JAX_COORDINATOR_ADDRESS or the flags).

Faults: SIGINT/SIGTERM finish the step, checkpoint and exit 0; a non-finite loss or gradient norm
skips the update (inside the compiled step) and `--max_bad_steps` consecutive ones stop the run
(exit 1) with a checkpoint of the last good state. Tests inject NaNs with `--inject_nan STEP[,STEP]`
and interrupt deterministically with `--stop_after N` (blues/train_args.py).

Compiled programs are cached on disk (BLUES_CACHE/xla, or JAX_COMPILATION_CACHE_DIR), so a second run
of the same configuration starts training within seconds. The training step compiles in a background
thread while the weights are drawn, and the evaluation's programs after the first step
(blues_jax/precompile.py), so the first evaluation does not wait for them.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from blues import checkpointing as ckpt
from blues.cli import run_main
from blues.data import BatchIterator, eval_batches, prepare_data
from blues.errors import BluesError, UsageError
from blues.loop import StepResult, finish, train
from blues.metrics import MetricsLogger
from blues.plots import plot_experts, plot_losses
from blues.safetensors_io import load_init_weights
from blues.tokenizer import load_tokenizer
from blues.train_args import TrainArgs, parse_args
from blues.train_loop import (BadStepGuard, BestExport, GracefulStop, RunDir, TimeBudget, log, log_samples,
                              sample_window, settings_lines)
from blues_jax.attention import resolve_attn_impl
from blues_jax.checkpoint import Checkpointer, discard_later_checkpoints, seal_finished_saves
from blues_jax.distributed import agree, build_mesh, enable_compilation_cache, init_distributed, sync, topology
from blues_jax.precompile import BackgroundCompile
from blues_jax.training import (NextLogits, TrainPlan, canonical_arrays, eval_step_arguments, evaluate,
                                init_train_state, make_eval_step, make_train_step, micro_batch_shape,
                                plan_train_state, put_batch, restore_state, run_dtype, train_step_arguments)

SCRIPT = "train_jax.py"


class JaxTrainer:
    """blues.loop's Trainer for JAX: the compiled step, evaluation and checkpoints, holding the state."""

    def __init__(self, args, topo, plan: TrainPlan, train_step, step_compile: BackgroundCompile, train_iter, splits,
                 tokenizer, checkpointer, guard, metrics, budget, best):
        self.args, self.topo, self.shardings = args, topo, plan.shardings
        self.budget, self.best = budget, best  # --max_minutes, --save_best
        self.train_iter, self.splits, self.tokenizer = train_iter, splits, tokenizer
        self.checkpointer, self.guard, self.metrics = checkpointer, guard, metrics
        self.is_main = topo["process"] == 0
        _, eval_graph, sample_graph = plan.graphs
        self.train_step = train_step
        self.step_compile = step_compile  # the training step's, under way since start-up; None once joined
        self.eval_step = make_eval_step(eval_graph, self.shardings)
        self.sample_window = sample_window(tokenizer, args.seq_len)
        self.next_logits = NextLogits(sample_graph, self.shardings, self.sample_window)
        self.params = self.opt_state = self.rng = None
        self.ahead = None  # BackgroundCompile of the evaluation's programs, started once the first step is launched
        self.run_ahead = topo["processes"] == 1  # one process queues a step before reading the last (blues/loop.py)

    def batches(self):
        """The next optimizer step's micro-batches, on the mesh: inputs and targets [G, global B, T]."""
        shape = micro_batch_shape(self.args, self.topo)
        xs, ys = zip(*(next(self.train_iter) for _ in range(shape[0])))  # G x [local B, T]
        sharding = self.shardings["micro_batches"]
        return put_batch(np.stack(xs), sharding, shape), put_batch(np.stack(ys), sharding, shape)

    def launch(self, lr: float, inject_nan: bool) -> Callable[[], StepResult]:
        inputs, targets = self.batches()
        if self.step_compile is not None:
            self._join(self.step_compile)
            self.step_compile = None
        self.params, self.opt_state, self.rng, out = self.train_step(self.params, self.opt_state, self.rng, inputs,
                                                                     targets, np.float32(lr), np.bool_(inject_nan))
        if self.ahead is None:  # the evaluation's programs compile beside the next training steps
            self.ahead = BackgroundCompile([
                (self.eval_step, eval_step_arguments(self.params, self.rng, self.args, self.topo, self.shardings)),
                (self.next_logits.last_logits, self.next_logits.arguments(self.params, self.rng))])
        # --max_minutes: process 0 decides, so that every process stops after the same step
        out_of_time = agree(self.budget.expired()) if self.budget.seconds is not None else False

        def wait() -> StepResult:
            losses = [float(v) for v in np.asarray(out["losses"])]  # waits for the step
            return StepResult(losses, float(out["grad_norm"]), out_of_time=out_of_time)
        return wait

    def after_step(self) -> None:
        self.checkpointer.poll()

    def save(self, step: int) -> None:
        args = self.args
        state = {"step": step, "framework": "jax", "model_config": args.model_config.to_dict(),
                 "train_args": args.to_dict(), "world_size": self.topo["dp"], "processes": self.topo["processes"],
                 "data": self.train_iter.state_dict(), "bad_steps": self.guard.state_dict()}
        self.checkpointer.save(step, self.params, self.opt_state, self.rng, state)

    def wait_for_compiles(self) -> None:
        """Let the evaluation's background compile finish (before the first evaluation, and before exiting)."""
        if self.ahead is not None:
            self._join(self.ahead)

    def _join(self, compiling: BackgroundCompile) -> None:
        compiling.wait()
        if self.is_main:
            for failure in compiling.failures:
                log(f"note: compiling ahead failed ({failure}); it compiles when first called")
        compiling.failures.clear()

    def evaluate(self, step: int) -> float:
        self.wait_for_compiles()
        params, rng = self.params, self.rng
        acc = evaluate(self.eval_step, params, rng, self.splits.val, self.args, self.topo, self.shardings)
        self.best.update(step, acc.loss, lambda: canonical_arrays(params, self.args.model_config))
        next_logits = self.next_logits.bind(params, rng)
        sample = dict(step=step, context=self.sample_window, seed=self.args.seed)
        if self.is_main:
            self.metrics.log_eval(step=step, val_loss=acc.loss, experts=acc.experts.summary())
            log(f"step {step}: val loss {acc.loss:.4f} (perplexity {math.exp(min(acc.loss, 700)):.1f})")
            log_samples(self.tokenizer, next_logits, metrics=self.metrics, **sample)
            self.metrics.flush()
        else:  # every process runs the (collective) forwards; only process 0 prints them
            with contextlib.redirect_stderr(io.StringIO()):
                log_samples(self.tokenizer, next_logits, **sample)
        return acc.loss


def main(argv) -> int:
    args = parse_args(argv, "jax")
    started = time.time()
    budget = TimeBudget(args.max_minutes)
    init_distributed(args)
    run_dir = RunDir(args.out_dir, is_main=jax.process_index() == 0)  # did it exist? (before any process makes it)
    run = prepare(args)  # everything that can be refused is checked before the run directory exists
    enable_compilation_cache()
    plan = plan_train_state(args.model_config, run["mesh"], seed=args.seed, dtype=run_dtype(args.precision), lr=args.lr,
                            weight_decay=args.weight_decay, attn_impl=args.attn_impl, scan_layers=args.scan_layers)
    train_step = make_train_step(plan.graphs[0], plan.tx, plan.shardings, grad_accum=args.grad_accum,
                                 grad_clip=args.grad_clip, weight_decay=args.weight_decay)
    # the training step traces, lowers and compiles (or loads from the cache) while the weights are drawn
    with BackgroundCompile([(train_step, train_step_arguments(plan, args, run["topo"]))]) as step_compile:
        return train_run(argv, args, run, plan, train_step, step_compile, budget=budget, run_dir=run_dir,
                         started=started)


def train_run(argv, args: TrainArgs, run: dict, plan: TrainPlan, train_step, step_compile: BackgroundCompile, *,
              budget: TimeBudget, run_dir: RunDir, started: float) -> int:
    """The run after start-up: the train state, the run directory, the loop, the end of the run."""
    mesh, topo, resume_path, state = run["mesh"], run["topo"], run["resume_path"], run["state"]
    is_main = topo["process"] == 0
    params, opt_state, rng = init_train_state(plan, mesh, run["init_arrays"])
    guard = BadStepGuard(args.max_bad_steps)
    step = 0
    if state is not None:  # resume: every array onto this run's mesh, then the host-side state
        params, opt_state, rng = restore_state(resume_path, params, opt_state, rng, plan.shardings)
        step = int(state["step"])
        run["train_iter"].load_state_dict(state["data"])
        guard.load_state_dict(state["bad_steps"])

    ckpt_root = Path(args.out_dir) / "checkpoints"
    with run_dir, GracefulStop() as stop:
        run_dir.create()
        if is_main and args.resume is not None:
            discard_later_checkpoints(ckpt_root, step)
        sync("checkpoint directory")
        checkpointer = Checkpointer(ckpt_root, args.keep_checkpoints, is_main)
        checkpointer.last = resume_path
        metrics = MetricsLogger(args.out_dir, enabled=is_main, resume_step=step if args.resume is not None else None)
        if is_main:
            with open(Path(args.out_dir) / "config.json", "w", encoding="utf-8") as f:
                json.dump({"model_config": args.model_config.to_dict(), "train_args": args.to_dict(),
                           "world_size": topo["dp"], "mesh": dict(mesh.shape), "processes": topo["processes"]},
                          f, indent=1)
            log(f"{'resuming from ' + str(resume_path) + ' at step ' + str(step) if resume_path else 'starting'}: "
                f"preset {args.preset}, {args.model_config.num_parameters() / 1e6:.1f}M parameters, data "
                f"{run['splits'].source} ({len(run['splits'].train):,} train / {len(run['splits'].val):,} val "
                f"tokens), {jax.device_count()} {jax.devices()[0].platform} device(s), mesh {dict(mesh.shape)}; "
                f"writing to {args.out_dir}\n"
                + settings_lines(args, ranks=topo["dp"], rank_word="data-parallel shard"))

        first_step = step
        best = BestExport(args.out_dir, args.model_config, enabled=args.save_best, is_main=is_main,
                          resuming=resume_path is not None)
        trainer = JaxTrainer(args, topo, plan, train_step, step_compile, run["train_iter"], run["splits"],
                             run["tokenizer"], checkpointer, guard, metrics, budget, best)
        trainer.params, trainer.opt_state, trainer.rng = params, opt_state, rng
        del params, opt_state, rng  # donated to the first step: the trainer holds the only references
        try:
            result = train(trainer, args, step, guard=guard, metrics=metrics, stop=stop, budget=budget,
                           is_main=is_main,
                           tokens_per_step=args.batch_size * topo["dp"] * args.seq_len * args.grad_accum)
        finally:
            trainer.wait_for_compiles()
            checkpointer.close()  # waits for the asynchronous save in flight, then seals it
        metrics.close()
        if is_main:
            plot_losses(metrics.path, Path(args.out_dir) / "loss.png")
            plot_experts(metrics.path, Path(args.out_dir) / "experts.png")
        return finish(result, script=SCRIPT, argv=argv, args=args, stop=stop, checkpoint=checkpointer.last,
                      guard=guard, elapsed=time.time() - started, first_step=first_step, best=best, is_main=is_main)


def prepare(args: TrainArgs) -> dict:
    """Mesh, tokenizer, data, --init_from weights and the checkpoint to resume, all checked: a bad
    flag, file or checkpoint fails here, before anything is written or compiled."""
    cfg = args.model_config
    mesh = build_mesh(args)
    try:
        resolve_attn_impl(args.attn_impl, jax.default_backend(), run_dtype(args.precision), cfg.attn_logit_softcap,
                          cfg.head_dim)
    except BluesError as e:
        raise UsageError(f"--attn_impl: {e}") from None
    topo = topology(mesh, args.batch_size)
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
    sync("resume")
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
            init_arrays = load_init_weights(args.init_from, cfg)
        elif topo["process"] == 0:
            log(f"note: --init_from {args.init_from} is ignored: the run resumes from {resume_path}")
    return {"mesh": mesh, "topo": topo, "tokenizer": tokenizer, "splits": splits, "train_iter": train_iter,
            "resume_path": resume_path, "state": state, "init_arrays": init_arrays}


if __name__ == "__main__":
    sys.exit(run_main(main))

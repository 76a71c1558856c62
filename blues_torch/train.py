"""Train Blues with PyTorch: one process (GPU if present, else CPU) or DeepSpeed (ZeRO 1/2).

    python train_torch.py                                   # tiny preset, embedded corpus
    python train_torch.py --preset small --precision bf16 --max_steps 2000
    torchrun --nproc_per_node 4 train_torch.py --expert_parallel 2   # 4 ranks, experts split 2 ways
    deepspeed --num_gpus=8 train_torch.py --deepspeed ds_config.json --preset small
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 train_torch.py --deepspeed ds_config.json --precision fp32
    deepspeed --hostfile hosts train_torch.py --deepspeed ds_config.json ...   # multi-node (DeepSpeed's launcher)

Flags: `python train_torch.py --help` (shared with train_jax.py: blues/train_args.py). The step is
blues_torch/training.py, the loop blues/loop.py, checkpoints blues_torch/checkpoint.py, the DeepSpeed
config merge blues_torch/deepspeed_config.py.

`--compile` compiles each transformer block of the training forward (one graph for all of them,
blues_torch/training.py); compiled graphs are cached on disk (BLUES_CACHE/inductor, or
TORCHINDUCTOR_CACHE_DIR), so a second run of the same configuration loads them instead of compiling.

Faults: SIGINT/SIGTERM finish the step, checkpoint and exit 0; a non-finite loss or gradient norm skips
the update, and `--max_bad_steps` consecutive ones stop the run (exit 1) with a checkpoint. Tests use
the hidden flags `--inject_nan STEP[,STEP]` and `--stop_after N` (blues/train_args.py). With
BLUES_WRITE_PARAM_HASH=1 every rank writes the sha256 of its parameters after loading a checkpoint and
at the end (DIR/param_sha256_rank<R>_<loaded|final>.txt; the DeepSpeed test compares ranks with it).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from blues import checkpointing as ckpt
from blues import loop
from blues.cli import run_main
from blues.data import BatchIterator, prepare_data
from blues.canonical import read_model
from blues.loop import StepResult
from blues.metrics import MetricsLogger
from blues.plots import plot_experts, plot_losses
from blues.safetensors_io import load_init_weights
from blues.tokenizer import load_tokenizer
from blues.train_args import parse_args
from blues.train_loop import (BadStepGuard, BestExport, GracefulStop, RunDir, TimeBudget, log, log_samples,
                              reuse_freed_host_memory, sample_window, settings_lines)
from blues_torch import BluesModel
from blues_torch.checkpoint import Checkpointer, check_resumable, full_state_dict, write_param_hash
from blues_torch.deepspeed_config import resolve_deepspeed_config
from blues_torch.distributed import Dist
from blues_torch.expert_parallel import build_layout, check_layout, parallelize
from blues_torch.state_dict_adapter import load_canonical
from blues_torch.step_graph import GraphedTrainStep
from blues_torch.training import (PRECISION_MODES, TrainStep, autocast_for, compile_cache_hits, compiled_graphs,
                                  evaluate, make_engine, make_next_logits, make_optimizer, precision_mode, to_device,
                                  use_compile_cache)

SCRIPT = "train_torch.py"
# DeepSpeed's ZeRO calls a collective that torch deprecated; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated")


class TorchTrainer:
    """blues.loop's Trainer: the step, evaluation and checkpoints of one PyTorch run."""

    def __init__(self, args, dist, layout, model, step_fn: TrainStep, train_iter, splits, tokenizer, checkpointer,
                 guard, metrics, stop, budget, best):
        self.args, self.dist, self.layout, self.model, self.step_fn = args, dist, layout, model, step_fn
        self.train_iter, self.splits, self.tokenizer = train_iter, splits, tokenizer
        self.checkpointer, self.guard, self.metrics, self.stop, self.budget, self.best = (
            checkpointer, guard, metrics, stop, budget, best)
        self.autocast = lambda: autocast_for(args.precision, dist.device, step_fn.engine)
        self.graphs_first_step = None
        self.sample_window = sample_window(tokenizer, args.seq_len)
        # one process queues a step before reading the last (blues/loop.py), unless its step waits for
        # the device anyway (a DeepSpeed step that reads its gradient norm on the host) or there is no
        # device to queue on: a CPU step runs as it is launched, so queueing it gains nothing and would
        # time each step's work in the step before it
        self.run_ahead = dist.world_size == 1 and not step_fn.waits_on_host and dist.device.type != "cpu"

    def launch(self, lr: float, inject_nan: bool) -> Callable[[], StepResult]:
        batches = [to_device(next(self.train_iter), self.dist.device) for _ in range(self.args.grad_accum)]
        # the stop signal and the time budget ride in the loss all-reduce: every rank stops at the same step
        pending = self.step_fn(batches, lr, inject_nan, flags=(bool(self.stop), self.budget.expired()))
        if self.args.compile and self.graphs_first_step is None:
            self.graphs_first_step = compiled_graphs()

        def wait() -> StepResult:
            values, applied = pending.read()
            return StepResult(values[:4], values[6], applied, stop_elsewhere=values[4] > 0, out_of_time=values[5] > 0)
        return wait

    def evaluate(self, step: int) -> float:
        """Validation loss and expert utilization (logged), then the sample continuations. Every rank
        runs the same forwards (MoE layers exchange tokens between ranks); rank 0 prints."""
        acc = evaluate(self.model, self.splits.val, self.args, self.dist, self.autocast)
        self.best.update(step, acc.loss, self.canonical_weights)  # collective: experts gathered
        if self.dist.is_main:
            self.metrics.log_eval(step=step, val_loss=acc.loss, experts=acc.experts.summary())
            log(f"step {step}: val loss {acc.loss:.4f} (perplexity {math.exp(min(acc.loss, 700)):.1f})")
        quiet = contextlib.nullcontext() if self.dist.is_main else contextlib.redirect_stderr(io.StringIO())
        with quiet:
            log_samples(self.tokenizer, make_next_logits(self.model, self.dist, self.autocast, self.sample_window),
                        step=step, context=self.sample_window, seed=self.args.seed,
                        metrics=self.metrics if self.dist.is_main else None)
        if self.dist.is_main:
            self.metrics.flush()
        return acc.loss

    def canonical_weights(self) -> dict:
        """The canonical tensors of the whole model (every rank calls it; the experts are gathered)."""
        full = full_state_dict(self.model, self.layout)
        return read_model(self.args.model_config, lambda spec: full[spec.path].float().cpu().numpy())

    def save(self, step: int) -> None:
        self.checkpointer.save(step, self.train_iter.state_dict(), self.guard)

    def after_step(self) -> None:
        pass


def main(argv) -> int:
    args = parse_args(argv, "torch")
    started = time.time()
    budget = TimeBudget(args.max_minutes)
    reuse_freed_host_memory()  # CPU: no page-faulting of the LM head's big buffers every step
    compile_cache = use_compile_cache()  # before anything compiles (--compile, the loss's chunk softmax)

    dist = Dist(args.deepspeed is not None)
    ds_config, file_sources = None, {}
    if args.deepspeed is not None:
        ds_config, args, file_sources = resolve_deepspeed_config(args, dist.world_size)
    cfg = args.model_config
    check_layout(dist.world_size, args.expert_parallel, cfg.tot_num_experts)
    tokenizer = load_tokenizer()
    cfg.check_tokenizer(tokenizer.n_vocab)

    # Everything that can be refused is checked before the run directory exists.
    resume_path = ckpt.resolve_resume(args.resume, args.out_dir) if dist.is_main else None
    resume_path = dist.broadcast(str(resume_path) if resume_path else None)
    resume_path = Path(resume_path) if resume_path else None
    resume_state = check_resumable(resume_path, args, dist) if resume_path else None
    init_arrays = (load_init_weights(args.init_from, cfg) if args.init_from is not None and resume_path is None
                   else None)

    with RunDir(args.out_dir, is_main=dist.is_main) as run_dir, GracefulStop() as stop:
        # Data: rank 0 tokenizes into the cache first, the others then read it.
        if not dist.is_main:
            dist.barrier()
        splits = prepare_data(args.data, seq_len=args.seq_len, tokenizer=tokenizer, show_progress=dist.is_main,
                              text_column=args.text_column, workers=args.workers, val_fraction=args.val_fraction)
        if dist.is_main:
            dist.barrier()
        train_iter = BatchIterator(splits.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                                   rank=dist.rank, world_size=dist.world_size, vocab_size=cfg.vocab_size)

        layout = build_layout(args.expert_parallel, cfg.tot_num_experts, deepspeed=ds_config is not None)
        # The weights are drawn on the device (the CPU generator is serial: 19.6 s for the bench
        # preset's on a 2-core CPU); rank 0's are every rank's, as a GPU's random stream may depend on
        # its kernel launch shape.
        torch.manual_seed(args.seed)
        with torch.device(dist.device):
            model = BluesModel(cfg, attn_impl=args.attn_impl)
        dist.broadcast_tensors(model.parameters())
        if init_arrays is not None:  # --init_from: canonical weights instead of the random init
            load_canonical(model, init_arrays)
        parallelize(model, layout)  # keep this rank's experts only (P > 1)
        # Router noise: its own generator per rank (ranks see different tokens), saved in checkpoints.
        gen = torch.Generator(device=dist.device)
        gen.manual_seed(args.seed * 7919 + 1 + dist.rank)
        engine = None
        if ds_config is None:
            optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, device=dist.device)
        else:
            engine, optimizer = make_engine(model, ds_config, args.weight_decay, layout)
        step_fn = TrainStep(model, optimizer, dist=dist, grad_clip=args.grad_clip, precision=args.precision, gen=gen,
                            engine=engine, compile=args.compile, layout=layout)
        if args.cuda_graph:
            step_fn = GraphedTrainStep(step_fn)

        checkpointer = Checkpointer(args, dist, model, optimizer, engine, gen, layout)
        guard = BadStepGuard(args.max_bad_steps)
        step = 0
        if resume_path is not None:
            checkpointer.load(resume_path, resume_state)
            step = int(resume_state["step"])
            train_iter.load_state_dict(resume_state["data"])
            guard.load_state_dict(resume_state["bad_steps"])
            checkpointer.last = resume_path

        run_dir.create()
        if resume_path is not None:
            write_param_hash(model, args.out_dir, dist.rank, "loaded")
        metrics = MetricsLogger(args.out_dir, enabled=dist.is_main, resume_step=step)
        if dist.is_main:
            with open(Path(args.out_dir) / "config.json", "w", encoding="utf-8") as f:
                json.dump({"model_config": cfg.to_dict(), "train_args": args.to_dict(),
                           "world_size": dist.world_size, "deepspeed_config": ds_config}, f, indent=1)
            log(f"{'resuming from ' + str(resume_path) + ' at step ' + str(step) if resume_path else 'starting'}: "
                f"preset {args.preset}, {cfg.num_parameters() / 1e6:.1f}M parameters, data {splits.source} "
                f"({len(splits.train):,} train / {len(splits.val):,} val tokens), device {dist.device}"
                f"{' x' + str(dist.world_size) if dist.world_size > 1 else ''}"
                f"{', DeepSpeed ZeRO-' + str(ds_config['zero_optimization']['stage']) if ds_config else ''}"
                f"{', ' + PRECISION_MODES[precision_mode(args.precision, engine)] if ds_config else ''}"
                f"{', experts split ' + str(layout.expert_parallel) + ' ways' if layout.expert_parallel > 1 else ''}; "
                f"writing to {args.out_dir}\n" + settings_lines(args, ranks=dist.world_size, file_sources=file_sources))

        best = BestExport(args.out_dir, cfg, enabled=args.save_best, is_main=dist.is_main,
                          resuming=resume_path is not None)
        trainer = TorchTrainer(args, dist, layout, model, step_fn, train_iter, splits, tokenizer, checkpointer, guard,
                               metrics, stop, budget, best)
        first_step = step
        model.train()
        result = loop.train(trainer, args, step, guard=guard, metrics=metrics, stop=stop, budget=budget,
                            is_main=dist.is_main,
                            tokens_per_step=args.batch_size * args.seq_len * args.grad_accum * dist.world_size)
        if args.compile and dist.is_main:  # recompiling every step would be a silent slowdown: say so
            hits, misses = compile_cache_hits()
            log(f"torch.compile: {compiled_graphs()} graph(s) compiled for the training step, "
                f"{trainer.graphs_first_step if trainer.graphs_first_step is not None else '?'} of them by the end "
                f"of its first step; {hits} of {hits + misses} inductor graph(s) loaded from {compile_cache}")
        metrics.close()
        write_param_hash(model, args.out_dir, dist.rank, "final")
        if dist.is_main:
            plot_losses(metrics.path, Path(args.out_dir) / "loss.png")
            plot_experts(metrics.path, Path(args.out_dir) / "experts.png")
        return loop.finish(result, script=SCRIPT, argv=argv, args=args, stop=stop, checkpoint=checkpointer.last,
                           guard=guard, elapsed=time.time() - started, first_step=first_step, best=best,
                           is_main=dist.is_main)


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Train Blues with PyTorch: one process (GPU if present, else CPU) or DeepSpeed (ZeRO 1/2).

    python train_torch.py                                   # tiny preset, embedded corpus
    python train_torch.py --preset small --precision bf16 --max_steps 2000
    deepspeed --num_gpus=8 train_torch.py --deepspeed ds_config.json --preset small
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 train_torch.py --deepspeed ds_config.json --precision fp32
    deepspeed --hostfile hosts train_torch.py --deepspeed ds_config.json ...   # multi-node (DeepSpeed's launcher)

Flags: `python train_torch.py --help` (shared with train_jax.py: blues/train_args.py).

Optimizer: AdamW, betas (0.9, 0.95), eps 1e-8, decoupled weight decay on matrices only (every
parameter with ndim >= 2: embedding, attention, router, experts); RMSNorm scales are not decayed.
Learning rate from blues/schedule.py, set on the param groups before each update; gradients
clipped by global norm (`grad_norm` in the metrics is the norm before clipping). Gradient
accumulation averages the micro-batch losses. bf16: autocast with float32 master weights (plain)
or DeepSpeed's bf16 with float32 optimizer state.

DeepSpeed: `ds_config.json` configures ZeRO, bf16, clipping and the optimizer. One source of
truth: a flag given on the command line overrides the JSON and is written into the config passed
to `deepspeed.initialize`; a flag not given takes the JSON's value (batch_size <->
train_micro_batch_size_per_gpu, grad_accum <-> gradient_accumulation_steps, lr / weight_decay <->
optimizer.params, grad_clip <-> gradient_clipping, precision <-> bf16.enabled). Checkpoints are
DeepSpeed's own (`engine.save_checkpoint`), inside the same atomic step directories.

Checkpoints (plain): DIR/checkpoints/step_XXXXXXXX/ holds model.safetensors (the module's state
dict: canonical names, embedding with its zero padding rows), optimizer.pt and rng.pt (tensors and
primitives only: loaded with torch.load(weights_only=True), so loading never runs code),
trainer_state.json (step, config, flags, data position, bad-step counter, python/numpy RNG) and the
COMMITTED manifest (blues/checkpointing.py). Resuming restores all of it, so a resumed run repeats
an uninterrupted one bit for bit on CPU in float32.

Faults: SIGINT/SIGTERM finish the step, checkpoint and exit 0; a non-finite loss or gradient
norm skips the update, and `--max_bad_steps` consecutive ones stop the run (exit 1) with a
checkpoint. Tests inject NaNs with the hidden flag `--inject_nan STEP[,STEP]` (1-based steps) and
interrupt deterministically with `--stop_after N` (blues/train_args.py). With the environment
variable BLUES_WRITE_PARAM_HASH=1 every rank writes the sha256 of its parameters after loading a
checkpoint and at the end (DIR/param_sha256_rank<R>_<loaded|final>.txt; the DeepSpeed test compares
ranks with it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from blues import checkpointing as ckpt
from blues.cli import run_main
from blues.errors import CheckpointError, ConfigError, UsageError
from blues.metrics import MetricsLogger
from blues.schedule import learning_rate
from blues.train_args import TrainArgs, check_numbers, load_json_file, parse_args
from blues.train_loop import (BadStepGuard, BestExport, EvalAccumulator, GracefulStop, Progress, RunDir,
                              SpikeDetector, StepTimer, TimeBudget, log, log_samples, resume_command,
                              reuse_freed_host_memory, summary_line)
from parity.convert import to_canonical
from parity.optim_convert import deepspeed_safe_globals
from parity.safetensors_io import load_init_weights

SCRIPT = "train_torch.py"
BETAS, EPS = (0.9, 0.95), 1e-8
# Evaluation materialises [rows, T, V] float32 logits; rows are chosen so one forward holds at
# most this many tokens (~0.8 GB of logits at V = 200k) whatever the batch size.
EVAL_TOKENS_PER_FORWARD = 1024
# DeepSpeed's ZeRO calls a collective that torch deprecated; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated")


# ---- the parallel context ---------------------------------------------------------------------------

class Dist:
    """Rank/world/device; DeepSpeed initialises torch.distributed, plain runs are rank 0 of 1."""

    def __init__(self, deepspeed_enabled: bool):
        import torch

        self.deepspeed = deepspeed_enabled
        if deepspeed_enabled:
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            deepspeed.init_distributed()
            import torch.distributed as tdist

            from blues_torch.deepspeed_shm import release_shm_segment

            self.rank, self.world_size = tdist.get_rank(), tdist.get_world_size()
            release_shm_segment(self.rank, self.barrier)
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            acc = get_accelerator()
            if acc.device_name() == "cuda":
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            else:
                self.device = torch.device(acc.device_name())
        else:
            self.rank, self.world_size, self.local_rank = 0, 1, 0
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values):
        """Mean over ranks of a float32 tensor."""
        if self.world_size > 1:
            import torch.distributed as tdist

            values = values.clone()
            tdist.all_reduce(values)
            values /= self.world_size
        return values


# ---- DeepSpeed config: one source of truth ---------------------------------------------------------

# flag -> its path in ds_config.json
_DS_FIELDS = {
    "batch_size": ("train_micro_batch_size_per_gpu",),
    "grad_accum": ("gradient_accumulation_steps",),
    "lr": ("optimizer", "params", "lr"),
    "weight_decay": ("optimizer", "params", "weight_decay"),
    "grad_clip": ("gradient_clipping",),
}


def _ds_get(cfg: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(cfg, dict) or key not in cfg:
            return None
        cfg = cfg[key]
    return cfg


def _ds_set(cfg: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        cfg = cfg.setdefault(key, {})
    cfg[path[-1]] = value


def resolve_deepspeed_config(args: TrainArgs, world_size: int) -> tuple[dict, TrainArgs]:
    """Merge flags and ds_config.json: explicit flags win and are written into the dict."""
    path = args.deepspeed
    cfg = load_json_file(path, "--deepspeed")
    where = f"--deepspeed {path}"
    if (_ds_get(cfg, ("fp16", "enabled")) or False) is True:
        raise ConfigError(f"{where}: field 'fp16.enabled' is not supported; use bf16 (or --precision fp32)")
    opt_type = _ds_get(cfg, ("optimizer", "type"))
    if not isinstance(opt_type, str) or opt_type.lower() != "adamw":
        raise ConfigError(f"{where}: field 'optimizer.type' must be \"AdamW\" (Blues trains with AdamW), got {opt_type!r}")
    stage = _ds_get(cfg, ("zero_optimization", "stage"))
    if stage not in (1, 2):
        raise ConfigError(f"{where}: field 'zero_optimization.stage' must be 1 or 2, got {stage!r}")
    if _ds_get(cfg, ("scheduler",)) is not None:
        raise ConfigError(f"{where}: remove the 'scheduler' section; the schedule comes from --lr, --min_lr, "
                          f"--warmup_steps and --max_steps (blues/schedule.py)")

    values = {}
    for flag, field_path in _DS_FIELDS.items():
        name = ".".join(field_path)
        if flag in args.explicit or _ds_get(cfg, field_path) is None:
            values[flag] = getattr(args, flag)
        else:
            value = _ds_get(cfg, field_path)
            want = int if flag in ("batch_size", "grad_accum") else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and not isinstance(value, int)):
                raise ConfigError(f"{where}: field '{name}' must be {'an integer' if want is int else 'a number'}, got {value!r}")
            values[flag] = want(value)
    bf16_json = (_ds_get(cfg, ("bf16", "enabled")) or False) is True
    precision = args.precision if "precision" in args.explicit else ("bf16" if bf16_json else "fp32")
    try:
        check_numbers({**{k: getattr(args, k) for k in ("max_steps", "eval_every", "eval_batches", "save_every",
                                                        "keep_checkpoints", "max_bad_steps", "warmup_steps",
                                                        "seed", "min_lr", "max_minutes")}, **values})
    except UsageError as e:
        raise ConfigError(f"{where} (or the flag overriding it): {e}") from None

    for flag, field_path in _DS_FIELDS.items():
        _ds_set(cfg, field_path, values[flag])
    _ds_set(cfg, ("bf16", "enabled"), precision == "bf16")
    if precision == "bf16":
        _ds_set(cfg, ("bf16", "check_grad_overflow"), True)  # non-finite grads skip the step
    cfg["train_batch_size"] = values["batch_size"] * values["grad_accum"] * world_size
    cfg["optimizer"]["params"].setdefault("betas", list(BETAS))
    cfg["optimizer"]["params"].setdefault("eps", EPS)
    cfg.setdefault("steps_per_print", 10 ** 9)  # progress comes from our bar, not DeepSpeed's log
    return cfg, args.replace(precision=precision, **values)


# ---- model, optimizer, batches ------------------------------------------------------------------

def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (ndim >= 2) only; RMSNorm scales (ndim 1) are not decayed."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_device(batch, device):
    import torch

    x, y = batch
    return (torch.from_numpy(x).to(device, non_blocking=True).long(),  # [B, T]
            torch.from_numpy(y).to(device, non_blocking=True).long())  # [B, T]


# ---- checkpoints --------------------------------------------------------------------------------

@contextlib.contextmanager
def _weights_only_loads(extra_safe_globals=()):
    """Force every torch.load inside (DeepSpeed's included) to weights_only=True."""
    import torch

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(list(extra_safe_globals)):
            yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _safe_load(path: Path, device):
    import pickle

    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path} cannot be loaded safely (refused, nothing executed): {first}") from None


def rng_state(gen) -> dict:
    import torch

    state = {"torch_cpu": torch.get_rng_state(), "router": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen) -> None:
    import torch

    torch.set_rng_state(state["torch_cpu"])
    gen.set_state(state["router"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def host_rng_state() -> dict:
    """python and numpy global RNG states, as JSON (neither is used by training; kept for completeness)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_host_rng_state(state: dict) -> None:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Checkpointer:
    """Saves/loads plain or DeepSpeed checkpoints in blues.checkpointing's atomic directories."""

    def __init__(self, args: TrainArgs, dist: Dist, model, optimizer, engine, gen):
        self.args, self.dist, self.model, self.optimizer, self.engine, self.gen = (
            args, dist, model, optimizer, engine, gen)
        self.root = Path(args.out_dir) / "checkpoints"
        self.last: Path | None = None

    def trainer_state(self, step: int, data_state: dict, guard: BadStepGuard) -> dict:
        return {"step": step, "framework": "torch", "deepspeed": self.engine is not None,
                "model_config": self.args.model_config.to_dict(), "train_args": self.args.to_dict(),
                "world_size": self.dist.world_size, "data": data_state, "bad_steps": guard.state_dict(),
                "host_rng": host_rng_state()}

    def save(self, step: int, data_state: dict, guard: BadStepGuard) -> Path:
        import torch

        state = self.trainer_state(step, data_state, guard)
        if self.engine is None:
            from safetensors.torch import save_file

            def write(tmp: Path) -> None:
                weights = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
                save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(rng_state(self.gen), tmp / "rng.pt")
                ckpt.write_json(tmp / ckpt.TRAINER_STATE, state)

            path = ckpt.save(self.root, step, write, framework="torch")
        else:
            # Collective: every rank writes its ZeRO shards and its RNG; rank 0 commits.
            tmp = self.root / f".tmp-{ckpt.step_dirname(step)}-ds"
            if self.dist.is_main:
                ckpt.begin(self.root, step, token="ds")
            self.dist.barrier()
            self.engine.save_checkpoint(str(tmp), tag="ds", client_state={"step": step}, save_latest=False)
            torch.save(rng_state(self.gen), tmp / f"rng_rank{self.dist.rank:05d}.pt")
            self.dist.barrier()
            path = None
            if self.dist.is_main:
                ckpt.write_json(tmp / ckpt.TRAINER_STATE, state)
                path = ckpt.commit(tmp, self.root, step, framework="torch")
            self.dist.barrier()
            path = self.root / ckpt.step_dirname(step)
        if self.dist.is_main:
            ckpt.prune(self.root, self.args.keep_checkpoints)
        self.last = path
        return path

    def load(self, path: Path, state: dict) -> None:
        """Restore weights, optimizer and RNG from `path` (verified; `state` checked by check_resume)."""
        if self.engine is None:
            self._load_plain(path)
        else:
            self._load_deepspeed(path, state)
        set_host_rng_state(state["host_rng"])

    def _load_plain(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path / "model.safetensors"), device=str(self.dist.device))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'} is not a readable safetensors file ({e})") from None
        try:
            self.model.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(_safe_load(path / "optimizer.pt", self.dist.device))
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path} does not fit this model/optimizer: {first}") from None
        set_rng_state(_safe_load(path / "rng.pt", "cpu"), self.gen)

    def _load_deepspeed(self, path: Path, state: dict) -> None:
        rng_file = path / f"rng_rank{self.dist.rank:05d}.pt"
        with _weights_only_loads(deepspeed_safe_globals()):
            try:
                load_path, client = self.engine.load_checkpoint(str(path), tag="ds", load_module_strict=True,
                                                                load_optimizer_states=True,
                                                                load_lr_scheduler_states=False)
            except CheckpointError:
                raise
            except Exception as e:  # DeepSpeed raises many kinds; name the checkpoint and stop
                first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
                raise CheckpointError(f"{path}: DeepSpeed could not load it ({first})") from None
        if load_path is None:
            raise CheckpointError(f"{path}: DeepSpeed found no checkpoint under tag 'ds'")
        if client.get("step") != state["step"]:
            raise CheckpointError(f"{path}: DeepSpeed's step {client.get('step')} != trainer state's {state['step']}")
        if rng_file.exists():
            set_rng_state(_safe_load(rng_file, "cpu"), self.gen)
        elif self.dist.is_main:
            log(f"note: {path} has no RNG state for rank {self.dist.rank} (different world size); "
                f"router noise restarts from the seed")


def write_param_hash(model, out_dir, rank: int, tag: str) -> None:
    """Test hook (BLUES_WRITE_PARAM_HASH=1): sha256 over this rank's parameters, in order."""
    if os.environ.get("BLUES_WRITE_PARAM_HASH") != "1":
        return
    import hashlib

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    Path(out_dir, f"param_sha256_rank{rank}_{tag}.txt").write_text(h.hexdigest() + "\n")


def check_resumable(path: Path, args: TrainArgs, dist: Dist) -> dict:
    """The checkpoint's trainer state, refused early if it cannot continue this run."""
    state = ckpt.read_trainer_state(path, framework="torch")
    notes = ckpt.check_resume(state, args.to_dict(), world_size=dist.world_size, checkpoint=path)
    if bool(state.get("deepspeed")) != (args.deepspeed is not None):
        kind = "a DeepSpeed" if state.get("deepspeed") else "a plain (non-DeepSpeed)"
        raise CheckpointError(f"{path} is {kind} checkpoint; resume it the same way it was trained "
                              f"({'with' if state.get('deepspeed') else 'without'} --deepspeed)")
    if int(state["step"]) >= args.max_steps:
        raise UsageError(f"--max_steps {args.max_steps}: the checkpoint {path} is already at step "
                         f"{state['step']}; pass a larger --max_steps to train further")
    if dist.is_main:
        for note in notes:
            log(f"note: {note}")
    return state


# ---- evaluation ---------------------------------------------------------------------------------

def evaluate(model, val_tokens, args: TrainArgs, dist: Dist, autocast) -> EvalAccumulator:
    """Token-weighted validation loss and expert utilization over `--eval_batches` batches."""
    import torch

    from blues.data import eval_batches

    cfg = args.model_config
    acc = EvalAccumulator()
    rows = max(1, EVAL_TOKENS_PER_FORWARD // args.seq_len)
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)  # loss * tokens, tokens
    counts = torch.zeros(cfg.num_layers, cfg.tot_num_experts, dtype=torch.float64, device=dist.device)
    dropped = torch.zeros(cfg.num_layers, dtype=torch.float64, device=dist.device)
    with torch.no_grad(), autocast():
        for batch in eval_batches(val_tokens, args.seq_len, args.batch_size, args.eval_batches, rank=dist.rank,
                                  world_size=dist.world_size, vocab_size=cfg.vocab_size):
            x, y = to_device(batch, dist.device)  # [B, T] each
            for start in range(0, x.shape[0], rows):
                out = model(x[start:start + rows], y[start:start + rows])
                n = y[start:start + rows].numel()
                totals += torch.stack([out.lm_loss.double() * n, torch.tensor(n, dtype=torch.float64,
                                                                               device=dist.device)])
                counts += out.expert_counts.double()
                dropped += out.dropped.double()
    if dist.world_size > 1:
        import torch.distributed as tdist

        for t in (totals, counts, dropped):
            tdist.all_reduce(t)
    acc.update(totals[0].item() / max(totals[1].item(), 1.0), int(totals[1].item()),
               counts.cpu().numpy(), dropped.cpu().numpy())
    model.train(was_training)
    return acc


def make_next_logits(model, device, autocast):
    import torch

    def next_logits(ids: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast():
            out = model(torch.from_numpy(ids).to(device).long())  # logits [1, t, V]
        model.train(was_training)
        return out.logits[0, -1].float().cpu().numpy()  # [V]

    return next_logits


# ---- main ---------------------------------------------------------------------------------------

def main(argv) -> int:
    args = parse_args(argv, "torch")
    started = time.time()
    budget = TimeBudget(args.max_minutes)
    reuse_freed_host_memory()  # CPU: no page-faulting of the LM head's big buffers every step

    import torch

    from blues.data import BatchIterator, prepare_data
    from blues.tokenizer import load_tokenizer
    from blues_torch import BluesModel

    dist = Dist(args.deepspeed is not None)
    ds_config = None
    if args.deepspeed is not None:
        ds_config, args = resolve_deepspeed_config(args, dist.world_size)
    cfg = args.model_config
    tokenizer = load_tokenizer()
    cfg.check_tokenizer(tokenizer.n_vocab)

    # Everything that can be refused is checked before the run directory exists.
    resume_path = ckpt.resolve_resume(args.resume, args.out_dir) if dist.is_main else None
    resume_path = dist.broadcast(str(resume_path) if resume_path else None)
    resume_path = Path(resume_path) if resume_path else None
    resume_state = check_resumable(resume_path, args, dist) if resume_path else None
    init_arrays = load_init_weights(args.init_from, args.model_config) if args.init_from is not None and resume_path is None else None

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

        torch.manual_seed(args.seed)  # identical initial weights on every rank
        model = BluesModel(cfg, attn_impl=args.attn_impl).to(dist.device)
        if init_arrays is not None:  # --init_from: canonical weights instead of the random init
            from parity.convert import load_canonical

            load_canonical(model, init_arrays)
        # Router noise: its own generator per rank (ranks see different tokens), saved in checkpoints.
        gen = torch.Generator(device=dist.device)
        gen.manual_seed(args.seed * 7919 + 1 + dist.rank)

        engine = None
        if ds_config is None:
            optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=BETAS,
                                          eps=EPS, fused=dist.device.type in ("cuda", "cpu"))
            train_model = model
        else:
            import deepspeed

            from blues_torch import deepspeed_norms

            deepspeed_norms.install()  # ZeRO's per-gradient norm/overflow loops cost ~60 ms of host time a step
            engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                           model_parameters=param_groups(model, args.weight_decay))
            train_model = engine
        if args.compile:
            train_model = compile_for_training(train_model, engine)
        use_bf16 = args.precision == "bf16" and engine is None  # DeepSpeed does bf16 itself

        def autocast():
            if use_bf16:
                return torch.autocast(device_type=dist.device.type, dtype=torch.bfloat16)
            return contextlib.nullcontext()

        checkpointer = Checkpointer(args, dist, model, optimizer, engine, gen)
        guard = BadStepGuard(args.max_bad_steps)
        step = 0
        if resume_path is not None:
            checkpointer.load(resume_path, resume_state)
            step = int(resume_state["step"])
            train_iter.load_state_dict(resume_state["data"])
            guard.load_state_dict(resume_state["bad_steps"])
            checkpointer.last = resume_path
            write_param_hash(model, args.out_dir, dist.rank, "loaded")

        run_dir.create()
        metrics = MetricsLogger(args.out_dir, enabled=dist.is_main, resume_step=step)
        if dist.is_main:
            n_params = cfg.num_parameters()
            with open(Path(args.out_dir) / "config.json", "w", encoding="utf-8") as f:
                json.dump({"model_config": cfg.to_dict(), "train_args": args.to_dict(),
                           "world_size": dist.world_size, "deepspeed_config": ds_config}, f, indent=1)
            log(f"{'resuming from ' + str(resume_path) + ' at step ' + str(step) if resume_path else 'starting'}: "
                f"preset {args.preset}, {n_params / 1e6:.1f}M parameters, data {splits.source} "
                f"({len(splits.train):,} train / {len(splits.val):,} val tokens), device {dist.device}"
                f"{' x' + str(dist.world_size) if dist.world_size > 1 else ''}, {args.precision}"
                f"{', DeepSpeed ZeRO-' + str(ds_config['zero_optimization']['stage']) if ds_config else ''}; "
                f"writing to {args.out_dir}")

        run = Run(args, dist, model, train_model, engine, optimizer, gen, train_iter, splits, tokenizer, checkpointer,
                  guard, metrics, stop, autocast, budget,
                  BestExport(args.out_dir, args.model_config, enabled=args.save_best, is_main=dist.is_main,
                             resuming=resume_path is not None))
        result = train(run, step)
        if args.compile and dist.is_main:  # recompiling every step would be a silent slowdown: say so
            log(f"torch.compile: {compiled_graphs()} graph(s) compiled for the training step, "
                f"{result.get('graphs_first_step', '?')} of them by the end of its first step")
        metrics.close()
        write_param_hash(model, args.out_dir, dist.rank, "final")
        if dist.is_main:
            from blues.plots import plot_experts, plot_losses  # matplotlib: only when there is a plot to draw

            plot_losses(metrics.path, Path(args.out_dir) / "loss.png")
            plot_experts(metrics.path, Path(args.out_dir) / "experts.png")
        if result["status"] == "stopped":
            if dist.is_main:
                log(f"stopped by {stop.requested} after step {result['step']}; checkpoint {checkpointer.last}")
                print(f"to resume: {resume_command(SCRIPT, argv, args.out_dir)}", flush=True)
            return 0
        if result["status"] == "bad":
            msg = (f"stopped after {args.max_bad_steps} consecutive non-finite steps (step {result['step']}); "
                   f"the last good weights are in {checkpointer.last}; lower --lr or check the data, then resume "
                   f"with: {resume_command(SCRIPT, argv, args.out_dir)}")
            if dist.is_main:
                print(f"{SCRIPT}: error: {msg}", file=sys.stderr, flush=True)
            return 1
        if dist.is_main:
            print(summary_line(steps=result["step"], elapsed=time.time() - started, train_loss=result["loss"],
                               val_loss=result["val_loss"], skipped=guard.skipped, checkpoint=checkpointer.last,
                               out_dir=args.out_dir, best=run.best), flush=True)
    return 0


@dataclass
class Run:
    """Everything the loop works with, built by main()."""
    args: TrainArgs
    dist: Dist
    model: object  # the BluesModel (DeepSpeed: engine.module)
    train_model: object  # what the forward pass is called on: the model or the DeepSpeed engine
    engine: object | None
    optimizer: object
    gen: object  # the router-noise torch.Generator
    train_iter: object  # blues.data.BatchIterator
    splits: object  # blues.data.TokenSplits
    tokenizer: object
    checkpointer: Checkpointer
    guard: BadStepGuard
    metrics: MetricsLogger
    stop: GracefulStop
    autocast: Callable
    budget: TimeBudget  # --max_minutes
    best: BestExport  # --save_best


def compile_for_training(train_model, engine):
    """--compile: torch.compile the module that runs the training forward (DeepSpeed: its engine's
    own compile). Only the training step is compiled; evaluation and sampling stay eager.
    `fallback_random` makes compiled dropout draw the same numbers as eager from the same RNG state,
    so the run's random streams, checkpoints and exact resume mean what they mean in eager mode."""
    import torch

    torch._inductor.config.fallback_random = True
    if engine is not None:
        engine.compile()
        return engine
    return torch.compile(train_model)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def train(run: Run, step: int) -> dict:
    """The loop: `step` optimizer updates are done; run until max_steps, a stop signal or too many bad steps."""
    import torch

    args, dist, model, engine, optimizer = run.args, run.dist, run.model, run.engine, run.optimizer
    train_model, gen, train_iter, guard, metrics, stop = (run.train_model, run.gen, run.train_iter, run.guard,
                                                         run.metrics, run.stop)
    checkpointer, autocast = run.checkpointer, run.autocast
    params = [p for p in model.parameters()]
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * dist.world_size
    spikes = SpikeDetector()
    progress = Progress(args.max_steps, step, enabled=dist.is_main)
    timer = StepTimer()
    last_loss, val_loss = None, None
    first_step, graphs_first_step = step + 1, None
    model.train()
    try:
        while step < args.max_steps:
            timer.restart()
            lr = learning_rate(step, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
                               max_steps=args.max_steps)
            set_lr(optimizer, lr)
            inject = (step + 1) in args.inject_nan
            sums = torch.zeros(6, dtype=torch.float32, device=dist.device)  # loss, lm, aux, z, stop, time up
            for _ in range(args.grad_accum):
                x, y = to_device(next(train_iter), dist.device)  # [B, T] each
                with autocast():
                    out = train_model(x, y, generator=gen)
                loss = out.loss * float("nan") if inject else out.loss  # test hook: --inject_nan
                sums[:4] += torch.stack([loss.detach(), out.lm_loss.detach(), out.aux_loss.detach(),
                                         out.z_loss.detach()]).float()
                if engine is None:
                    (loss / args.grad_accum).backward()
                else:
                    engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
                    engine.step()  # applies the update only at the accumulation boundary
            # One all-reduce carries the losses and whether any rank was asked to stop or is out of
            # time, so that all ranks stop (and save, collectively) at the same step.
            sums[4] = float(bool(stop)) * args.grad_accum
            sums[5] = float(run.budget.expired()) * args.grad_accum
            reduced = dist.mean(sums / args.grad_accum)
            if engine is None:
                max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
                grad_norm_t = torch.nn.utils.clip_grad_norm_(params, max_norm)  # norm before clipping
                values = torch.cat([reduced, grad_norm_t.float().reshape(1)]).tolist()
                ok = guard.check(values[0], values[6])
                if ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = engine.get_global_grad_norm()
                values = reduced.tolist() + [float("nan") if grad_norm is None else float(grad_norm)]
                ok = guard.check(values[0], values[6]) and engine.was_step_applied()
                if not ok and guard.consecutive == 0:  # DeepSpeed skipped an update we thought fine
                    guard.skipped += 1
                    guard.consecutive += 1
            if values[4] > 0 and not stop:
                stop.requested = "a stop signal on another rank"
            step += 1
            if step == first_step and args.compile:
                graphs_first_step = compiled_graphs()
            tps = timer.tokens_per_s(tokens_per_step)
            metrics.log_train(step=step, loss=values[0], lm_loss=values[1], aux_loss=values[2], z_loss=values[3],
                              lr=lr, grad_norm=values[6], tokens_per_s=tps, skipped_steps=guard.skipped)
            if ok:
                last_loss = values[0]
                spikes.update(step, values[0])
            else:
                log(f"warning: step {step}: non-finite loss {values[0]} or gradient norm {values[6]}; "
                    f"update skipped ({guard.consecutive}/{args.max_bad_steps} in a row)")
            progress.update(step, values[0], tps, lr)

            if guard.should_stop:
                checkpointer.save(step, train_iter.state_dict(), guard)
                return {"status": "bad", "step": step}
            out_of_time = values[5] > 0
            if out_of_time and dist.is_main:
                log(f"--max_minutes {args.max_minutes:g} reached after step {step}: finishing the run here")
            last = step == args.max_steps or out_of_time
            if step % args.eval_every == 0 or last:
                val_loss = run_eval(run, step)
            if step == args.stop_after and not stop:
                stop.requested = f"--stop_after {step}"
            if stop:
                checkpointer.save(step, train_iter.state_dict(), guard)
                return {"status": "stopped", "step": step}
            if step % args.save_every == 0 or last:
                checkpointer.save(step, train_iter.state_dict(), guard)
            if out_of_time:
                break
    finally:
        progress.close()
    return {"status": "done", "step": step, "loss": last_loss, "val_loss": val_loss,
            "graphs_first_step": graphs_first_step}


def run_eval(run: Run, step: int) -> float:
    """Validation loss and expert utilization (logged), then the sample continuations (rank 0)."""
    acc = evaluate(run.model, run.splits.val, run.args, run.dist, run.autocast)
    # every rank holds the whole model (not a collective): only the rank that writes copies it out
    run.best.update(step, acc.loss, lambda: to_canonical(run.model) if run.dist.is_main else {})
    if run.dist.is_main:
        run.metrics.log_eval(step=step, val_loss=acc.loss, experts=acc.experts.summary())
        log(f"step {step}: val loss {acc.loss:.4f} (perplexity {math.exp(min(acc.loss, 700)):.1f})")
        log_samples(run.tokenizer, make_next_logits(run.model, run.dist.device, run.autocast), step=step,
                    context=run.args.seq_len, seed=run.args.seed, metrics=run.metrics)
        run.metrics.flush()
    return acc.loss


if __name__ == "__main__":
    sys.exit(run_main(main))

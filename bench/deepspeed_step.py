"""Training throughput through DeepSpeed: ZeRO-2, bf16, one GPU — train_torch.py's `--deepspeed` path.

The engine is built in this process with a single-rank process group (RANK 0 of WORLD_SIZE 1,
set in the environment before `deepspeed.init_distributed`), so no launcher, ssh or hostfile is
needed. The config is the project's `ds_config.json` (when present; else the same settings
written here) with the bench's batch size, ZeRO stage 2 and bf16 forced, exactly as train_torch.py
merges its flags into it (bf16 in the mode the config chooses: blues_torch/deepspeed_config.py); the
optimizer is the config's AdamW built by DeepSpeed from the param groups of train_torch.py (decay on
matrices only), and each timed step is
blues_torch/training.py's `TrainStep` over that engine, the step train_torch.py runs.

The project's ds_config.json selects `optimizer.params.torch_adam` (DeepSpeed's own switch to
`torch.optim.AdamW`, here with `fused: true`): DeepSpeed's FusedAdam is a CUDA extension built at
run time unless the wheel carries it prebuilt, a build that takes minutes and needs nvcc. The
bench keeps that choice (`--ds-optimizer auto`; also used whenever FusedAdam is not prebuilt) and
says which optimizer ran in the row; `--ds-optimizer deepspeed` forces FusedAdam.

DeepSpeed's bf16 mode casts the module to bf16 and keeps fp32 master weights and optimizer state
in the ZeRO optimizer; a config enabling `torch_autocast` keeps the module and gradients float32 and
runs the engine's forward under bf16 autocast instead. The row's note names the mode that ran.
Gradients are clipped by global norm inside `engine.step()`.

DeepSpeed and torch are imported inside the functions: `python -m bench` loads this module for any
section, and DeepSpeed is optional (a missing or broken install becomes a skipped row).
"""
from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

from bench.report import Row
from bench.timing import PeakMemory, log, time_steps, torch_sync
from bench.train_step import (GRAD_CLIP, LOOP_REPS, LR, WEIGHT_DECAY, Workload, check_torch_attention, fresh_torch_compile,
                              loss_check, random_batch, torch_device, _train_row)
from blues.adamw import BETAS, EPS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY}},
    "gradient_clipping": GRAD_CLIP,
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                          "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    "steps_per_print": 10 ** 9,
}


def deepspeed_available() -> str | None:
    """None when deepspeed imports, else the reason (one line) it cannot be used."""
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything at import
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return (f"deepspeed is not importable ({first}); install the wheels from .whl/ "
                "(pip install --no-index --find-links .whl deepspeed --target /tmp/site) and put /tmp/site on PYTHONPATH")
    return None


def fused_adam_prebuilt() -> bool:
    try:
        from deepspeed.git_version_info import installed_ops
        return bool(installed_ops.get("fused_adam"))
    except Exception:
        return False


def ds_config_for(wl: Workload, optimizer: str, overrides: dict | None = None) -> tuple[dict, str]:
    """The project's ds_config.json, `overrides` (keys of the config to replace) written over it, with
    the bench's settings written in; -> (config, note)."""
    from blues_torch.deepspeed_config import default_throughput_timer_off, write_precision

    path = REPO / "ds_config.json"
    if path.exists():
        cfg = json.loads(path.read_text())
        source = "ds_config.json"
    else:
        cfg = copy.deepcopy(DEFAULT_DS_CONFIG)
        source = "built-in ZeRO-2 config (no ds_config.json)"
    if overrides:
        cfg = _merge(cfg, overrides)
        source += f"; overrides {json.dumps(overrides)}"
    cfg.pop("scheduler", None)
    cfg["train_micro_batch_size_per_gpu"] = wl.batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = wl.batch
    cfg.setdefault("zero_optimization", {})["stage"] = 2
    write_precision(cfg, "bf16", source)
    cfg.pop("fp16", None)
    if cfg.get("gradient_clipping") in (None, "auto"):  # "auto": the trainer's value, here the bench's
        cfg["gradient_clipping"] = GRAD_CLIP
    cfg["steps_per_print"] = 10 ** 9
    cfg["wall_clock_breakdown"] = False
    default_throughput_timer_off(cfg)  # as train_torch.py's config: no device synchronize in a step
    opt = cfg.setdefault("optimizer", copy.deepcopy(DEFAULT_DS_CONFIG["optimizer"]))
    params = opt.setdefault("params", {})
    params.setdefault("betas", list(BETAS))
    params.setdefault("eps", EPS)
    params["lr"] = LR
    if params.get("weight_decay") in (None, "auto"):
        params["weight_decay"] = WEIGHT_DECAY
    if optimizer == "deepspeed":
        params.pop("torch_adam", None)
        params.pop("fused", None)
        note = f"{source}; optimizer: DeepSpeed FusedAdam" + ("" if fused_adam_prebuilt() else " (JIT-built)")
    elif optimizer == "torch" or params.get("torch_adam") or not fused_adam_prebuilt():
        why = ("the config's torch_adam" if params.get("torch_adam") and optimizer == "auto" else
               "--ds-optimizer torch" if optimizer == "torch" else "FusedAdam op not prebuilt")
        params["torch_adam"] = True
        params.setdefault("fused", True)
        note = f"{source}; optimizer: DeepSpeed torch_adam, fused={params['fused']} ({why})"
    else:
        note = f"{source}; optimizer: DeepSpeed FusedAdam (prebuilt)"
    return cfg, note


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_rank() -> None:
    """A process group of one (rank 0 of 1) on this machine, unless one exists already."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from blues_torch.deepspeed_shm import release_shm_segment
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    release_shm_segment(0, lambda: None)  # one rank: nobody else maps it


def _merge(config: dict, overrides: dict) -> dict:
    """config with overrides written over it, one level of dicts deep (as ds_variants' variants are)."""
    out = copy.deepcopy(config)
    for key, value in overrides.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def build_engine(wl: Workload, *, optimizer: str = "auto", compile: bool = False, overrides: dict | None = None,
                 seed: int = 0, check: bool = False, fast_norms: bool = True,
                 device_skip: bool | tuple[str, ...] = True):
    """-> (engine, device, note, checks): train_torch.py's DeepSpeed engine for wl in this process.

    overrides: keys of the config to replace (scripts/ds_variants.py); compile: the trainer's per-block
    compile of the engine's module (blues_torch.training.compile_for_training), from a fresh dynamo
    state. The memory counters are reset after the attention check (check=True).
    fast_norms=False: DeepSpeed's own per-gradient norm and overflow loops (blues_torch/deepspeed_norms.py);
    device_skip=False: DeepSpeed's own step, which decides its skip on the host, and its own end of backward,
    which synchronises the device (blues_torch/deepspeed_skip.py); a tuple: only those of deepspeed_skip's
    replacements ("step", "independent_gradient_partition_epilogue")."""
    import deepspeed
    import torch
    from blues_torch import BluesModel, deepspeed_norms, deepspeed_skip
    from blues_torch.training import compile_for_training, param_groups

    init_single_rank()
    device = torch_device()
    if device.type == "cuda":  # rank 0's GPU (set_device needs an index, not plain "cuda")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(seed)
    with torch.device(device):
        model = BluesModel(wl.config)
    model.train()
    checks = [check_torch_attention(wl.config, wl.batch, wl.seq, device)] if check else []
    ds_cfg, note = ds_config_for(wl, optimizer, overrides)
    log(f"  deepspeed config: {note}")
    if fast_norms:
        deepspeed_norms.install()  # ZeRO's per-gradient norm/overflow loops cost ~60 ms of host time a step
    else:
        deepspeed_norms.uninstall()
    if device_skip:  # the skip decided on the device, the end of backward waiting on the device: no host wait
        deepspeed_skip.install(None if device_skip is True else device_skip)
    else:
        deepspeed_skip.uninstall()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg,
                                           model_parameters=param_groups(model, ds_cfg["optimizer"]["params"]["weight_decay"]))
    if compile:
        fresh_torch_compile()
        compile_for_training(engine.module)
    return engine, device, note, checks


def deepspeed_train(wl: Workload, *, steps: int, warmup: int, optimizer: str = "auto", compile: bool = False,
                    check: bool = True, seed: int = 0, overrides: dict | None = None,
                    device_skip: bool | tuple[str, ...] = True) -> Row:
    """compile: the engine's module compiled block by block, as `train_torch.py --deepspeed ... --compile`."""
    variant = "zero2-compile" if compile else "zero2"
    reason = deepspeed_available()
    if reason is not None:
        return Row(framework="torch+deepspeed", workload=wl.name, variant=variant, skipped=reason, config=wl.describe())
    import torch
    from blues_torch.distributed import Dist
    from blues_torch.training import PRECISION_MODES, TrainStep, precision_mode

    mem = PeakMemory("torch", torch_device())
    mem.reset()
    engine, device, note, checks = build_engine(wl, optimizer=optimizer, overrides=overrides, seed=seed, check=check,
                                                  device_skip=device_skip)
    mem.reset()  # the model and engine stay; the check's buffers are not the training step's
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, seed)
    ids = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    tgt = torch.from_numpy(tgt_np).long().to(device)  # [B, T]
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    if compile:
        fresh_torch_compile()
    # the trainer's step over the engine (its forward applies torch_autocast when the config enables it;
    # --compile: the module's blocks compiled)
    train_step = TrainStep(engine.module, engine.optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16",
                           gen=gen, engine=engine, compile=compile)
    pending = []
    ahead = 0 if train_step.waits_on_host else 1  # as train_torch.py's loop runs it (blues/loop.py)

    def step():
        pending.append(train_step([(ids, tgt)], LR))
        if len(pending) > ahead:
            pending[-1 - ahead].read()

    times = time_steps(step, lambda _: torch_sync(device), warmup=warmup, steps=steps, reps=LOOP_REPS,
                       label=f"deepspeed {wl.name} {variant}")
    reading = mem.read()
    checks.append(loss_check([p.read()[0][0] for p in pending]))
    param_dtype = next(engine.module.parameters()).dtype
    mode = PRECISION_MODES[precision_mode("bf16", engine)]
    skip = "skip decided on the host" if train_step.waits_on_host else "skip decided on the device, one step queued"
    del engine, train_step, pending
    return _train_row("torch+deepspeed", wl, variant, times, reading, checks, "torch",
                      f"{device.type}; module {str(param_dtype).replace('torch.', '')}; {mode}; {skip}; {note}")

"""`--deepspeed ds_config.json`: one source of truth for ZeRO, bf16, clipping and the optimizer.

A flag given on the command line overrides the JSON and is written into the config passed to
`deepspeed.initialize`; a flag not given takes the JSON's value, and a field set to "auto" (or absent)
takes the trainer's value (batch_size <-> train_micro_batch_size_per_gpu, grad_accum <->
gradient_accumulation_steps, lr / weight_decay <-> optimizer.params, grad_clip <-> gradient_clipping,
precision <-> bf16.enabled or torch_autocast.enabled). The returned sources say which settings the file
decided.

bf16 has two DeepSpeed modes, chosen by the file: `bf16.enabled` casts the module to bf16 and keeps
float32 master weights in the ZeRO optimizer; `torch_autocast` (`{"enabled": true, "dtype": "bfloat16"}`)
keeps the module and its gradients float32 and runs the engine's forward under torch.autocast, as
the plain trainer's bf16 does. A file enabling torch_autocast asks for bf16 in that mode;
`--precision fp32` turns it off.
"""
from __future__ import annotations

from pathlib import Path

from blues.adamw import BETAS, EPS
from blues.errors import ConfigError, UsageError
from blues.train_args import TrainArgs, check_numbers, load_json_file

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


# DeepSpeed's names of bfloat16 for torch_autocast.dtype (deepspeed/runtime/config.py, DtypeEnum)
_BF16_NAMES = ("bfloat16", "bf16", "torch.bfloat16")


def wants_torch_autocast(cfg: dict, where: str) -> bool:
    """Whether the config enables DeepSpeed's torch_autocast: refused (ConfigError naming the field)
    unless its dtype is bfloat16 and bf16.enabled is not true beside it."""
    enabled = _ds_get(cfg, ("torch_autocast", "enabled"))
    if enabled in (None, False):
        return False
    if enabled is not True:
        raise ConfigError(f"{where}: field 'torch_autocast.enabled' must be true or false, got {enabled!r}")
    dtype = _ds_get(cfg, ("torch_autocast", "dtype"))
    if dtype not in _BF16_NAMES:
        raise ConfigError(f"{where}: field 'torch_autocast.dtype' must be \"bfloat16\" (Blues trains in bf16 or "
                          f"fp32), got {dtype!r}")
    if _ds_get(cfg, ("bf16", "enabled")) is True:
        raise ConfigError(f"{where}: field 'bf16.enabled' must be false (or \"auto\") when torch_autocast is "
                          f"enabled: choose one bf16 mode (torch_autocast: a float32 module under autocast; bf16: a "
                          f"bf16 module with float32 master weights)")
    return True


def write_precision(cfg: dict, precision: str, where: str) -> None:
    """Write `precision` ("bf16" or "fp32") into cfg in the bf16 mode the config chose: torch_autocast
    when it enables it, else DeepSpeed's bf16 (a bf16 module); fp32 turns both off."""
    autocast = wants_torch_autocast(cfg, where)
    _ds_set(cfg, ("bf16", "enabled"), precision == "bf16" and not autocast)
    if autocast:
        _ds_set(cfg, ("torch_autocast", "enabled"), precision == "bf16")


def default_throughput_timer_off(cfg: dict) -> None:
    """Turn DeepSpeed's throughput timer off unless the config sets it (`timers.throughput`): from the
    third step on it synchronises the device when the forward starts and when the step ends
    (deepspeed/utils/timer.py, ThroughputTimer), a host wait every step that keeps the trainer from
    queueing the next step (blues/loop.py). Blues measures tokens/s itself."""
    cfg.setdefault("timers", {}).setdefault("throughput", {"enabled": False})


def resolve_deepspeed_config(args: TrainArgs, world_size: int) -> tuple[dict, TrainArgs, dict[str, str]]:
    """Merge flags and ds_config.json: explicit flags win and are written into the dict; a field set
    to "auto" (or absent) takes the trainer's value. -> (DeepSpeed config, args, {flag: the file's
    name} for every setting the file decided)."""
    path = args.deepspeed
    cfg = load_json_file(path, "--deepspeed")
    where, name = f"--deepspeed {path}", Path(path).name
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

    values, sources = {}, {}
    for flag, field_path in _DS_FIELDS.items():
        field = ".".join(field_path)
        value = _ds_get(cfg, field_path)
        if flag in args.explicit or value is None or value == "auto":
            values[flag] = getattr(args, flag)
            continue
        want = int if flag in ("batch_size", "grad_accum") else float
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (want is int and not isinstance(value, int)):
            raise ConfigError(f"{where}: field '{field}' must be {'an integer' if want is int else 'a number'} "
                              f"or \"auto\", got {value!r}")
        values[flag], sources[flag] = want(value), name
    bf16_json = _ds_get(cfg, ("bf16", "enabled"))
    file_precision = ("bf16" if wants_torch_autocast(cfg, where) else None if bf16_json in (None, "auto")
                      else "bf16" if bf16_json is True else "fp32")
    if "precision" in args.explicit or file_precision is None:
        precision = args.precision
    else:
        precision, sources["precision"] = file_precision, name
    try:
        check_numbers({**{k: getattr(args, k) for k in ("max_steps", "eval_every", "eval_batches", "save_every",
                                                        "keep_checkpoints", "max_bad_steps", "warmup_steps",
                                                        "seed", "min_lr", "max_minutes")}, **values})
    except UsageError as e:
        raise ConfigError(f"{where} (or the flag overriding it): {e}") from None

    for flag, field_path in _DS_FIELDS.items():
        _ds_set(cfg, field_path, values[flag])
    write_precision(cfg, precision, where)
    if _ds_get(cfg, ("bf16", "enabled")):
        _ds_set(cfg, ("bf16", "check_grad_overflow"), True)  # non-finite grads skip the step
    cfg["train_batch_size"] = values["batch_size"] * values["grad_accum"] * world_size
    cfg["optimizer"]["params"].setdefault("betas", list(BETAS))
    cfg["optimizer"]["params"].setdefault("eps", EPS)
    cfg.setdefault("steps_per_print", 10 ** 9)  # progress comes from our bar, not DeepSpeed's log
    default_throughput_timer_off(cfg)
    return cfg, args.replace(precision=precision, **values), sources

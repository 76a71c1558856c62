"""Read a Blues checkpoint, whatever wrote it: the project's one checkpoint reader.

`read_source(path, *, with_optimizer=True) -> Loaded` serves generate.py, parity.check and
parity.convert_checkpoint. PATH, detected:

- a **run directory** (either trainer's `--out_dir`) or its `checkpoints/`: the newest checkpoint
  that verifies (`blues.checkpointing.latest_good`; damaged ones are skipped with a warning);
- a **checkpoint directory** `.../checkpoints/step_XXXXXXXX/` (or its `model.safetensors`), checked
  against its COMMITTED manifest first: train_torch.py's plain format (model.safetensors,
  optimizer.pt, rng.pt) or DeepSpeed ZeRO-1/2 (the same layout-free files saved beside `ds/`; without
  them `ds/`: the float32 master weights and Adam moments, reassembled by DeepSpeed's zero_to_fp32
  utilities whatever the number of ranks; refused under expert parallelism), or train_jax.py's
  Orbax `arrays/` + trainer state;
- an **export**: a directory with `model.safetensors` + `config.json` (or the `.safetensors` file),
  with `optimizer.safetensors` + `trainer_state.json` when it carries a training run;
- a **`.pt` file** holding a state dict by layout path (bare, or under "model" / "module" /
  "state_dict" / "model_state_dict") and a config (under "config" / "model_config", or `config.json`
  next to it): weights only;
- the seed README's name **`DIR/model_iter_N.pt`**, when no such file exists: step N of the
  checkpoints in DIR (`DIR/step_0000000N`, or `DIR/checkpoints/step_0000000N` for a run directory),
  so the seed's documented commands work on our trainers' output.

`with_optimizer=False` reads the weights and config only (inference, parity checks): no optimizer
state, random streams or training state; a JAX checkpoint restores its `params` alone. (DeepSpeed
keeps its master weights in the same files as the moments, so those are read either way.)

Safety: `.pt` files (DeepSpeed's included) load with `torch.load(weights_only=True)`, so a pickle that
would run code is refused, never executed; safetensors and Orbax hold no code. Files read from a
directory the user named must lie inside it (manifests may not point elsewhere; links are refused).
Every problem is a CheckpointError: one line naming the file and what is wrong. Nothing is printed
(callers report what they read), apart from latest_good's warning for each damaged checkpoint skipped.
"""
from __future__ import annotations

import os
from pathlib import Path

from blues import checkpointing as ckpt
from blues.canonical import ConversionError, flatten, from_module_arrays
from blues.checkpoint_source import (Loaded, check_no_links, config_of, detect_source, parse_config, read_export,
                                     read_json)
from blues.config import BluesConfig
from blues.errors import CheckpointError

ARRAYS, TRAINER = "arrays", "trainer_state"  # the Orbax items of a train_jax.py checkpoint


def read_source(path: str | os.PathLike, *, with_optimizer: bool = True) -> Loaded:
    """Detect what `path` is (module doc) and read it; CheckpointError (one line) on anything else.
    `with_optimizer=False`: weights and config only."""
    kind, path = detect_source(path)
    if kind == "step":
        return _read_step_dir(path, with_optimizer)
    if kind == "export":
        return read_export(path, with_optimizer)
    return _read_pt(path)


def _torch_load(path: Path):
    """torch.load with weights_only=True: a pickle that would run code is refused, never executed."""
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unsafe content"])[0][:120]
        raise CheckpointError(f"{path} was refused: it holds pickled objects that are not plain tensors and "
                              f"could run code when loaded ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise CheckpointError(f"{path} is not a readable PyTorch file ({first})") from None


# ---- trainer checkpoints ---------------------------------------------------------------------------

def _read_step_dir(path: Path, with_optimizer: bool = True) -> Loaded:
    manifest = ckpt.verify(path)  # checksums: a truncated or damaged checkpoint stops here, named
    state = read_json(path / ckpt.TRAINER_STATE, "checkpoint")
    config = config_of(state, path / ckpt.TRAINER_STATE)
    framework = manifest.get("framework")
    try:
        if framework == "torch":
            return _read_torch(path, state, config, with_optimizer)
        if framework == "jax":
            return _read_jax(path, state, config, with_optimizer)
    except ConversionError as e:
        raise CheckpointError(f"{path}: {e}") from None
    raise CheckpointError(f"{path}: unknown framework {framework!r} in its manifest")


def _read_torch(path: Path, state: dict, config: BluesConfig, with_optimizer: bool = True) -> Loaded:
    from parity import optim_convert

    keep = state if with_optimizer and not state.get("weights_only") else None  # None: weights only
    deepspeed = bool(state.get("deepspeed") or (path / "ds").is_dir())
    if deepspeed and not (path / "optimizer.pt").is_file():  # DeepSpeed's files alone (no layout-free state)
        if int(state.get("train_args", {}).get("expert_parallel", 1)) > 1:
            raise CheckpointError(f"{path}: a DeepSpeed --expert_parallel checkpoint without model.safetensors and "
                                  "optimizer.pt (DeepSpeed's module file holds rank 0's experts only)")
        weights, optimizer = optim_convert.from_deepspeed(path / "ds", config)
        if keep is None:
            return Loaded(weights, config, "torch-deepspeed", path)
        rng_file = path / "rng_rank00000.pt"
        rng = _torch_load(rng_file) if rng_file.is_file() else None
        return Loaded(weights, config, "torch-deepspeed", path, optimizer, keep, rng)
    from blues.safetensors_io import read_safetensors

    module, _ = read_safetensors(path / "model.safetensors")
    arrays = from_module_arrays(module, config)
    kind = "torch-deepspeed" if deepspeed else "torch"  # DeepSpeed's: the layout-free state saved beside it
    if keep is None:
        return Loaded(arrays, config, kind, path)
    if not (path / "optimizer.pt").is_file():
        raise CheckpointError(f"{path}: optimizer.pt is missing (damaged checkpoint)")
    sd = _torch_load(path / "optimizer.pt")
    optimizer = optim_convert.from_torch(sd, config)
    flags = {k: v for k, v in sd["param_groups"][0].items() if k in ("foreach", "fused", "capturable")}
    rng_file = path / ("rng_rank00000.pt" if deepspeed else "rng.pt")
    rng = _torch_load(rng_file) if rng_file.is_file() else None
    return Loaded(arrays, config, kind, path, optimizer, keep, rng, flags)


def _read_jax(path: Path, state: dict, config: BluesConfig, with_optimizer: bool = True) -> Loaded:
    """Orbax item `arrays/`: {"params", "opt_state", "rng"} restored as host numpy trees, whatever mesh
    saved them; `params` alone without the optimizer (a third of the reading)."""
    from blues_jax.checkpoint import read_numpy
    from parity import optim_convert

    tree = read_numpy(path, params_only=not with_optimizer)
    arrays = from_module_arrays(flatten(tree["params"]), config)
    if not with_optimizer or state.get("weights_only") or "opt_state" not in tree:
        return Loaded(arrays, config, "jax", path)
    optimizer = optim_convert.from_optax(tree["opt_state"], config)
    return Loaded(arrays, config, "jax", path, optimizer, state, tree.get("rng"))


# ---- exports and .pt files -------------------------------------------------------------------------

def _read_pt(path: Path) -> Loaded:
    """A torch.save'd state dict by layout path (the embedding with or without its padding rows), any
    float dtype, and its config: weights only."""
    obj = _torch_load(path)
    module = _state_dict_in(obj, path)
    embedded = [obj[k] for k in ("config", "model_config") if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
    config_file = path.parent / "config.json"
    if embedded:
        config = parse_config(embedded[0], path)
    elif config_file.is_file():
        check_no_links(path.parent, [config_file.name])
        config = parse_config(read_json(config_file, "model config"), config_file)
    else:
        raise CheckpointError(f"{path} has no model config (put a 'config' entry in it or config.json next to it)")
    try:
        arrays = from_module_arrays(module, config)
    except ConversionError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Loaded(arrays, config, "pt", path)


def _state_dict_in(obj, where: Path) -> dict:
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return _state_dict_in(obj[key], where)
    raise CheckpointError(f"{where} holds no model state dict (looked for a dict of tensors, bare or under "
                          "'model', 'module', 'state_dict', 'model_state_dict')")

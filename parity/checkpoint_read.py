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

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blues import checkpointing as ckpt
from blues.config import BluesConfig
from blues.errors import BluesError, CheckpointError
from blues.canonical import ConversionError, flatten, from_module_arrays
from parity.optim_convert import AdamWState

OPTIMIZER_NAME = "optimizer.safetensors"  # in an export: the AdamW moments, canonical names
OPTIMIZER_FORMAT = "blues-adamw"
ARRAYS, TRAINER = "arrays", "trainer_state"  # the Orbax items of a train_jax.py checkpoint
_STEP_RE = re.compile(r"^step_\d{8,}$")
_SEED_NAME = re.compile(r"^model_iter_(\d+)\.pt$")
_TORCH_MAGIC = (b"PK", b"\x80")  # torch.save's zip archive; a legacy pickle


@dataclass
class Loaded:
    """Everything read from a checkpoint, framework-neutral except the random streams."""

    arrays: dict[str, np.ndarray]  # canonical float32 weights
    config: BluesConfig
    kind: str  # "torch", "torch-deepspeed", "jax", "export", "pt"
    path: Path  # what was actually read
    optimizer: AdamWState | None = None
    trainer_state: dict | None = None  # trainer_state.json (step, flags, data position, ...); None: weights only
    rng: object = None  # the source framework's random streams (kept only within the framework)
    torch_flags: dict | None = None  # torch AdamW implementation flags (fused, foreach) of a torch source

    @property
    def framework(self) -> str | None:
        """The framework that wrote it; None for a neutral export."""
        return {"torch": "torch", "torch-deepspeed": "torch", "jax": "jax", "pt": "torch"}.get(self.kind)

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"]) if self.trainer_state else 0


def resolve_source(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else the checkpoint the seed's name `DIR/model_iter_N.pt` means."""
    path = Path(path)
    if path.exists():
        return path
    m = _SEED_NAME.match(path.name)
    if m is None:
        raise CheckpointError(f"checkpoint {path} does not exist (give a run directory, a checkpoint directory, "
                              "an export directory, a .safetensors file or a .pt file)")
    step_dir = ckpt.step_dirname(int(m.group(1)))
    for root in (path.parent, path.parent / "checkpoints"):
        if (root / step_dir).is_dir():
            return root / step_dir
    raise CheckpointError(f"checkpoint {path} does not exist, and neither does step {int(m.group(1))} of "
                          f"{path.parent} ({step_dir} in it or in its checkpoints/)")


def read_source(path: str | os.PathLike, *, with_optimizer: bool = True) -> Loaded:
    """Detect what `path` is (module doc) and read it; CheckpointError (one line) on anything else.
    `with_optimizer=False`: weights and config only."""
    path = resolve_source(path)
    if path.is_file():
        if path.name == "model.safetensors" and (path.parent / ckpt.MANIFEST).exists():
            return _read_step_dir(path.parent, with_optimizer)
        if path.suffix == ".safetensors":
            return _read_export(path, with_optimizer)
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        if head.startswith(_TORCH_MAGIC):
            return _read_pt(path)
        raise CheckpointError(f"{path} is not a Blues checkpoint (a file must be a .safetensors export or a .pt "
                              "state dict; trainer checkpoints are directories)")
    if (path / ckpt.MANIFEST).exists() or _STEP_RE.match(path.name):
        return _read_step_dir(path, with_optimizer)
    if (path / "model.safetensors").is_file():
        return _read_export(path, with_optimizer)
    for root in (path / "checkpoints", path):
        if ckpt.list_checkpoints(root):
            found = ckpt.latest_good(root)
            if found is None:
                raise CheckpointError(f"{path}: every checkpoint under {root} is damaged or incomplete")
            return _read_step_dir(found, with_optimizer)
    raise CheckpointError(f"{path} holds no Blues checkpoint (no COMMITTED manifest, no checkpoints/step_* "
                          "directory, no model.safetensors)")


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the {what} is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e.__class__.__name__}); the {what} cannot be read") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; the {what} cannot be read")
    return data


def _parse_config(data, where: Path) -> BluesConfig:
    try:
        return BluesConfig.from_dict(data)
    except BluesError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _config_of(state: dict, where: Path) -> BluesConfig:
    if "model_config" not in state or "step" not in state:
        raise CheckpointError(f"{where} has no 'model_config'/'step' entry: not a Blues trainer state")
    return _parse_config(state["model_config"], where)


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


def _check_no_links(directory: Path, names: Sequence[str]) -> None:
    """Files read from inside a directory the user named must be in it: a symbolic link placed there
    could make a converter read (and copy out) any file of the machine."""
    for name in names:
        file = directory / name
        if file.is_symlink():
            raise CheckpointError(f"{file} is a symbolic link; only files inside {directory} are read (copy the "
                                  "file there instead)")


# ---- trainer checkpoints ---------------------------------------------------------------------------

def _read_step_dir(path: Path, with_optimizer: bool = True) -> Loaded:
    manifest = ckpt.verify(path)  # checksums: a truncated or damaged checkpoint stops here, named
    state = _read_json(path / ckpt.TRAINER_STATE, "checkpoint")
    config = _config_of(state, path / ckpt.TRAINER_STATE)
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

def _read_export(path: Path, with_optimizer: bool = True) -> Loaded:
    from blues.safetensors_io import CONFIG_NAME, WEIGHTS_NAME, load_export, read_safetensors

    directory = path if path.is_dir() else path.parent
    _check_no_links(directory, ([WEIGHTS_NAME] if path.is_dir() else []) + [CONFIG_NAME, OPTIMIZER_NAME,
                                                                            ckpt.TRAINER_STATE])
    arrays, config = load_export(path)
    optimizer, state = None, None
    if with_optimizer and (directory / OPTIMIZER_NAME).is_file():
        tensors, meta = read_safetensors(directory / OPTIMIZER_NAME)
        state = _read_json(directory / ckpt.TRAINER_STATE, "export's training state")
        if _config_of(state, directory / ckpt.TRAINER_STATE) != config:
            raise CheckpointError(f"{directory / ckpt.TRAINER_STATE} was made for another model config than "
                                  f"{directory / CONFIG_NAME}; re-export the checkpoint")
        optimizer = _optimizer_from_tensors(tensors, meta, config, directory / OPTIMIZER_NAME)
        if optimizer.step > int(state["step"]):  # fewer is fine: skipped (non-finite) steps apply no update
            raise CheckpointError(f"{directory / OPTIMIZER_NAME}: optimizer step {optimizer.step} is past the "
                                  f"training step {state['step']}")
    return Loaded(arrays, config, "export", path, optimizer, state)


def _optimizer_from_tensors(tensors: dict, meta: dict, config: BluesConfig, where: Path) -> AdamWState:
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise CheckpointError(f"{where} is not a Blues optimizer export (format {meta.get('format')!r})")
    try:
        hp = json.loads(meta["blues.adamw"])
        m = {k.removeprefix("exp_avg."): v for k, v in tensors.items() if k.startswith("exp_avg.")}
        v = {k.removeprefix("exp_avg_sq."): a for k, a in tensors.items() if k.startswith("exp_avg_sq.")}
        other = sorted(k for k in tensors if not k.startswith(("exp_avg.", "exp_avg_sq.")))
        if other:
            raise ConversionError(f"unexpected tensor '{other[0]}'")
        state = AdamWState(step=int(hp["step"]), exp_avg=m, exp_avg_sq=v, lr=float(hp["lr"]),
                           betas=(float(hp["betas"][0]), float(hp["betas"][1])), eps=float(hp["eps"]),
                           weight_decay=float(hp["weight_decay"]))
        state.check(config)
    except (KeyError, TypeError, ValueError, IndexError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: malformed optimizer metadata ({e!r})") from None
    except ConversionError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return state


def _read_pt(path: Path) -> Loaded:
    """A torch.save'd state dict by layout path (the embedding with or without its padding rows), any
    float dtype, and its config: weights only."""
    obj = _torch_load(path)
    module = _state_dict_in(obj, path)
    embedded = [obj[k] for k in ("config", "model_config") if isinstance(obj, dict) and isinstance(obj.get(k), dict)]
    config_file = path.parent / "config.json"
    if embedded:
        config = _parse_config(embedded[0], path)
    elif config_file.is_file():
        _check_no_links(path.parent, [config_file.name])
        config = _parse_config(_read_json(config_file, "model config"), config_file)
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

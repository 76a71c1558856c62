"""Checkpoint sources, framework-free: what a path names, exports, trainer-state JSON, and the result
of reading any checkpoint (`Loaded`). parity/checkpoint_read.py reads the trainers' own formats (which
need torch or JAX) and dispatches on what this module detects; the module docstring there lists
every accepted source. Every problem is a CheckpointError: one line naming the file and what is wrong.
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
from blues.adamw import AdamWState
from blues.canonical import ConversionError
from blues.config import BluesConfig
from blues.errors import BluesError, CheckpointError, NotACheckpoint
from blues.safetensors_io import CONFIG_NAME, WEIGHTS_NAME, load_export, read_safetensors

OPTIMIZER_NAME = "optimizer.safetensors"  # in an export: the AdamW moments, canonical names
OPTIMIZER_FORMAT = "blues-adamw"
STEP_RE = re.compile(r"^step_\d{8,}$")
SEED_NAME = re.compile(r"^model_iter_(\d+)\.pt$")
TORCH_MAGIC = (b"PK", b"\x80")  # torch.save's zip archive; a legacy pickle


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
    m = SEED_NAME.match(path.name)
    if m is None:
        raise NotACheckpoint(f"checkpoint {path} does not exist (give a run directory, a checkpoint directory, "
                              "an export directory, a .safetensors file or a .pt file)")
    step_dir = ckpt.step_dirname(int(m.group(1)))
    for root in (path.parent, path.parent / "checkpoints"):
        if (root / step_dir).is_dir():
            return root / step_dir
    raise NotACheckpoint(f"checkpoint {path} does not exist, and neither does step {int(m.group(1))} of "
                          f"{path.parent} ({step_dir} in it or in its checkpoints/)")


def detect_source(path: str | os.PathLike) -> tuple[str, Path]:
    """What `path` names: ("step", a trainer checkpoint directory; a run directory resolves to its
    newest good checkpoint), ("export", a directory or .safetensors file) or ("pt", a torch.save'd
    state dict); CheckpointError (one line) for anything else."""
    path = resolve_source(path)
    if path.is_file():
        if path.name == WEIGHTS_NAME and (path.parent / ckpt.MANIFEST).exists():
            return "step", path.parent
        if path.suffix == ".safetensors":
            return "export", path
        try:
            with open(path, "rb") as f:
                head = f.read(2)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        if head.startswith(TORCH_MAGIC):
            return "pt", path
        raise NotACheckpoint(f"{path} is not a Blues checkpoint (a file must be a .safetensors export or a .pt "
                              "state dict; trainer checkpoints are directories)")
    if (path / ckpt.MANIFEST).exists() or STEP_RE.match(path.name):
        return "step", path
    if (path / WEIGHTS_NAME).is_file():
        return "export", path
    for root in (path / "checkpoints", path):
        if ckpt.list_checkpoints(root):
            found = ckpt.latest_good(root)
            if found is None:
                raise CheckpointError(f"{path}: every checkpoint under {root} is damaged or incomplete")
            return "step", found
    raise NotACheckpoint(f"{path} holds no Blues checkpoint (no COMMITTED manifest, no checkpoints/step_* "
                          "directory, no model.safetensors)")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the {what} is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e.__class__.__name__}); the {what} cannot be read") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; the {what} cannot be read")
    return data


def parse_config(data, where: Path) -> BluesConfig:
    try:
        return BluesConfig.from_dict(data)
    except BluesError as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_of(state: dict, where: Path) -> BluesConfig:
    if "model_config" not in state or "step" not in state:
        raise CheckpointError(f"{where} has no 'model_config'/'step' entry: not a Blues trainer state")
    return parse_config(state["model_config"], where)


def check_no_links(directory: Path, names: Sequence[str]) -> None:
    """Files read from inside a directory the user named must be in it: a symbolic link placed there
    could make a converter read (and copy out) any file of the machine."""
    for name in names:
        file = directory / name
        if file.is_symlink():
            raise CheckpointError(f"{file} is a symbolic link; only files inside {directory} are read (copy the "
                                  "file there instead)")



# ---- exports ---------------------------------------------------------------------------------------

def read_export(path: Path, with_optimizer: bool = True) -> Loaded:
    """An export (directory or .safetensors file): weights and config, with the optimizer state and
    training state when it carries a training run (and `with_optimizer`)."""
    directory = path if path.is_dir() else path.parent
    check_no_links(directory, ([WEIGHTS_NAME] if path.is_dir() else []) + [CONFIG_NAME, OPTIMIZER_NAME,
                                                                           ckpt.TRAINER_STATE])
    arrays, config = load_export(path)
    optimizer, state = None, None
    if with_optimizer and (directory / OPTIMIZER_NAME).is_file():
        tensors, meta = read_safetensors(directory / OPTIMIZER_NAME)
        state = read_json(directory / ckpt.TRAINER_STATE, "export's training state")
        if config_of(state, directory / ckpt.TRAINER_STATE) != config:
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

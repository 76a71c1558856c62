"""Find and read model weights for inference, whatever wrote them (framework-free entry point).

`read_checkpoint(path)` accepts:

- a **run directory** (`--out_dir` of either trainer) or its `checkpoints/` directory: the newest
  checkpoint that verifies (`blues.checkpointing.latest_good`; damaged ones are skipped with a
  warning);
- a **checkpoint directory** `.../checkpoints/step_XXXXXXXX/` of either trainer (checked against its
  COMMITTED manifest first): train_torch.py's plain `model.safetensors` or DeepSpeed's
  `ds/mp_rank_00_model_states.pt`, train_jax.py's Orbax `state/`;
- an **export**: a directory with `model.safetensors` + `config.json`, or the `.safetensors` file;
- a **`.pt` file** holding a state dict (bare, or under "model" / "module" / "state_dict") and a
  config (under "config" / "model_config", or `config.json` next to it);
- the seed README's name **`DIR/model_iter_N.pt`**, when no such file exists: step N of the
  checkpoints in DIR (`DIR/step_0000000N`, or `DIR/checkpoints/step_0000000N` when DIR is a run
  directory), so the seed's documented commands work on our trainers' output.

It returns the canonical float32 tensors (`blues/layout.py`), the config and the framework that
wrote them; `parity.convert.from_canonical` then builds a model of either framework.

Safety: `.pt` files load with `torch.load(weights_only=True)`, so a pickle that would run code is
refused, never executed; safetensors and Orbax hold no code. Only paths inside what the user named
are read (checkpoint manifests may not point elsewhere; links out are refused).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blues import checkpointing as ckpt
from blues.config import BluesConfig
from blues.errors import BluesError, CheckpointError
from blues.layout import canonical_layout

_SEED_NAME = re.compile(r"^model_iter_(\d+)\.pt$")
DEEPSPEED_MODEL_FILE = "ds/mp_rank_00_model_states.pt"


@dataclass
class Checkpoint:
    arrays: dict[str, np.ndarray]  # canonical name -> float32 array
    config: BluesConfig
    framework: str | None  # "torch" / "jax": the trainer that wrote it; None for a neutral export
    kind: str  # "torch", "torch-deepspeed", "jax", "export", "pt"
    path: Path  # the file or directory actually read
    step: int | None = None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Resolve `path` (see the module doc) and read its weights; CheckpointError names any problem."""
    path = Path(path)
    if not path.exists():
        alias = _seed_alias(path)
        if alias is None:
            raise CheckpointError(f"--checkpoint: {path} does not exist (give a run directory, a checkpoint "
                                  "directory, an export or a .safetensors/.pt file)")
        path = alias
    if path.is_file():
        if path.name == "model.safetensors" and (path.parent / ckpt.MANIFEST).exists():
            return _read_step_dir(path.parent)
        if path.suffix == ".safetensors":
            return _read_export(path)
        return _read_pt(path)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint: {path} is neither a file nor a directory")
    if (path / ckpt.MANIFEST).exists() or re.match(r"^step_\d{8,}$", path.name):
        return _read_step_dir(path)
    if (path / "model.safetensors").is_file():
        return _read_export(path)
    for root in (path / "checkpoints", path):
        if ckpt.list_checkpoints(root):
            found = ckpt.latest_good(root)
            if found is None:
                raise CheckpointError(f"--checkpoint: every checkpoint under {root} is damaged or incomplete")
            return _read_step_dir(found)
    raise CheckpointError(f"--checkpoint: {path} holds no Blues checkpoint (no checkpoints/step_* directory, "
                          "no model.safetensors)")


def _seed_alias(path: Path) -> Path | None:
    """`DIR/model_iter_N.pt` -> the step-N checkpoint directory of DIR, if there is one."""
    m = _SEED_NAME.match(path.name)
    if not m:
        return None
    step_dir = ckpt.step_dirname(int(m.group(1)))
    for root in (path.parent, path.parent / "checkpoints"):
        if (root / step_dir).is_dir():
            return root / step_dir
    return None


# ---- trainer checkpoints -------------------------------------------------------------------------

def _read_step_dir(path: Path) -> Checkpoint:
    manifest = ckpt.verify(path)  # a damaged or half-written checkpoint stops here, named
    framework = manifest.get("framework")
    try:
        state = json.loads((path / ckpt.TRAINER_STATE).read_text(encoding="utf-8"))
        config = BluesConfig.from_dict(state["model_config"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / ckpt.TRAINER_STATE} is missing or damaged ({e.__class__.__name__})") from None
    except BluesError as e:
        raise CheckpointError(f"{path / ckpt.TRAINER_STATE}: {e}") from None
    step = manifest.get("step")
    if framework == "torch":
        if (path / "model.safetensors").is_file():
            from parity.safetensors_io import read_safetensors
            module, _ = read_safetensors(path / "model.safetensors")
            return Checkpoint(module_to_canonical(module, config, path), config, "torch", "torch", path, step)
        if (path / DEEPSPEED_MODEL_FILE).is_file():
            sd = _torch_load(path / DEEPSPEED_MODEL_FILE)
            module = _find_state_dict(sd, path / DEEPSPEED_MODEL_FILE)
            return Checkpoint(module_to_canonical(module, config, path), config, "torch", "torch-deepspeed", path, step)
        raise CheckpointError(f"{path} is a torch checkpoint without model.safetensors or {DEEPSPEED_MODEL_FILE}")
    if framework == "jax":
        module = _read_jax_weights(path, config)
        return Checkpoint(module_to_canonical(module, config, path), config, "jax", "jax", path, step)
    raise CheckpointError(f"{path}: unknown framework {framework!r} in its manifest")


def _read_jax_weights(path: Path, config: BluesConfig) -> dict[str, np.ndarray]:
    """The parameters of a train_jax.py checkpoint: Orbax item `arrays/`, subtree `params` (a pure
    dict mirroring the module tree), restored as host numpy arrays, whatever mesh saved them."""
    import inspect

    import jax
    import orbax.checkpoint as ocp

    item = (path / "arrays").resolve()  # Orbax wants absolute paths
    if not item.is_dir():
        raise CheckpointError(f"{path} is a JAX checkpoint without its arrays/ item")
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            tree = checkpointer.metadata(item).item_metadata.tree
            if not isinstance(tree, dict) or "params" not in tree:
                raise CheckpointError(f"{item} holds no 'params' tree")
            wanted = {"params": tree["params"]}  # not the optimizer state: half the reading
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
            kwargs = dict(restore_args=restore_args)
            if "partial_restore" in inspect.signature(ocp.args.PyTreeRestore).parameters:
                kwargs.update(item=wanted, partial_restore=True)
            else:
                kwargs["restore_args"] = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(**kwargs))
    except CheckpointError:
        raise
    except Exception as e:  # Orbax/tensorstore raise many kinds; name the checkpoint and stop
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise CheckpointError(f"{item}: cannot read its parameters ({first}); the checkpoint is damaged") from None

    def flatten(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    return dict(flatten(restored["params"]))


def module_to_canonical(module: dict, config: BluesConfig, where) -> dict[str, np.ndarray]:
    """Model parameters by layout path (embedding with or without its padding rows) -> canonical."""
    from parity.convert import ConversionError, check_canonical

    arrays = {}
    specs = canonical_layout(config)
    known = {s.path for s in specs}
    unexpected = sorted(set(module) - known)
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor '{unexpected[0]}' for this config")
    for spec in specs:
        if spec.path not in module:
            raise CheckpointError(f"{where}: missing tensor '{spec.path}'")
        a = _as_float32(module[spec.path])
        if tuple(a.shape) not in (spec.shape, spec.module_shape):
            raise CheckpointError(f"{where}: tensor '{spec.path}' has shape {tuple(a.shape)}, expected "
                                  f"{spec.shape} for its config")
        if spec.pad_rows and a.shape[0] == spec.module_shape[0]:
            a = a[:spec.shape[0]]
        arrays[spec.name] = np.ascontiguousarray(a)
    try:
        check_canonical(arrays, config)
    except ConversionError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return arrays


def _as_float32(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (bf16 has no numpy twin: widen in torch)
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


# ---- neutral exports and .pt files -----------------------------------------------------------------

def _read_export(path: Path) -> Checkpoint:
    from parity.safetensors_io import load_export

    arrays, config = load_export(path)
    return Checkpoint(arrays, config, None, "export", path)


def _torch_load(path: Path):
    import pickle

    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or ["unsafe content"])[0]
        raise CheckpointError(f"{path} was refused: it holds pickled objects that are not plain tensors and "
                              f"could run code when loaded ({first[:120]}); only weights are loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first[:160]})") from None


def _find_state_dict(obj, where) -> dict:
    import torch

    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return _find_state_dict(obj[key], where)
    raise CheckpointError(f"{where} holds no model state dict (looked for a tensor dict, or one under "
                          "'model', 'module', 'state_dict')")


def _read_pt(path: Path) -> Checkpoint:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # zip (torch.save) or legacy pickle
        raise CheckpointError(f"{path} is not a checkpoint (not a PyTorch, safetensors or Orbax file)")
    obj = _torch_load(path)
    module = _find_state_dict(obj, path)
    config = None
    if isinstance(obj, dict):
        for key in ("config", "model_config"):
            if isinstance(obj.get(key), dict):
                try:
                    config = BluesConfig.from_dict(obj[key])
                except BluesError as e:
                    raise CheckpointError(f"{path}: {e}") from None
    if config is None and (path.parent / "config.json").is_file():
        try:
            config = BluesConfig.from_json((path.parent / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.parent / 'config.json'} is unreadable ({e})") from None
    if config is None:
        raise CheckpointError(f"{path} has no model config (put a 'config' entry in it or config.json next to it)")
    return Checkpoint(module_to_canonical(module, config, path), config, "torch", "pt", path)

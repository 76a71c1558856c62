"""train_jax.py's checkpoints: Orbax items inside blues.checkpointing's step directories.

A checkpoint `DIR/checkpoints/step_XXXXXXXX/` is written by Orbax's `CheckpointManager` (asynchronous
saves, max_to_keep = --keep_checkpoints) as two items, `arrays/` (parameters, optimizer state, RNG key
data) and `trainer_state/` (step, config, flags, data position, bad-step counter), plus Orbax's own
`_CHECKPOINT_METADATA`; once Orbax has finalized the save, `trainer_state.json` and the COMMITTED
manifest with every file's sha256 are added (`seal`): a checkpoint counts only when sealed.

Every restore reads the step directory through a `CompositeCheckpointHandler` that knows both items, as
the manager wrote it, so Orbax finds its metadata and prints nothing. Orbax wants absolute paths: every
path is made absolute (`~` expanded) here, at the Orbax boundary, so the trainers, generate.py and the
converters take relative ones and print them as the user typed them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from blues import checkpointing as ckpt
from blues.errors import CheckpointError
from blues.train_loop import log

ARRAYS, TRAINER = "arrays", "trainer_state"  # the two Orbax items of a checkpoint


def absolute(path: str | os.PathLike) -> Path:
    """What Orbax needs: `path` with `~` expanded, made absolute against the working directory."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def keys_to_data(rng):
    """Typed PRNG keys -> their uint32 key data (what Orbax can store); counts unchanged."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, rng)


def data_to_keys(data, template):
    """Inverse of keys_to_data, with the key implementation of `template`'s keys."""
    return jax.tree.map(lambda d, t: jax.random.wrap_key_data(d, impl=jax.random.key_impl(t)) if _is_key(t) else d,
                        data, template)


def _reader(arrays_handler=None) -> ocp.Checkpointer:
    """A checkpointer for a whole step directory, both items registered (no 'unknown item' warnings);
    the arrays item read by `arrays_handler` (default: PyTree, for metadata and numpy restores)."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**{ARRAYS: arrays_handler or ocp.PyTreeCheckpointHandler(),
                                                              TRAINER: ocp.JsonCheckpointHandler()}))


def _restore_error(path: Path, e: Exception, what: str) -> CheckpointError:
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
    return CheckpointError(f"{path}: cannot restore its {what} ({first}); the checkpoint does not fit this model "
                           f"or is damaged")


def restore_arrays(path: str | os.PathLike, abstract: dict) -> dict:
    """A checkpoint's `arrays` item restored onto the shardings in `abstract` (any mesh)."""
    step_dir = absolute(path)
    if not (step_dir / ARRAYS).is_dir():
        raise CheckpointError(f"{path} is a JAX checkpoint without its {ARRAYS}/ item (damaged)")
    try:
        with _reader(ocp.StandardCheckpointHandler()) as checkpointer:
            restore = ocp.args.Composite(**{ARRAYS: ocp.args.StandardRestore(abstract)})
            return checkpointer.restore(step_dir, args=restore)[ARRAYS]
    except Exception as e:  # Orbax/tensorstore raise many kinds; name the checkpoint and stop
        raise _restore_error(Path(path), e, "arrays") from None


def read_numpy(path: str | os.PathLike, *, params_only: bool) -> dict:
    """The `arrays` item as host numpy trees, whatever mesh saved it; `params` alone if `params_only`."""
    step_dir = absolute(path)
    if not (step_dir / ARRAYS).is_dir():
        raise CheckpointError(f"{path} is a JAX checkpoint without its {ARRAYS}/ item (damaged)")
    as_numpy = lambda tree: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)  # noqa: E731
    try:
        with _reader() as checkpointer:
            meta = checkpointer.metadata(step_dir).item_metadata[ARRAYS]
            meta = getattr(meta, "tree", meta)
            if not isinstance(meta, dict) or "params" not in meta:
                raise CheckpointError(f"{path / ARRAYS} holds no 'params' tree: not a train_jax.py checkpoint")
            wanted = {"params": meta["params"]} if params_only else dict(meta)
            item = ocp.args.PyTreeRestore(item=wanted, restore_args=as_numpy(wanted), partial_restore=params_only)
            return checkpointer.restore(step_dir, args=ocp.args.Composite(**{ARRAYS: item}))[ARRAYS]
    except CheckpointError:
        raise
    except Exception as e:
        raise _restore_error(Path(path), e, "arrays") from None


def read_trainer_item(path: str | os.PathLike) -> dict:
    """The `trainer_state` item (the JSON Orbax wrote), for sealing a save that finished unsealed."""
    with _reader() as checkpointer:
        return checkpointer.restore(absolute(path), args=ocp.args.Composite(**{TRAINER: ocp.args.JsonRestore()}))[TRAINER]


def write(root: str | os.PathLike, step: int, arrays: dict, trainer_state: dict) -> Path:
    """One synchronous, sealed checkpoint `root/step_N` (the converters' writer)."""
    manager = ocp.CheckpointManager(absolute(root), options=ocp.CheckpointManagerOptions(
        step_prefix="step", step_format_fixed_length=8, create=True, enable_async_checkpointing=False))
    try:
        manager.save(step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                                                      TRAINER: ocp.args.JsonSave(trainer_state)}), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
    path = Path(root) / ckpt.step_dirname(step)
    seal(path, step, trainer_state)
    return path


class Checkpointer:
    """Orbax CheckpointManager in blues.checkpointing's directory convention (module docstring).
    `root` is kept as given, for what the trainer prints; Orbax gets it absolute."""

    def __init__(self, root: str | os.PathLike, keep: int, is_main: bool):
        self.root, self.is_main = Path(root), is_main
        self.manager = ocp.CheckpointManager(absolute(root), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, step_prefix="step", step_format_fixed_length=8, create=True,
            enable_async_checkpointing=True, cleanup_tmp_directories=True))
        self.pending: list[tuple[int, dict]] = []  # saved, not yet sealed
        self.last: Path | None = None

    def path(self, step: int) -> Path:
        return self.root / ckpt.step_dirname(step)

    def save(self, step: int, params, opt_state, rng, trainer_state: dict) -> Path:
        """Start an asynchronous save; `poll` seals it once Orbax has finalized it."""
        arrays = {"params": params, "opt_state": opt_state, "rng": keys_to_data(rng)}
        self.manager.save(step, args=ocp.args.Composite(**{ARRAYS: ocp.args.StandardSave(arrays),
                                                         TRAINER: ocp.args.JsonSave(trainer_state)}), force=True)
        self.pending.append((step, trainer_state))
        self.last = self.path(step)
        return self.last

    def poll(self, wait: bool = False) -> None:
        """Seal the saves Orbax has finished (all of them, waiting, if `wait`)."""
        if not self.pending:
            return
        if wait:
            self.manager.wait_until_finished()
        elif self.manager.is_saving_in_progress():
            return
        for step, state in self.pending:
            if self.is_main and self.path(step).is_dir():  # (max_to_keep may already have removed it)
                seal(self.path(step), step, state)
        self.pending.clear()

    def close(self) -> None:
        self.poll(wait=True)
        self.manager.close()


def seal(path: Path, step: int, trainer_state: dict) -> None:
    """trainer_state.json (the shared resume checks read it) and the COMMITTED manifest."""
    ckpt.write_json(path / ckpt.TRAINER_STATE, trainer_state)
    ckpt.seal(path, step, framework="jax")


def seal_finished_saves(root: Path) -> None:
    """Seal checkpoints whose Orbax save completed but whose run died before sealing them.

    Only those newer than the newest sealed one: an older unsealed directory is not a save that
    finished late but one that was being deleted (max_to_keep) when the run died."""
    infos = ckpt.list_checkpoints(root)
    newest_sealed = max((i.step for i in infos if i.committed), default=-1)
    for info in infos:
        if (info.committed or info.step < newest_sealed or not (info.path / TRAINER).is_dir()
                or not ocp.step.is_checkpoint_finalized(absolute(info.path))):
            continue
        try:
            state = read_trainer_item(info.path)
        except Exception as e:  # damaged: leave it unsealed, so resume skips it
            log(f"warning: {info.path} was not sealed and its trainer state is unreadable ({e.__class__.__name__})")
            continue
        seal(info.path, info.step, state)
        log(f"note: sealed {info.path}: its save had completed but the run stopped before marking it")


def discard_later_checkpoints(root: Path, step: int) -> None:
    """Remove step directories after the resumed step (damaged, unsealed or abandoned by this resume):
    this run saves those steps again, and Orbax refuses to overwrite a step. Each is renamed out of
    the step_* namespace first, so a run killed while deleting leaves no half-deleted checkpoint."""
    for stale in root.glob(".old-step_*"):  # left by a run killed while deleting
        shutil.rmtree(stale, ignore_errors=True)
    for info in ckpt.list_checkpoints(root):
        if info.step > step or not info.committed:
            why = "an unsealed, interrupted save" if not info.committed else f"after the resumed step {step}"
            log(f"note: removing {info.path} ({why})")
            trash = root / f".old-{info.path.name}-{os.getpid()}"
            os.replace(info.path, trash)
            shutil.rmtree(trash, ignore_errors=True)

"""Checkpoint directories that survive a kill at any moment (framework-free; issue 9).

Layout of a run:

    DIR/checkpoints/step_00000100/   one directory per saved step, 8-digit zero-padded
        ...files the trainer wrote...
        COMMITTED                    manifest, written last: JSON {"format", "step", "framework",
                                     "files": {relative path: sha256}}
    DIR/checkpoints/.tmp-step_00000100-<pid>/   a save in progress (ignored, removed by prune)

A save writes every file into the temporary directory, fsyncs each, writes COMMITTED (fsync'd),
then renames the directory to its final name and fsyncs the parent. A directory named step_* is
therefore complete unless the disk damaged it after the fact, which `verify` detects with the
checksums. `latest_good` walks back from the newest checkpoint to the first one that verifies,
printing a warning for each damaged one it skips.

The manifest only ever names paths inside its own directory (no absolute paths, no '..', no
symlinks): loading a checkpoint never follows a path out of what the user named.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from blues.errors import CheckpointError, NotACheckpoint
from blues.hashing import sha256_file
from blues.schedule import learning_rate

MANIFEST = "COMMITTED"
FORMAT = "blues-checkpoint-v1"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    committed: bool  # has a COMMITTED manifest (contents not yet verified)


def list_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Every step_* directory under `root`, oldest first (temporary save directories are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for entry in root.iterdir():
        m = _STEP_RE.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            out.append(CheckpointInfo(int(m.group(1)), entry, (entry / MANIFEST).is_file()))
    return sorted(out, key=lambda c: c.step)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(path: str | os.PathLike) -> dict:
    """The COMMITTED manifest of a checkpoint directory; CheckpointError if absent or malformed."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a committed Blues checkpoint (no {MANIFEST} marker): "
                              f"an interrupted save or not a checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is damaged ({e.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path} is not a {FORMAT} manifest")
    return manifest


def verify(path: str | os.PathLike) -> dict:
    """Check every file of the manifest against its sha256; returns the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    base = path.resolve()
    for rel, digest in manifest["files"].items():
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise CheckpointError(f"{path}: manifest names '{rel}', outside the checkpoint directory")
        file = path / rel
        if file.is_symlink() or not file.resolve().is_relative_to(base):
            raise CheckpointError(f"{path}: '{rel}' is a link leading outside the checkpoint directory")
        if not file.is_file():
            raise CheckpointError(f"{path}: file '{rel}' is missing (damaged checkpoint)")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{path}: file '{rel}' does not match its checksum (damaged checkpoint)")
    return manifest


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_good(root: str | os.PathLike, *, check: bool = True) -> Path | None:
    """Newest checkpoint under `root` that verifies (None if none); warns about each damaged one skipped."""
    for info in reversed(list_checkpoints(root)):
        try:
            if check:
                verify(info.path)
            else:
                read_manifest(info.path)
            return info.path
        except CheckpointError as e:
            _warn(f"skipping {e}; trying the previous checkpoint")
    return None


def resolve_resume(resume: str | None, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory to resume from, verified, or None to start fresh.

    `resume`: None (fresh), 'auto' (newest good one in out_dir/checkpoints, or fresh if none), or a
    path: a step directory, a `checkpoints/` directory or a run directory (newest good one inside).
    """
    if resume is None:
        return None
    if resume == "auto":
        return latest_good(Path(out_dir) / "checkpoints")
    path = Path(resume)
    if not path.exists():
        raise NotACheckpoint(f"--resume: {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"--resume: {path} is not a checkpoint directory (expected DIR/checkpoints/step_N)")
    if (path / MANIFEST).exists() or _STEP_RE.match(path.name):
        verify(path)
        return path
    for root in (path / "checkpoints", path):
        if list_checkpoints(root):
            found = latest_good(root)
            if found is None:
                raise CheckpointError(f"--resume: no undamaged checkpoint under {root}")
            return found
    raise NotACheckpoint(f"--resume: {path} holds no Blues checkpoint")


def save(root: str | os.PathLike, step: int, write: Callable[[Path], None], *, framework: str,
         extra: dict | None = None) -> Path:
    """Atomically create `root/step_XXXXXXXX/`: `write(tmp_dir)` fills a temporary directory.

    Only one process may call this for a given root (data-parallel rank 0); a collective save
    (DeepSpeed, where every rank writes its shards) uses `begin` / `commit` instead.
    """
    tmp = begin(root, step)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit(tmp, root, step, framework=framework, extra=extra)


def begin(root: str | os.PathLike, step: int, *, token: str | None = None) -> Path:
    """Make and return the temporary directory for a save of `step` (same name on every rank if `token`)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dirname(step)}-{token or os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, root: str | os.PathLike, step: int, *, framework: str, extra: dict | None = None) -> Path:
    """Checksum and fsync everything in `tmp`, write COMMITTED, rename into place. Returns the final path."""
    root = Path(root)
    files = _checksum_files(tmp)
    manifest = {"format": FORMAT, "step": int(step), "framework": framework, "files": files, **(extra or {})}
    manifest_path = tmp / MANIFEST
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for d in sorted({p.parent for p in _files_under(tmp)} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    final = root / step_dirname(step)
    if final.exists():
        # Re-saving a step (e.g. a damaged one): move the old one aside first; a crash in between
        # leaves the old one under a hidden name (ignored) and the previous checkpoints intact.
        trash = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _checksum_files(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory` (but the manifest), each fsync'd."""
    files = {}
    for file in _files_under(directory):
        if file.is_symlink():
            raise CheckpointError(f"refusing to commit a checkpoint holding a symlink: {file}")
        _fsync_file(file)
        files[file.relative_to(directory).as_posix()] = sha256_file(file)
    return files


def seal(path: str | os.PathLike, step: int, *, framework: str, extra: dict | None = None) -> Path:
    """Write COMMITTED into a directory that is already in its final place (Orbax's CheckpointManager
    renames its own step directories into place): checksum and fsync every file, then write the
    manifest under a temporary name and rename it, so the marker appears whole or not at all."""
    path = Path(path)
    tmp = path / f".{MANIFEST}.tmp"
    tmp.unlink(missing_ok=True)  # left by a sealing that was killed: not part of the checkpoint
    manifest = {"format": FORMAT, "step": int(step), "framework": framework, "files": _checksum_files(path),
                **(extra or {})}
    for d in sorted({p.parent for p in _files_under(path)} | {path}, key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)
    _fsync_dir(path)
    return path


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints, and leftovers of interrupted saves.

    Directories without a manifest are not counted and not deleted (they are not ours to judge).
    Returns the deleted paths.
    """
    root = Path(root)
    removed = []
    committed = [c for c in list_checkpoints(root) if c.committed]
    for info in committed[:max(0, len(committed) - keep)]:
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.path)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith((".tmp-", ".old-")) and entry.is_dir():
                owner = entry.name.rsplit("-", 1)[-1]
                if owner.isdigit() and int(owner) != os.getpid() and _pid_alive(int(owner)):
                    continue  # another live process is saving there
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_config_match(saved: dict, current: dict, *, what: str, checkpoint: str | os.PathLike) -> None:
    """CheckpointError naming every field whose value differs between a checkpoint and this run."""
    keys = sorted(set(saved) | set(current))
    diffs = [k for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        detail = ", ".join(f"{k} (checkpoint {saved.get(k)!r}, this run {current.get(k)!r})" for k in diffs)
        raise CheckpointError(f"checkpoint {checkpoint} was made with a different {what}: {detail}; "
                              f"resume with the same settings or start a new --out_dir")


# Training settings that must match to resume (the model config must match entirely). The others
# (lr, schedule length, eval/save cadence...) may change on resume; the trainer says so.
# `global_batch` is batch_size x data-parallel world size: the per-rank split may change on resume.
RESUME_MUST_MATCH = ("global_batch", "grad_accum", "seed", "data")


# ---- trainer state (the JSON part of a checkpoint both trainers write) --------------------------
TRAINER_STATE = "trainer_state.json"


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write a JSON file (inside a temporary checkpoint directory; `commit` fsyncs it)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def read_trainer_state(path: str | os.PathLike, *, framework: str) -> dict:
    """`trainer_state.json` of a checkpoint directory, checking it was written by `framework`."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("framework") != framework:
        raise CheckpointError(f"{path} is a {manifest.get('framework')} checkpoint; train_{framework}.py "
                              f"cannot resume it (convert it with python -m parity.convert_checkpoint)")
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / TRAINER_STATE} is missing or damaged ({e.__class__.__name__})") from None
    if state.get("weights_only"):
        raise CheckpointError(f"{path} holds weights only (no optimizer or data position), so it cannot be "
                              f"resumed; start a new run from its weights with --init_from (an export)")
    for key in ("step", "model_config", "train_args"):
        if key not in state:
            raise CheckpointError(f"{path / TRAINER_STATE} has no '{key}' entry (not a Blues checkpoint)")
    return state


def check_resume(state: dict, train_args: dict, *, world_size: int, checkpoint) -> list[str]:
    """Refuse (CheckpointError naming the fields) a resume whose model config or data settings differ.

    `state` is the checkpoint's trainer state, `train_args` this run's `TrainArgs.to_dict()`.
    Returns notes about settings that changed but may (schedule, cadence): the trainer prints them.
    """
    check_config_match(state["model_config"], train_args["model_config"], what="model config",
                       checkpoint=checkpoint)
    saved = dict(state["train_args"])
    saved["global_batch"] = saved["batch_size"] * state.get("world_size", 1)
    current = dict(train_args, global_batch=train_args["batch_size"] * world_size)
    for args in (saved, current):  # the same files, however the run that named them reached them
        if args.get("data") is not None:
            args["data"] = [os.path.abspath(p) for p in args["data"]]
    check_config_match({k: saved.get(k) for k in RESUME_MUST_MATCH}, {k: current.get(k) for k in RESUME_MUST_MATCH},
                       what="data/batch setting", checkpoint=checkpoint)
    notes = []
    if saved.get("max_steps") != current.get("max_steps"):
        step = int(state["step"])
        old, new = (learning_rate(step, lr=saved["lr"], min_lr=saved["min_lr"], warmup_steps=saved["warmup_steps"],
                                  max_steps=m) for m in (saved["max_steps"], current["max_steps"]))
        notes.append(f"--max_steps changed on resume ({saved['max_steps']} -> {current['max_steps']}): the cosine "
                     f"schedule now reaches --min_lr at step {current['max_steps']} instead of {saved['max_steps']}, "
                     f"so step {step + 1} trains at lr {new:.3g} where the original schedule had {old:.3g}")
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "precision"):
        if saved.get(key) != current.get(key):
            notes.append(f"--{key} changed on resume ({saved.get(key)} -> {current.get(key)}): the run is no "
                         f"longer identical to an uninterrupted one")
    return notes

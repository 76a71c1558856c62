"""Read and write the framework-neutral export: `model.safetensors` + `config.json` in one directory.

The export holds the canonical tensors (`blues/layout.py` names and shapes, float32 unless a converter
narrowed them and says so in the metadata). The file is standard safetensors, readable by the
`safetensors` package and by tools outside the project; we parse and write it ourselves (the format is
an 8-byte length, a JSON header, raw little-endian bytes) so that:

- loading never executes anything and never follows a path found inside a file;
- a truncated or damaged file is one clear error naming the file: every offset is checked, and the
  metadata carries a sha256 of the tensor bytes (`blues.sha256`) that is verified on load;
- bfloat16 needs no torch (it widens to float32 exactly);
- writes are atomic: a temporary name in the same directory, fsync, rename, so a reader sees the old
  file or the new one, never half of one.

The metadata also carries the config JSON (`blues.config`), so a lone `.safetensors` file is
self-describing; `config.json` next to it wins when both exist and must agree with it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from blues.canonical import ConversionError, check_canonical
from blues.config import BluesConfig
from blues.errors import BluesError, CheckpointError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "blues-canonical"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors package's own limit

_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "F16": np.dtype("<f2"),
           "BF16": np.dtype("<u2"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
_NAMES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("float16"): "F16",
          np.dtype("int64"): "I64", np.dtype("int32"): "I32"}


# ---- atomic writes ----------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, chunks) -> None:
    """Write `chunks` (bytes or an iterable of bytes) to `path` atomically: temp file, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes the file 0600; an ordinary file follows the umask
        with os.fdopen(fd, "wb") as f:
            for chunk in ([chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask


# ---- one safetensors file ---------------------------------------------------------------------------

def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (what torch and jax do)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), out)


def tensor_digest(tensors: Mapping[str, tuple[str, np.ndarray]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        dtype, raw = tensors[name]
        h.update(f"{name}|{dtype}|{list(raw.shape)}|".encode())
        h.update(np.ascontiguousarray(raw).tobytes())
    return h.hexdigest()


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None, dtype: str = "float32") -> None:
    """Write `arrays` as one safetensors file (atomically), in float32 or narrowed to bfloat16."""
    if dtype not in ("float32", "bfloat16"):
        raise BluesError(f"safetensors dtype '{dtype}' is not supported; use float32 or bfloat16")
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if dtype == "bfloat16" and a.dtype.kind == "f":
            tensors[name] = ("BF16", _to_bf16_bits(a))
        else:
            a = a.astype(np.float32) if a.dtype.kind == "f" else a
            if a.dtype not in _NAMES:
                raise BluesError(f"tensor '{name}' has dtype {a.dtype}, which the export does not hold")
            tensors[name] = (_NAMES[a.dtype], np.ascontiguousarray(a.astype(_DTYPES[_NAMES[a.dtype]])))
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["blues.sha256"] = tensor_digest(tensors)
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, (code, raw) in tensors.items():
        header[name] = {"dtype": code, "shape": list(raw.shape), "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as the reference writer does
    atomic_write_bytes(path, [struct.pack("<Q", len(blob)), blob]
                       + [memoryview(raw).cast("B") for _, raw in tensors.values()])


def read_safetensors(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(float32 arrays by name, metadata) from one safetensors file; every damage is a CheckpointError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({e.strerror})") from None

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file ({why}); re-export it")

    if len(data) < 8:
        raise damaged("shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(data):
        raise damaged("header length points past the end of the file: truncated?")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise damaged("header is not JSON") from None
    if not isinstance(header, dict):
        raise damaged("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise damaged("__metadata__ is not a string map")
    body = memoryview(data)[8 + n:]
    arrays, raw_by_name = {}, {}
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise damaged(f"entry '{name}' is malformed") from None
        if code not in _DTYPES:
            raise damaged(f"tensor '{name}' has dtype {code}, which Blues does not read")
        dt = _DTYPES[code]
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(body)) or end - begin != count * dt.itemsize:
            raise damaged(f"tensor '{name}' lies outside the file or has the wrong size: truncated?")
        raw = np.frombuffer(body[begin:end], dtype=dt).reshape(shape)
        raw_by_name[name] = (code, raw)
        if code == "BF16":  # widen exactly: bfloat16 is the top half of a float32
            arrays[name] = (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)
        elif dt.kind == "f":
            arrays[name] = raw.astype(np.float32)
        else:
            arrays[name] = raw.copy()
    if verify and "blues.sha256" in meta and tensor_digest(raw_by_name) != meta["blues.sha256"]:
        raise damaged("tensor data does not match its checksum: the file is damaged")
    return arrays, meta


# ---- the export: a directory with model.safetensors + config.json -----------------------------------

def save_export(directory: str | os.PathLike, arrays: Mapping[str, np.ndarray], config: BluesConfig, *,
                dtype: str = "float32", metadata: Mapping[str, str] | None = None) -> Path:
    """Write `directory/model.safetensors` and `directory/config.json` (each atomically)."""
    check_canonical(arrays, config)  # a bad export is refused before anything is written
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "blues.config": json.dumps(config.to_dict()), "blues.dtype": dtype}
    meta.update(metadata or {})
    write_safetensors(directory / WEIGHTS_NAME, arrays, metadata=meta, dtype=dtype)
    atomic_write_bytes(directory / CONFIG_NAME, (config.to_json() + "\n").encode())
    return directory


def is_export(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path.is_dir() and (path / WEIGHTS_NAME).is_file()) or (path.is_file() and path.suffix == ".safetensors")


def load_export(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], BluesConfig]:
    """(canonical float32 arrays, config) from an export directory or a `.safetensors` file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    arrays, meta = read_safetensors(weights)
    config_file = weights.parent / CONFIG_NAME
    config = None
    if config_file.is_file():
        try:
            text = config_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_file} is unreadable ({e}); re-export the checkpoint") from None
        try:
            config = BluesConfig.from_json(text)
        except BluesError as e:
            raise CheckpointError(f"{config_file}: {e}") from None
    if "blues.config" in meta:
        try:
            embedded = BluesConfig.from_json(meta["blues.config"])
        except BluesError as e:
            raise CheckpointError(f"{weights}: embedded config: {e}") from None
        if config is not None and config != embedded:
            raise CheckpointError(f"{config_file} does not match the config stored in {weights}; "
                                  "re-export the checkpoint")
        config = config or embedded
    if config is None:
        raise CheckpointError(f"{weights} has no config: put its {CONFIG_NAME} next to it")
    try:
        check_canonical(arrays, config)
    except ConversionError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    return arrays, config


def load_init_weights(path: str | os.PathLike, config: BluesConfig) -> dict[str, np.ndarray]:
    """The trainers' `--init_from`: canonical arrays from an export, checked against the run's config."""

    arrays, _ = load_export(path)
    try:
        check_canonical(arrays, config)
    except ConversionError as e:
        raise CheckpointError(f"--init_from {path}: {e}") from None
    return arrays

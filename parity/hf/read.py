"""Read a `--to hf` directory back (model_type "blues"): config.json + model.safetensors (or its shards).

`hf_model_type(path)` tells a Hugging Face model directory (a config.json with a `model_type`) from
Blues' own exports, whose config.json is a bare Blues config; `read_hf(path)` returns what
parity/checkpoint_read.py's readers return (a weights-only `Loaded`, kind "hf").
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from blues.config import BluesConfig
from blues.errors import BluesError, CheckpointError, UsageError
from blues.checkpoint_source import Loaded, check_no_links
from blues.canonical import ConversionError
from parity.hf.weights import from_hf
from blues.safetensors_io import read_safetensors

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"


def hf_model_type(path: Path) -> str | None:
    """The `model_type` of a Hugging Face model directory; None for anything else."""
    try:
        data = json.loads((path / CONFIG).read_text(encoding="utf-8")) if path.is_dir() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    kind = data.get("model_type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def read_hf(path: Path) -> Loaded:
    kind = hf_model_type(path)
    if kind != "blues":
        raise UsageError(f"{path} is a Hugging Face '{kind}' model, not a Blues one (model_type 'blues', as "
                         "--to hf writes it); only those convert back")
    check_no_links(path, [CONFIG, WEIGHTS, INDEX])
    data = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    fields = {f.name for f in dataclasses.fields(BluesConfig)}
    missing = sorted(fields - set(data))
    if missing:
        raise CheckpointError(f"{path / CONFIG} lacks the Blues config field '{missing[0]}'")
    try:
        config = BluesConfig.from_dict({k: data[k] for k in fields})
    except BluesError as e:
        raise CheckpointError(f"{path / CONFIG}: {e}") from None
    tensors = {}
    for file in _weight_files(path):
        tensors.update(read_safetensors(file)[0])
    try:
        arrays = from_hf(tensors, config)
    except ConversionError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Loaded(arrays, config, "hf", path)


def _weight_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards its index lists (each a plain file inside `path`)."""
    if (path / WEIGHTS).is_file() or not (path / INDEX).is_file():
        return [path / WEIGHTS]
    try:
        names = sorted(set(json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path / INDEX} is not a safetensors index (no 'weight_map')") from None
    if any(Path(n).name != n for n in names):
        raise CheckpointError(f"{path / INDEX} names a file outside {path}")
    check_no_links(path, names)
    return [path / n for n in names]

"""A blues_jax model's parameters <-> canonical tensors (blues/layout.py's names and shapes).

Each `nnx.Param` at layout path `spec.path` is the canonical tensor `spec.name` (matrices in `x @ W`
orientation), the embedding with its zero padding rows; blues/canonical.py holds the framework-free
half (checks, padding), parity/convert.py the conversions between frameworks.
"""
from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from blues.canonical import read_model, write_model
from blues.layout import TensorSpec


def param_at(model, path: str):
    """The nnx.Param at a layout path ("layers.0.attn.q")."""
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def get_param(model, spec: TensorSpec) -> np.ndarray:
    return np.asarray(param_at(model, spec.path).value, dtype=np.float32)


def set_param(model, spec: TensorSpec, value: np.ndarray) -> None:
    param = param_at(model, spec.path)
    param.value = jnp.asarray(value, dtype=param.value.dtype)


def to_canonical(model) -> dict[str, np.ndarray]:
    """Every canonical tensor of `model` as float32 numpy arrays (copies)."""
    return read_model(model.config, lambda spec: get_param(model, spec))


def load_canonical(model, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite `model`'s parameters in place with canonical tensors (checked first)."""
    write_model(model.config, arrays, lambda spec, value: set_param(model, spec, value))

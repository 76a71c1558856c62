"""A blues_torch model's parameters <-> canonical tensors (blues/layout.py's names and shapes).

Each parameter at layout path `spec.path` is the canonical tensor `spec.name` (matrices in `x @ W`
orientation), the embedding with its zero padding rows; blues/canonical.py holds the framework-free
half (checks, padding), parity/convert.py the conversions between frameworks.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from blues.canonical import read_model, write_model
from blues.layout import TensorSpec


def get_param(model, spec: TensorSpec) -> np.ndarray:
    return model.get_parameter(spec.path).detach().float().cpu().numpy()


def set_param(model, spec: TensorSpec, value: np.ndarray) -> None:
    param = model.get_parameter(spec.path)
    with torch.no_grad():
        param.copy_(torch.from_numpy(value).to(param.dtype))


def to_canonical(model) -> dict[str, np.ndarray]:
    """Every canonical tensor of `model` as float32 numpy arrays (copies)."""
    return read_model(model.config, lambda spec: get_param(model, spec))


def load_canonical(model, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite `model`'s parameters in place with canonical tensors (checked first)."""
    write_model(model.config, arrays, lambda spec, value: set_param(model, spec, value))

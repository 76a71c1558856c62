"""Convert models between PyTorch, JAX and framework-neutral canonical tensors.

Everything goes through the canonical layout table (`blues.layout.canonical_layout`): a model's
parameter at `spec.path` *is* the canonical tensor `spec.name` (both frameworks store matrices in
`x @ W` orientation), apart from the embedding's zero padding rows. Conversions are strict: a
missing or unexpected tensor, a wrong shape or a non-finite value is an error naming the tensor.
float32 round trips are bit-exact.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from blues.config import BluesConfig
from blues.errors import BluesError
from blues.layout import TensorSpec, canonical_layout

FRAMEWORKS = ("torch", "jax")


class ConversionError(BluesError):
    """Canonical tensors that do not fit the model they are loaded into."""


def framework_of(model) -> str:
    module = type(model).__module__
    if module.startswith("blues_torch"):
        return "torch"
    if module.startswith("blues_jax"):
        return "jax"
    raise ConversionError(f"not a Blues model: {type(model).__name__}")


# ---- reading and writing one parameter, by its layout path ---------------------------------------

def _jax_param(model, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _get(model, spec: TensorSpec, framework: str) -> np.ndarray:
    if framework == "torch":
        return model.get_parameter(spec.path).detach().float().cpu().numpy()
    return np.asarray(_jax_param(model, spec.path).value, dtype=np.float32)


def _set(model, spec: TensorSpec, value: np.ndarray, framework: str) -> None:
    if framework == "torch":
        import torch
        param = model.get_parameter(spec.path)
        with torch.no_grad():
            param.copy_(torch.from_numpy(value).to(param.dtype))
    else:
        import jax.numpy as jnp
        param = _jax_param(model, spec.path)
        param.value = jnp.asarray(value, dtype=param.value.dtype)


# ---- canonical <-> model -------------------------------------------------------------------------

def to_canonical(model) -> dict[str, np.ndarray]:
    """Every canonical tensor of `model` (either framework) as float32 numpy arrays."""
    framework = framework_of(model)
    arrays = {}
    for spec in canonical_layout(model.config):
        value = _get(model, spec, framework)
        if value.shape != spec.module_shape:
            raise ConversionError(f"tensor '{spec.name}' has shape {value.shape} in the model, "
                                  f"expected {spec.module_shape}")
        arrays[spec.name] = np.ascontiguousarray(value[:spec.shape[0]] if spec.pad_rows else value)
    return arrays


def check_canonical(arrays: Mapping[str, np.ndarray], config: BluesConfig) -> None:
    """Raise ConversionError unless `arrays` holds exactly the config's tensors, finite and shaped."""
    layout = canonical_layout(config)
    expected = {spec.name for spec in layout}
    missing = [spec.name for spec in layout if spec.name not in arrays]
    unexpected = sorted(set(arrays) - expected)
    if missing:
        raise ConversionError(f"missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ConversionError(f"unexpected tensor '{unexpected[0]}'" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for spec in layout:
        a = arrays[spec.name]
        if tuple(a.shape) != spec.shape:
            raise ConversionError(f"tensor '{spec.name}' has shape {tuple(a.shape)}, expected {spec.shape} for this config")
        if not np.all(np.isfinite(np.asarray(a, dtype=np.float32))):
            raise ConversionError(f"tensor '{spec.name}' has non-finite values")


def load_canonical(model, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite `model`'s parameters in place with canonical tensors (checked first)."""
    framework = framework_of(model)
    check_canonical(arrays, model.config)
    for spec in canonical_layout(model.config):
        value = np.asarray(arrays[spec.name], dtype=np.float32)
        if spec.pad_rows:  # the model's embedding carries zero rows up to padded_vocab_size
            value = np.concatenate([value, np.zeros((spec.pad_rows, *spec.shape[1:]), np.float32)])
        _set(model, spec, value, framework)


def new_model(config: BluesConfig, framework: str, **model_kwargs):
    """A freshly initialised model of either framework."""
    if framework == "torch":
        from blues_torch import BluesModel
        return BluesModel(config, **model_kwargs)
    if framework == "jax":
        from flax import nnx
        from blues_jax import BluesModel
        model_kwargs.setdefault("rngs", nnx.Rngs(0))
        return BluesModel(config, **model_kwargs)
    raise ConversionError(f"unknown framework '{framework}'; choose one of {', '.join(FRAMEWORKS)}")


def from_canonical(arrays: Mapping[str, np.ndarray], config: BluesConfig, framework: str, **model_kwargs):
    """A model of `framework` ("torch" or "jax") holding exactly these canonical tensors."""
    check_canonical(arrays, config)  # before building: a bad file costs no model init
    model = new_model(config, framework, **model_kwargs)
    load_canonical(model, arrays)
    return model


def torch_to_jax(model, **model_kwargs):
    return from_canonical(to_canonical(model), model.config, "jax", **model_kwargs)


def jax_to_torch(model, **model_kwargs):
    return from_canonical(to_canonical(model), model.config, "torch", **model_kwargs)

"""Canonical tensors without a framework: the checks and the trainers' parameter dictionaries.

Every conversion goes through the canonical layout table (`blues.layout.canonical_layout`): a model's
parameter at `spec.path` *is* the canonical tensor `spec.name` (both frameworks store matrices in
`x @ W` orientation), apart from the embedding's zero padding rows.

- `check_canonical(arrays, config)`: exactly the config's tensors, finite and shaped;
- checkpoints hold parameters by layout path (`spec.path`) with the embedding's padding rows, and
  optimizer moments have exactly that form: `to_module_arrays` / `from_module_arrays` move between it
  and canonical tensors, `nest` / `flatten` between flat paths and the JAX trainer's pure-dict trees.

Each framework's model side is its `state_dict_adapter.py` (blues_torch/, blues_jax/); the
cross-framework conversions are parity/convert.py.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from blues.config import BluesConfig
from blues.errors import BluesError
from blues.layout import canonical_layout


class ConversionError(BluesError):
    """Canonical tensors that do not fit the model they are loaded into."""


def pad_rows(spec, value: np.ndarray) -> np.ndarray:
    """A canonical tensor in its module shape: the embedding gets its zero padding rows."""
    value = np.asarray(value, dtype=np.float32)
    if spec.pad_rows:
        value = np.concatenate([value, np.zeros((spec.pad_rows, *spec.shape[1:]), np.float32)])
    return value


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



def to_module_arrays(arrays: Mapping[str, np.ndarray], config: BluesConfig, *, check: bool = True) -> dict[str, np.ndarray]:
    """Canonical tensors -> {layout path: float32 array in the model's shape} (zero padding rows added)."""
    if check:
        check_canonical(arrays, config)
    out = {}
    for spec in canonical_layout(config):
        out[spec.path] = np.ascontiguousarray(pad_rows(spec, arrays[spec.name]))
    return out


def from_module_arrays(module: Mapping[str, np.ndarray], config: BluesConfig, *, what: str = "tensor",
                       check: bool = True) -> dict[str, np.ndarray]:
    """{layout path: array} (embedding with or without its padding rows) -> canonical float32 tensors.

    Strict: a missing or unexpected path or a wrong shape raises ConversionError naming it; `what`
    says what the arrays are in that message ("tensor", "exp_avg of", ...).
    """
    specs = canonical_layout(config)
    unexpected = sorted(set(module) - {s.path for s in specs})
    if unexpected:
        raise ConversionError(f"unexpected {what} '{unexpected[0]}' for this config"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    arrays = {}
    for spec in specs:
        if spec.path not in module:
            raise ConversionError(f"missing {what} '{spec.path}'")
        a = np.array(_as_float32(module[spec.path]), copy=True)  # never a view of a live tensor
        if tuple(a.shape) not in (spec.shape, spec.module_shape):
            raise ConversionError(f"{what} '{spec.path}' has shape {tuple(a.shape)}, expected {spec.module_shape} "
                                  f"for this config")
        arrays[spec.name] = np.ascontiguousarray(a[:spec.shape[0]] if spec.pad_rows else a)
    if check:
        check_canonical(arrays, config)
    return arrays


def _as_float32(a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor (bfloat16 has no numpy twin: widen in torch)
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def nest(flat: Mapping[str, object]) -> dict:
    """{"layers.0.attn.q": x} -> {"layers": {0: {"attn": {"q": x}}}}: the shape of
    `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (list indices become int keys)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """Inverse of `nest` (keys may be ints or digit strings, as Orbax restores them)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_model(config: BluesConfig, get: Callable) -> dict[str, np.ndarray]:
    """Every canonical tensor of a model whose parameter of `spec` is `get(spec)` (float32 numpy in
    the module shape): the framework-free half of each state_dict_adapter's `to_canonical`."""
    arrays = {}
    for spec in canonical_layout(config):
        value = get(spec)
        if value.shape != spec.module_shape:
            raise ConversionError(f"tensor '{spec.name}' has shape {value.shape} in the model, "
                                  f"expected {spec.module_shape}")
        # A copy: torch's .numpy() shares the parameter's memory, which an optimizer step would change.
        arrays[spec.name] = np.array(value[:spec.shape[0]] if spec.pad_rows else value, copy=True, order="C")
    return arrays


def write_model(config: BluesConfig, arrays: Mapping[str, np.ndarray], put: Callable) -> None:
    """`put(spec, value)` every canonical tensor in its module shape, after checking them all."""
    check_canonical(arrays, config)
    for spec in canonical_layout(config):
        put(spec, pad_rows(spec, arrays[spec.name]))

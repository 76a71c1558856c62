"""Convert models between PyTorch, JAX and framework-neutral canonical tensors.

Everything goes through the canonical layout table (`blues.layout.canonical_layout`): a model's
parameter at `spec.path` *is* the canonical tensor `spec.name` (both frameworks store matrices in
`x @ W` orientation), apart from the embedding's zero padding rows. Conversions are strict: a
missing or unexpected tensor, a wrong shape or a non-finite value is an error naming the tensor.
float32 round trips are bit-exact.

- models: `to_canonical(model)`, `from_canonical(arrays, config, framework)`, `load_canonical`,
  `torch_to_jax(model)`, `jax_to_torch(model)`, `check_canonical(arrays, config)`;
- the trainers' parameter dictionaries (by layout path, embedding padded; optimizer moments have
  the same form): `to_module_arrays`, `from_module_arrays`, and `nest` / `flatten` between flat paths
  and the JAX trainer's pure-dict trees.

Optimizer state (AdamW) converts in parity/optim_convert.py, whole checkpoints in
parity/convert_checkpoint.py; both go through these functions.
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
        # A copy: torch's .numpy() shares the parameter's memory, which an optimizer step would change.
        arrays[spec.name] = np.array(value[:spec.shape[0]] if spec.pad_rows else value, copy=True, order="C")
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


# ---- canonical <-> the trainers' parameter dictionaries ---------------------------------------------
# Checkpoints hold parameters by layout path (`spec.path`, the module attribute path) with the
# embedding's padding rows; optimizer moments have exactly the same form. These helpers move between
# that form and canonical tensors, and nest/flatten it as the JAX trainer's pure-dict trees.

def to_module_arrays(arrays: Mapping[str, np.ndarray], config: BluesConfig, *, check: bool = True) -> dict[str, np.ndarray]:
    """Canonical tensors -> {layout path: float32 array in the model's shape} (zero padding rows added)."""
    if check:
        check_canonical(arrays, config)
    out = {}
    for spec in canonical_layout(config):
        value = np.asarray(arrays[spec.name], dtype=np.float32)
        if spec.pad_rows:
            value = np.concatenate([value, np.zeros((spec.pad_rows, *spec.shape[1:]), np.float32)])
        out[spec.path] = np.ascontiguousarray(value)
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


def _jax_model_shell(config: BluesConfig, **model_kwargs):
    """A blues_jax model whose parameters are about to be overwritten: its structure comes from
    `nnx.eval_shape` (no random init, which at a 200k vocabulary costs seconds of XLA compiles),
    parameters are zeros, and the random streams (router noise, dropout) get real keys derived from
    seed 0, as `nnx.Rngs(0)` would seed a fresh model."""
    import itertools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from blues_jax import BluesModel

    abstract = nnx.eval_shape(lambda: BluesModel(config, rngs=nnx.Rngs(0), **model_kwargs))
    graphdef, state = nnx.split(abstract)
    base, counter = jax.random.key(0), itertools.count()

    def fill(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(base, next(counter))
        return jnp.asarray(np.zeros(leaf.shape, leaf.dtype))

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def from_canonical(arrays: Mapping[str, np.ndarray], config: BluesConfig, framework: str, **model_kwargs):
    """A model of `framework` ("torch" or "jax") holding exactly these canonical tensors."""
    check_canonical(arrays, config)  # before building: a bad file costs no model init
    if framework == "jax" and "rngs" not in model_kwargs:
        model = _jax_model_shell(config, **model_kwargs)
    else:
        model = new_model(config, framework, **model_kwargs)
    load_canonical(model, arrays)
    return model


def torch_to_jax(model, **model_kwargs):
    return from_canonical(to_canonical(model), model.config, "jax", **model_kwargs)


def jax_to_torch(model, **model_kwargs):
    return from_canonical(to_canonical(model), model.config, "torch", **model_kwargs)

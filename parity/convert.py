"""Convert models between PyTorch, JAX and framework-neutral canonical tensors.

Everything goes through the canonical layout table (`blues.layout.canonical_layout`): each
framework's `state_dict_adapter.py` reads and writes its model's parameters as canonical tensors,
and blues/canonical.py checks them and holds the trainers' parameter dictionaries (`to_module_arrays`,
`from_module_arrays`, `nest`, `flatten`). Conversions are strict: a missing or unexpected tensor, a
wrong shape or a non-finite value is an error naming the tensor. float32 round trips are bit-exact.

- models of either framework: `to_canonical(model)`, `load_canonical(model, arrays)`,
  `from_canonical(arrays, config, framework)`, `new_model`, `torch_to_jax(model)`, `jax_to_torch(model)`.

Optimizer state (AdamW) converts in parity/optim_convert.py, whole checkpoints in
parity/convert_checkpoint.py; both go through these functions. Each framework is imported only when a
model of it is converted (either may be absent).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from blues.canonical import ConversionError, check_canonical
from blues.config import BluesConfig

FRAMEWORKS = ("torch", "jax")


def framework_of(model) -> str:
    module = type(model).__module__
    if module.startswith("blues_torch"):
        return "torch"
    if module.startswith("blues_jax"):
        return "jax"
    raise ConversionError(f"not a Blues model: {type(model).__name__}")


def _adapter(model):
    if framework_of(model) == "torch":
        from blues_torch import state_dict_adapter
    else:
        from blues_jax import state_dict_adapter
    return state_dict_adapter


def to_canonical(model) -> dict[str, np.ndarray]:
    """Every canonical tensor of `model` (either framework) as float32 numpy arrays."""
    return _adapter(model).to_canonical(model)


def load_canonical(model, arrays: Mapping[str, np.ndarray]) -> None:
    """Overwrite `model`'s parameters (either framework) in place with canonical tensors (checked first)."""
    _adapter(model).load_canonical(model, arrays)


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

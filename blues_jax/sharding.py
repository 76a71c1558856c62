"""Where every array lives on a device mesh: one table of logical axis -> mesh axis rules.

Parameters name logical axes only (`nnx.with_partitioning` / `out_sharding` metadata in model.py);
this file alone decides what they mean on a mesh. The mesh has two axes:

- "data":   pure data parallelism (batches split, parameters replicated);
- "expert": expert parallelism. Tokens are split over it too (every device holds different
  tokens), and the expert axis of w_in / w_out is split over it, so each device holds E/expert
  experts; experts.expert_mlp moves tokens to their experts' devices by all-to-all.

So tokens are data-parallel over every device, experts over "expert", and everything else is
replicated.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from blues.errors import BluesError

MESH_AXES = ("data", "expert")

# logical axis -> mesh axis (a name, a tuple of names split major-to-minor, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),  # tokens: split over every device, data-major
    ("expert", "expert"),  # the stacked experts of w_in / w_out
    ("vocab", None),
    ("embed", None),
    ("heads", None),
    ("kv_heads", None),
    ("mlp", None),
    ("length", None),
)
_RULES = dict(LOGICAL_RULES)
BATCH_AXES: tuple[str, ...] = _RULES["batch"]


class MeshError(BluesError):
    """A device-mesh specification that does not fit the devices or the model."""


# ---- the mesh --------------------------------------------------------------------------------------

def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """"data=2,expert=4" (or {"data": 2, "expert": 4}) -> {"data": 2, "expert": 4}. Omitted axes are 1."""
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            name = name.strip()
            if not eq or not value.strip().lstrip("-").isdigit():
                raise MeshError(f"mesh spec '{spec}': '{part}' is not of the form axis=size "
                                f"(e.g. 'data=2,expert=4')")
            if name in sizes:
                raise MeshError(f"mesh spec '{spec}': axis '{name}' given twice")
            sizes[name] = int(value)
    elif isinstance(spec, Mapping):
        sizes = dict(spec)
    else:
        raise MeshError(f"mesh spec must be a string like 'data=2,expert=4' or a dict, got {type(spec).__name__}")
    unknown = [name for name in sizes if name not in MESH_AXES]
    if unknown:
        raise MeshError(f"mesh spec: unknown axis '{unknown[0]}'; the axes are {', '.join(MESH_AXES)}")
    for name, size in sizes.items():
        if not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
            raise MeshError(f"mesh spec: axis '{name}' must have a positive integer size, got {size!r}")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int], devices: list | None = None) -> Mesh:
    """A ("data", "expert") mesh over `devices` (default: all of them) from "data=2,expert=4"."""
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    product = math.prod(sizes.values())
    if product != len(devices):
        given = " x ".join(f"{name}={size}" for name, size in sizes.items())
        raise MeshError(f"mesh spec '{_spec_str(spec)}' asks for {given} = {product} devices but "
                        f"{len(devices)} are available; make the sizes multiply to {len(devices)}")
    grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    # Auto axes: outside the expert layer's shard_map, XLA's partitioner propagates shardings
    # from the parameters and the batch.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _spec_str(spec) -> str:
    return spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in dict(spec).items())


# ---- logical axes -> shardings ---------------------------------------------------------------------

def logical_to_spec(axes: tuple[str | None, ...] | None) -> P:
    """PartitionSpec of an array whose dimensions carry these logical axis names."""
    if not axes:
        return P()
    for name in axes:
        if name is not None and name not in _RULES:
            raise MeshError(f"logical axis '{name}' has no rule in blues_jax.sharding.LOGICAL_RULES")
    return P(*(None if name is None else _RULES[name] for name in axes))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, what: str) -> P:
    """Check that every split dimension divides evenly over its mesh axes."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            continue
        parts = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if size % parts:
            raise MeshError(f"{what}: dimension {dim} of size {size} cannot be split {parts} ways over mesh "
                            f"axes {axes}; choose a mesh whose sizes divide it (e.g. expert size dividing "
                            f"tot_num_experts)")
    return spec


def _variable_sharding(var: nnx.Variable, mesh: Mesh, what: str) -> NamedSharding:
    axes = var.get_metadata().get("out_sharding")
    shape = tuple(getattr(var.get_value(), "shape", ()))
    return NamedSharding(mesh, _fit(logical_to_spec(axes), shape, mesh, what))


def param_shardings(model_state: nnx.State, mesh: Mesh) -> nnx.State:
    """`model_state` with each variable's value replaced by its NamedSharding (flax's convention, so
    the tree fits `jax.device_put` and jit's in/out_shardings): each variable split by its logical
    axes and the rules; variables without logical axes (RNG keys and counts) are replicated."""
    def sharding(path, var):
        return var.replace(_variable_sharding(var, mesh, ".".join(map(str, path))))

    return jax.tree_util.tree_map_with_path(
        lambda path, var: sharding(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), var),
        model_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place `model`'s state on `mesh` according to the rules (in place) and tell its layers the
    mesh, so the expert layers run expert-parallel. Returns the model."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh)))
    model.set_attributes(mesh=mesh, raise_if_not_found=False)
    return model


# ---- batches ---------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Split axis 0 (the batch) over every device, data-major; the other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh):
    """device_put every array of a pytree (e.g. (input_ids, targets)) with its batch axis split."""
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.shape[0] % shards:
            raise MeshError(f"batch size {x.shape[0]} does not split over the mesh's {shards} devices "
                            f"(data x expert); use a multiple of {shards}")
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)


def mesh_is_trivial(mesh: Mesh | None) -> bool:
    """No mesh, or one device: nothing to split, and per-device kernels may run as they are."""
    return mesh is None or mesh.size == 1


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Inside jit: keep an activation's batch axis split over the mesh (no-op without a mesh)."""
    if mesh_is_trivial(mesh):
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, x.ndim))

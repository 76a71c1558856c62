"""AdamW state in one framework-neutral form, and in torch.optim.AdamW, optax.adamw and DeepSpeed ZeRO.

Both trainers apply the same update. For a parameter p with gradient g, the t-th applied update is

    m = b1 * m + (1 - b1) * g                    v = b2 * v + (1 - b2) * g^2
    p = p - lr * wd * p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

with wd applied to the matrices only (ndim >= 2: embedding, q/k/v/o, router, w_in, w_out) and not
to the RMSNorm scales. The two libraries store and parameterise it like this:

| neutral (`AdamWState`)  | torch.optim.AdamW (train_torch.py)        | optax.adamw (train_jax.py)                    |
| ----------------------- | ----------------------------------------- | --------------------------------------------- |
| `exp_avg[name]` (m)     | `state[i]["exp_avg"]`                     | `inner_state[0].mu[path]` (ScaleByAdamState)  |
| `exp_avg_sq[name]` (v)  | `state[i]["exp_avg_sq"]`                  | `inner_state[0].nu[path]`                     |
| `step` (t so far)       | `state[i]["step"]` (float tensor, per p)  | `inner_state[0].count` (int32) and the outer  |
|                         |                                           | InjectHyperparamsState `count`                |
| `betas`                 | group `betas`                             | hyperparams `b1`, `b2`                        |
| `eps`                   | group `eps`                               | hyperparams `eps`; `eps_root` must be 0       |
| `weight_decay`          | `weight_decay` of group 0 (the matrices); | hyperparams `weight_decay` with the static    |
|                         | group 1 (norm scales) has 0               | `mask` = ndim >= 2                            |
| `lr` (last used)        | group `lr`                                | hyperparams `learning_rate`                   |

Index i of a torch parameter is its position in the trainer's groups: the matrices in layout order,
then the norm scales in layout order (`torch_param_order`). Moments are stored without the
embedding's padding rows; those rows get exactly zero gradient, so their moments are zero.

Why the next update is the same after a conversion:
- eps sits outside the square root in both (torch adds it to `sqrt(v) / sqrt(1 - b2^t)`, optax to
  `sqrt(v_hat + eps_root)` with eps_root = 0), so the same number means the same thing;
- weight decay is decoupled and multiplied by the learning rate in both (torch: `p *= 1 - lr * wd`
  before the Adam step; optax: `add_decayed_weights(wd)` then `scale_by_learning_rate(lr)`, i.e.
  `p -= lr * (u + wd * p)`). The same `--weight_decay` therefore means the same decay. Neither is
  the L2 penalty of `torch.optim.Adam(weight_decay=...)`, nor the paper's unscaled `p -= wd * p`;
- the bias corrections count applied updates in both (a skipped, non-finite step advances neither),
  so `step` carries over as is;
- the learning rate of the next update comes from blues/schedule.py in both trainers, not from the
  stored value, which is kept for information only;
- scalars: torch computes the bias corrections in float64 and rounds `1 - b1` once, optax works in
  float32: the updates agree to ~1e-7 relative, far below the 1e-5 loss tolerance of the tests.

DeepSpeed ZeRO-1/2 (`from_deepspeed`, read where a checkpoint lacks the layout-free model.safetensors
and optimizer.pt that train_torch.py saves beside DeepSpeed's files): each rank holds a slice of one flat float32 buffer per
parameter group: the master weights and, partitioned the same way, the Adam moments. DeepSpeed's
own `zero_to_fp32` utilities reassemble the master weights; the very same reassembly, applied to the
moment buffers, yields per-parameter moments, so a ZeRO-1/2 checkpoint converts with its full
optimizer state, whatever the number of ranks that wrote it. What it does not allow: writing a
ZeRO-partitioned checkpoint back (its flat layout, alignment padding and partition count are
DeepSpeed's internals and depend on the world size): conversions to torch produce a plain
train_torch.py checkpoint. ZeRO-3, DeepSpeed's non-AdamW optimizers and `adam_w_mode: false`
(L2-regularised Adam) are refused, naming the setting.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from blues.adamw import AdamWState, decays
from blues.config import BluesConfig
from blues.errors import CheckpointError
from blues.layout import TensorSpec, canonical_layout
from blues.canonical import ConversionError, flatten, from_module_arrays, nest, to_module_arrays


def torch_param_order(config: BluesConfig) -> list[TensorSpec]:
    """train_torch.py's optimizer indices: its param_groups are [matrices, norm scales], each in
    `model.parameters()` order, which is the layout order (docs/architecture.md)."""
    specs = canonical_layout(config)
    return [s for s in specs if decays(len(s.shape))] + [s for s in specs if not decays(len(s.shape))]


def zeros_like_params(config: BluesConfig) -> dict[str, np.ndarray]:
    return {s.name: np.zeros(s.shape, np.float32) for s in canonical_layout(config)}


# ---- torch.optim.AdamW ---------------------------------------------------------------------------

def _scalar(x) -> float:
    return float(x.item()) if hasattr(x, "item") else float(x)


def from_torch(state_dict: Mapping, config: BluesConfig) -> AdamWState:
    """The neutral state of a `torch.optim.AdamW.state_dict()` made by train_torch.py's param groups."""
    try:
        groups, per_param = list(state_dict["param_groups"]), state_dict["state"]
    except (KeyError, TypeError):
        raise ConversionError("optimizer state has no 'param_groups'/'state': not a torch optimizer state dict") from None
    order = torch_param_order(config)
    n_decay = sum(decays(len(s.shape)) for s in order)
    if len(groups) != 2 or [len(g["params"]) for g in groups] != [n_decay, len(order) - n_decay]:
        raise ConversionError(
            f"optimizer has groups of {[len(g.get('params', ())) for g in groups]} parameters; train_torch.py's "
            f"AdamW has 2 groups of [{n_decay}, {len(order) - n_decay}] (matrices, norm scales) for this config")
    for key, bad in (("amsgrad", True), ("maximize", True), ("decoupled_weight_decay", False)):
        if any(g.get(key, not bad) == bad for g in groups):
            raise ConversionError(f"optimizer param group has {key}={bad}: not the AdamW both trainers use")
    first = groups[0]
    for key in ("lr", "betas", "eps"):
        if any(_hp(g[key]) != _hp(first[key]) for g in groups):
            raise ConversionError(f"optimizer param groups differ in '{key}': optax.adamw has one value for all")
    if _scalar(groups[1]["weight_decay"]) != 0.0:
        raise ConversionError(f"optimizer decays the norm scales (weight_decay {groups[1]['weight_decay']}); "
                              "the trainers never do, and optax's mask cannot express it")
    ids = list(groups[0]["params"]) + list(groups[1]["params"])
    steps, m, v = set(), {}, {}
    for param_id, spec in zip(ids, order):
        entry = per_param.get(param_id)
        if not entry:  # never updated: torch creates the state at the first step
            steps.add(0)
            continue
        steps.add(int(round(_scalar(entry["step"]))))
        m[spec.path], v[spec.path] = entry["exp_avg"], entry["exp_avg_sq"]
    if len(steps) > 1:
        raise ConversionError(f"optimizer parameters were updated different numbers of times ({sorted(steps)}); "
                              "the trainers update all of them together")
    step = steps.pop() if steps else 0
    if step and len(m) != len(order):
        raise ConversionError("optimizer state lacks the moments of some parameters")
    if not m:
        exp_avg, exp_avg_sq = zeros_like_params(config), zeros_like_params(config)
    else:
        exp_avg = from_module_arrays(m, config, what="optimizer exp_avg of", check=False)
        exp_avg_sq = from_module_arrays(v, config, what="optimizer exp_avg_sq of", check=False)
    b1, b2 = (float(b) for b in _hp(first["betas"]))
    state = AdamWState(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, lr=_scalar(first["lr"]), betas=(b1, b2),
                       eps=_scalar(first["eps"]), weight_decay=_scalar(groups[0]["weight_decay"]))
    state.check(config)
    return state


def _hp(x):
    """A hyperparameter value, comparable (tensors -> floats, tuples kept)."""
    if isinstance(x, (tuple, list)):
        return tuple(_scalar(e) for e in x)
    return _scalar(x)


def to_torch(state: AdamWState, config: BluesConfig, *, flags: Mapping | None = None) -> dict:
    """`state` as the state dict of train_torch.py's `torch.optim.AdamW(param_groups(model, wd), ...)`.

    The group entries (`foreach`, `fused`, ...) are this torch version's AdamW defaults, updated with
    `flags` (e.g. {"fused": True}: `load_state_dict` keeps a saved group's flags, so they decide the
    implementation of the resumed run); the trainer's optimizer loads it like one of its own.
    """
    import torch

    state.check(config)
    order = torch_param_order(config)
    n_decay = sum(decays(len(s.shape)) for s in order)
    # An optimizer over empty placeholders gives this torch version's exact group entries.
    dummies = [torch.nn.Parameter(torch.empty(0)) for _ in order]
    template = torch.optim.AdamW([{"params": dummies[:n_decay], "weight_decay": state.weight_decay},
                                  {"params": dummies[n_decay:], "weight_decay": 0.0}],
                                 lr=state.lr, betas=state.betas, eps=state.eps).state_dict()
    m = to_module_arrays(state.exp_avg, config, check=False)
    v = to_module_arrays(state.exp_avg_sq, config, check=False)
    per_param = {}
    if state.step > 0:  # a fresh torch optimizer has no per-parameter state until its first step
        for i, spec in enumerate(order):
            per_param[i] = {"step": torch.tensor(float(state.step), dtype=torch.float32),
                            "exp_avg": torch.from_numpy(m[spec.path].copy()),
                            "exp_avg_sq": torch.from_numpy(v[spec.path].copy())}
    groups = [dict(g, **{k: v for k, v in (flags or {}).items() if k in g and k != "params"})
              for g in template["param_groups"]]
    return {"state": per_param, "param_groups": groups}


# ---- optax.adamw ---------------------------------------------------------------------------------

def optax_adamw(params, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """train_jax.py's optimizer: optax.adamw under inject_hyperparams (the trainer sets the learning
    rate of every step), weight decay masked to the matrices (ndim >= 2)."""
    import jax
    import optax

    mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay, mask=mask)


def _field(node, name: str, index: int | None = None):
    """A field of an optax state, typed (NamedTuple/dataclass) or as Orbax restores it untyped
    (dicts, lists)."""
    if isinstance(node, Mapping):
        return node[name]
    if isinstance(node, (list, tuple)) and not hasattr(node, "_fields"):
        return node[index]
    return getattr(node, name)


def _from_float32(x) -> float:
    """optax keeps hyperparameters in float32 (0.9 -> 0.89999998): read back the shortest decimal that
    rounds to the same float32, which is the value the user gave (0.9), so that torch -> jax -> torch
    returns the original numbers."""
    return float(repr(np.float32(np.asarray(x))).removeprefix("np.float32(").removesuffix(")"))


def from_optax(opt_state, config: BluesConfig) -> AdamWState:
    """The neutral state of train_jax.py's optax state (typed, or restored from Orbax as plain trees)."""
    try:
        hyper = _field(opt_state, "hyperparams")
        inner = _field(opt_state, "inner_state")
        adam = _field(inner, "inner_state", 0) if isinstance(inner, Mapping) else inner[0]
        mu, nu, count = _field(adam, "mu"), _field(adam, "nu"), _field(adam, "count")
        hp = {k: _from_float32(hyper[k]) for k in ("b1", "b2", "eps", "eps_root", "learning_rate", "weight_decay")}
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        raise ConversionError(f"optimizer state is not train_jax.py's inject_hyperparams(optax.adamw) "
                              f"state (no {e})") from None
    if hp["eps_root"] != 0.0:
        raise ConversionError(f"optax eps_root is {hp['eps_root']}; torch.optim.AdamW has no epsilon inside the "
                              "square root, so only eps_root = 0 converts")
    exp_avg = from_module_arrays(flatten(mu), config, what="optimizer mu of", check=False)
    exp_avg_sq = from_module_arrays(flatten(nu), config, what="optimizer nu of", check=False)
    state = AdamWState(step=int(np.asarray(count)), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                       lr=hp["learning_rate"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
                       weight_decay=hp["weight_decay"])
    state.check(config)
    return state


def to_optax(state: AdamWState, config: BluesConfig):
    """`state` as train_jax.py's optax state (typed), over parameters nested like
    `nnx.to_pure_dict` of the model's parameters (embedding with its padding rows)."""
    import jax.numpy as jnp

    state.check(config)
    m = nest({k: jnp.asarray(a) for k, a in to_module_arrays(state.exp_avg, config, check=False).items()})
    v = nest({k: jnp.asarray(a) for k, a in to_module_arrays(state.exp_avg_sq, config, check=False).items()})
    tx = optax_adamw(m, lr=state.lr, betas=state.betas, eps=state.eps, weight_decay=state.weight_decay)
    fresh = tx.init(m)
    adam = fresh.inner_state[0]
    adam = adam._replace(count=jnp.asarray(state.step, adam.count.dtype), mu=m, nu=v)
    hyper = dict(fresh.hyperparams)
    for key, value in (("learning_rate", state.lr), ("b1", state.betas[0]), ("b2", state.betas[1]),
                       ("eps", state.eps), ("weight_decay", state.weight_decay), ("eps_root", 0.0)):
        hyper[key] = jnp.asarray(value, hyper[key].dtype)
    return fresh._replace(count=jnp.asarray(state.step, fresh.count.dtype), hyperparams=hyper,
                          inner_state=(adam, *fresh.inner_state[1:]))


# ---- DeepSpeed ZeRO-1/2 --------------------------------------------------------------------------

def deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoints, allowed for weights-only loads."""
    import importlib

    found = []
    for module, names in (("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
                          ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
                          ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
                          ("deepspeed.runtime.zero.offload_config", ("OffloadDeviceEnum",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside, DeepSpeed's included, runs with weights_only=True: a checkpoint that
    would execute code when unpickled is refused, never run."""
    import torch

    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def from_deepspeed(ds_dir: str | os.PathLike, config: BluesConfig) -> tuple[dict[str, np.ndarray], AdamWState]:
    """(canonical float32 master weights, AdamW state) of a DeepSpeed ZeRO-1/2 checkpoint directory
    (the tag directory holding `mp_rank_00_model_states.pt` and one `*_optim_states.pt` per rank)."""
    import torch

    ds_dir = Path(ds_dir)
    try:
        from deepspeed.utils import zero_to_fp32 as z
    except ImportError:
        raise CheckpointError(f"{ds_dir} is a DeepSpeed checkpoint; reading it needs the deepspeed package "
                              "(pip install deepspeed)") from None
    try:
        with weights_only_loads():
            zero_model_states = z.parse_model_states(z.get_model_state_files(str(ds_dir)))
            optim_files = z.get_optim_files(str(ds_dir))
            files = [torch.load(f, map_location="cpu", weights_only=True) for f in optim_files]
        shards = [f["optimizer_state_dict"] for f in files]
    except Exception as e:  # DeepSpeed / torch raise many kinds; name the directory and stop
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise CheckpointError(f"{ds_dir}: not a readable DeepSpeed checkpoint ({first})") from None

    _check_deepspeed_optimizer(files[0].get("ds_config"), ds_dir)
    stage = int(shards[0].get("zero_stage", -1))
    if stage not in (1, 2):
        raise CheckpointError(f"{ds_dir}: ZeRO stage {stage} checkpoints are not supported (train_torch.py uses "
                              "stage 1 or 2)")
    counts = shards[0]["partition_count"]
    world = max(counts) if isinstance(counts, (list, tuple)) else int(counts)
    if world != len(shards):
        raise CheckpointError(f"{ds_dir}: {len(shards)} optimizer shard files for {world} ranks: the checkpoint "
                              "is incomplete")
    try:
        bases = [s["base_optimizer_state"] for s in shards]
        n_groups = len(shards[0]["single_partition_of_fp32_groups"])
        flat = {"fp32": [s["single_partition_of_fp32_groups"] for s in shards],
                "exp_avg": [[b["state"][g]["exp_avg"] for g in range(n_groups)] for b in bases],
                "exp_avg_sq": [[b["state"][g]["exp_avg_sq"] for g in range(n_groups)] for b in bases]}
        steps = {int(round(_scalar(b["state"][g]["step"]))) for b in bases for g in range(n_groups)}
        groups = bases[0]["param_groups"]
    except (KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{ds_dir}: DeepSpeed optimizer state without per-group Adam moments ({e!r}); "
                              "elastic or offloaded ZeRO checkpoints are not supported") from None
    if len(steps) != 1:
        raise CheckpointError(f"{ds_dir}: ranks or groups disagree on the optimizer step ({sorted(steps)})")
    paddings = shards[0].get("param_alignment_paddings")
    merged = {}
    try:
        with contextlib.redirect_stdout(open(os.devnull, "w")):  # zero_to_fp32 prints its progress
            for key, groups_by_rank in flat.items():
                # DeepSpeed's own reassembly of the flat, partitioned buffers into named tensors.
                merged[key] = z._get_fp32_state_dict_from_zero2_checkpoint(
                    world, groups_by_rank, zero_model_states, False, paddings)
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise CheckpointError(f"{ds_dir}: DeepSpeed could not reassemble its partitions ({first})") from None

    try:
        wd = _decay_of(groups)
        decayed = {s.path for s in canonical_layout(config) if decays(len(s.shape))}
        for shapes, group in zip(zero_model_states[0].param_shapes, groups):
            wrong = [n for n in shapes if wd > 0 and (_scalar(group["weight_decay"]) > 0) != (n in decayed)]
            if wrong:
                raise ConversionError(f"parameter '{wrong[0]}' is in a group with weight_decay "
                                      f"{group['weight_decay']}, unlike train_torch.py's groups (matrices decayed, "
                                      "norm scales not)")
        weights = from_module_arrays(merged["fp32"], config, what="tensor")
        exp_avg = from_module_arrays(merged["exp_avg"], config, what="optimizer exp_avg of", check=False)
        exp_avg_sq = from_module_arrays(merged["exp_avg_sq"], config, what="optimizer exp_avg_sq of", check=False)
        b1, b2 = (float(b) for b in _hp(groups[0]["betas"]))
        state = AdamWState(step=steps.pop(), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, lr=_scalar(groups[0]["lr"]),
                           betas=(b1, b2), eps=_scalar(groups[0]["eps"]), weight_decay=wd)
        state.check(config)
    except ConversionError as e:
        raise CheckpointError(f"{ds_dir}: {e}") from None
    return weights, state


def _decay_of(groups) -> float:
    """The one weight decay of the decayed group(s) (0 if none decays)."""
    values = {_scalar(g["weight_decay"]) for g in groups} - {0.0}
    if len(values) > 1:
        raise ConversionError(f"optimizer groups use several weight decays {sorted(values)}; optax.adamw has one")
    return values.pop() if values else 0.0


def _check_deepspeed_optimizer(ds_config, where) -> None:
    """Refuse DeepSpeed optimizers whose update is not AdamW's (named)."""
    if not isinstance(ds_config, Mapping):
        return  # older checkpoints keep only the keys; the state itself is checked afterwards
    opt = ds_config.get("optimizer") or {}
    kind = str(opt.get("type", "AdamW")).lower()
    params = opt.get("params") or {}
    if kind not in ("adamw", "adam"):
        raise CheckpointError(f"{where}: DeepSpeed optimizer '{opt.get('type')}' is not AdamW; only AdamW state "
                              "converts")
    if kind == "adam" and params.get("adam_w_mode", True) is False:  # DeepSpeed's "AdamW" is always decoupled
        raise CheckpointError(f"{where}: DeepSpeed optimizer has adam_w_mode false (L2-regularised Adam); "
                              "optax.adamw cannot continue it")

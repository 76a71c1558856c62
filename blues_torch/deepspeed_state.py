"""The layout-free AdamW state out of DeepSpeed's ZeRO-1/2 partitions, and back in.

ZeRO keeps each parameter's float32 master copy and Adam moments as fragments of flat per-group
buffers, split over the parameter's data-parallel ranks (an expert's: its expert-data-parallel
ranks). DeepSpeed's own accessors `deepspeed.utils.safe_get_full_fp32_param` /
`safe_get_full_optimizer_state` assemble one parameter's tensor on this rank (a collective over its
group) and `safe_set_full_*` write one back. With expert_parallel.gather_experts / slice_experts
they give the canonical state plain checkpoints hold, so a DeepSpeed checkpoint resumes in another
layout or without DeepSpeed, and a plain one under DeepSpeed (blues_torch/checkpoint.py).
DeepSpeed is imported here only: this module is loaded only when a run uses it.
"""
from __future__ import annotations

import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)
from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

from blues_torch.expert_parallel import ParallelLayout, gather_experts, slice_experts

MOMENTS = ("exp_avg", "exp_avg_sq")


def has_zero_partitions(engine) -> bool:
    """Whether the engine's optimizer is ZeRO-1/2's (stage 0 keeps torch's or DeepSpeed's bf16 one)."""
    return hasattr(engine.optimizer, "single_partition_of_fp32_groups")


def _zero(engine):
    """The engine's ZeRO-1/2 optimizer and the torch AdamW it drives (over the flat partitions)."""
    zero = engine.optimizer
    if not has_zero_partitions(engine):
        raise ValueError(f"{type(zero).__name__} is not DeepSpeed's ZeRO stage 1/2 optimizer")
    return zero, zero.optimizer


def _link_moments(zero, adamw) -> None:
    """Point every parameter's fragment map at AdamW's current moment buffers. ZeRO links them once,
    after the first group's first update, when the later groups have no state yet (their maps stay
    empty), so they are linked again here (deepspeed.utils.mixed_precision_linkage)."""
    for lp_params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(lp_params, flat, adamw.state)
    zero._hp_optimizer_states_linked = True


def zero_step(engine) -> int:
    """AdamW updates applied so far (0 before the first: torch creates its state then)."""
    _, adamw = _zero(engine)
    steps = {int(round(float(s["step"]))) for s in adamw.state.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"ZeRO's partitions disagree on the optimizer step ({sorted(steps)})")
    return steps.pop() if steps else 0


@torch.no_grad()
def full_zero_state(engine, model, layout: ParallelLayout) -> tuple[dict, dict[str, dict], int]:
    """(float32 master weights, {"exp_avg": .., "exp_avg_sq": ..}, step) by layout path, every expert
    tensor in its canonical [E, ...] form. Collective: every rank calls it."""
    step = zero_step(engine)
    if step:
        _link_moments(*_zero(engine))
    params = dict(model.named_parameters())
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    weights.update({name: safe_get_full_fp32_param(p) for name, p in params.items()})
    moments = {key: {name: (safe_get_full_optimizer_state(p, key) if step else torch.zeros_like(p, dtype=torch.float32))
                     for name, p in params.items()} for key in MOMENTS}
    return (gather_experts(weights, layout), {key: gather_experts(m, layout) for key, m in moments.items()}, step)


@torch.no_grad()
def load_zero_weights(model, layout: ParallelLayout, weights: dict) -> None:
    """Set the module and ZeRO's float32 master copy from canonical weights by layout path."""
    weights = slice_experts(weights, layout)
    model.load_state_dict(weights, strict=True)
    for name, p in model.named_parameters():
        safe_set_full_fp32_param(p, weights[name].to(torch.float32))


@torch.no_grad()
def load_zero_state(engine, model, layout: ParallelLayout, weights: dict, moments: dict[str, dict], step: int) -> None:
    """Set the module, ZeRO's master copy, its Adam moments and step from canonical tensors by layout
    path (this rank cuts out its experts)."""
    zero, adamw = _zero(engine)
    load_zero_weights(model, layout, weights)
    params = dict(model.named_parameters())
    if step == 0:
        return  # a fresh AdamW: no state until its first update
    for group in adamw.param_groups:  # torch.optim.AdamW's own state layout (its _init_group)
        on_device = group.get("fused") or group.get("capturable")
        for flat in group["params"]:
            adamw.state[flat] = {
                "step": torch.tensor(float(step), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    _link_moments(zero, adamw)
    for key in MOMENTS:
        local = slice_experts(moments[key], layout)
        for name, p in params.items():
            safe_set_full_optimizer_state(p, local[name].to(torch.float32), key)


def adamw_hyperparameters(engine) -> dict:
    """lr (last used), betas, eps, weight decay and the implementation flags of the engine's AdamW."""
    _, adamw = _zero(engine)
    groups = adamw.param_groups
    decays = {float(g["weight_decay"]) for g in groups} - {0.0}
    first = groups[0]
    return {"lr": float(first["lr"]), "betas": tuple(float(b) for b in first["betas"]), "eps": float(first["eps"]),
            "weight_decay": decays.pop() if decays else 0.0,
            "flags": {k: first[k] for k in ("fused", "foreach") if k in first}}

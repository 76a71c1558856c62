"""DeepSpeed's MoE gradient handling for Blues' own expert layers.

DeepSpeed's engine turns on its MoE code paths (`has_moe_layers`: expert gradients all-reduced over
their expert-data-parallel group only, the ZeRO optimizer's MoE param groups partitioned over that
group, `num_experts` per layer) only when the model holds `deepspeed.moe.layer.MoE` modules
(deepspeed/runtime/engine.py, `_configure_distributed_model`). Blues' MoE layers are its own
(blues_torch/experts.py, split by blues_torch/expert_parallel.py, expert parameters tagged
`allreduce = False` / `group_name` as DeepSpeed's are), so `engine_sees_experts` sets those two
engine attributes at the end of that method, before the optimizer is built, for the one
`deepspeed.initialize` call it wraps. Everything else is DeepSpeed's own code.
DeepSpeed is imported here only: this module is loaded only when a run uses it.
"""
from __future__ import annotations

import contextlib

from deepspeed.runtime.engine import DeepSpeedEngine


@contextlib.contextmanager
def engine_sees_experts(config):
    """Inside: a DeepSpeedEngine being built treats the model as holding `config.num_layers` MoE
    layers of `config.tot_num_experts` experts."""
    original = DeepSpeedEngine._configure_distributed_model

    def configure(engine, model):
        original(engine, model)
        engine.has_moe_layers = True
        engine.num_experts = [config.tot_num_experts] * config.num_layers

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original

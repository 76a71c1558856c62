"""DeepSpeed's ZeRO-1/2 step without host waits: the skip of a non-finite step decided on the device,
and the end of the backward ordered after the gradient reductions on the device.

Why: DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer.step` (deepspeed/runtime/zero/stage_1_and_2.py) decides
on the host whether a step is skipped: `has_overflow` reads the all-reduced overflow flag with `.item()`,
and `is_invalid_grad_norm` reads the global norm twice (in `step` and in `unscale_and_clip_grads`). Each
read waits for the GPU to finish the backward, and only then does the host launch the clip, the
optimizer and the weight copies, so the GPU idles while they are launched: ~10 ms of the engine's
~13.6 ms a step over plain compiled PyTorch at `bench` on an H200 (docs/performance.md, "What makes
it fast").

What: `install()` replaces `step` with one that computes the same skip flag as a device tensor (the
overflow flag, all-reduced as `has_overflow` does, or an invalid global norm) and hands it to the
optimizer as `found_inf`: torch's fused Adam/AdamW then leaves the weights, moments and step count as
they were, the flag GradScaler uses, as blues_torch/training.py's `apply_update` does without
DeepSpeed. Everything else is DeepSpeed's own sequence for a partition on the device: the fp32 gradient
partition flattened from the averaged gradients, the clip (DeepSpeed's formula; an invalid norm clips
by infinity, as `unscale_and_clip_grads` does), the optimizer over each param group, the bf16 weights
copied from the fp32 partition and all-gathered. On a skipped step those are computed and discarded,
so the weights end as DeepSpeed's skip leaves them; the gradients are freed either way.

What the host no longer knows: after `step()` the optimizer's `overflow` is False, so the engine's
`was_step_applied()` and `skipped_steps` count every step as applied. `skipped_on_device` (a [] bool
tensor) says whether the step was skipped, and `_global_grad_norm` is a tensor (+inf on a skipped
step, as DeepSpeed sets it). blues_torch/training.py's `TrainStep` reads both with the step's losses.

Only the configuration Blues runs takes this path: exactly `DeepSpeedZeroOptimizer` (no subclass),
no optimizer offload, the gradient norm computed, a static loss scale of 1 (bf16 or fp32, never fp16's
dynamic scaling, whose scale update needs the flag on the host), and a torch `Adam`/`AdamW` with
`fused=True` (DeepSpeed's `torch_adam` with `fused`, ds_config.json's choice), the only optimizers
whose step honours `found_inf`. Any other step is DeepSpeed's own, with `skipped_on_device` None.

The end of the backward: with `overlap_comm` (ds_config.json's choice), gradients are reduced on
DeepSpeed's reduction stream, and `independent_gradient_partition_epilogue` calls
`get_accelerator().synchronize()` before it frees the reduced gradients and flattens the partition:
the host waits for the whole backward, so even with the step above nothing can be queued ahead of the
GPU. `install()` wraps the epilogue so that, for the same configuration, that synchronize is the
compute stream waiting on the reduction stream instead (`wait_stream`): every later kernel on the
compute stream, where the step and the next forward run and where the freed gradients' memory is
reused, still starts after the reductions; the host does not wait. Other synchronizes (the
non-contiguous gradient path's, offload's) are DeepSpeed's own.

Check: `python -m pytest -q tests/test_deepspeed_skip.py` runs clean, non-finite and clipped steps
through two engines, one with each step, and compares the weights, Adam state and norms bit for bit;
it also fails the host checks to show this step never reaches them, follows the epilogue's stream
wait with stand-in streams on a CPU, and on a GPU lists every host wait of the forward, backward and
step (torch's sync debug mode and the synchronize functions watched): there must be none.

Only DeepSpeed 0.19.x is patched (blues_torch/deepspeed_norms.py's version check).
"""
from __future__ import annotations

import logging
import sys

import torch

from blues_torch.deepspeed_norms import unsupported_deepspeed, zero_module

log = logging.getLogger(__name__)

# The stage_1_and_2 globals the step uses, looked up there at call time.
_MODULE_GLOBALS = ("dist", "get_accelerator", "all_gather_dp_groups", "INITIAL_MICRO_STEP_ID",
                   "OPTIMIZER_ALLGATHER_TIMER", "OPTIMIZER_GRADIENTS_TIMER", "OPTIMIZER_STEP_TIMER",
                   "OPTIMIZER_TIMERS", "see_memory_usage")
# The DeepSpeedZeroOptimizer methods it calls.
_METHODS = ("step", "scaled_global_norm", "has_overflow_partitioned_grads_serial", "_model_parallel_all_reduce",
            "_wait_for_offload_copies", "_get_preflattened_grad_partition", "_release_preflattened_grad_buffers",
            "free_grad_in_param_list", "flatten_dense_tensors_aligned", "_optimizer_step",
            "_update_model_bit16_weights", "independent_gradient_partition_epilogue")

# DeepSpeed's own step and epilogue, saved by install(); the fallback for every other configuration.
ORIGINALS: dict[str, object] = {}


def decides_on_device(opt) -> bool:
    """Whether `opt`'s step can decide its skip on the device (the module docstring's configuration)."""
    optimizer = opt.optimizer
    return (type(opt) is zero_module().DeepSpeedZeroOptimizer and not opt.cpu_offload and opt.compute_grad_norm
            and not opt.dynamic_loss_scale and opt.loss_scale == 1.0 and opt.dtype != torch.float16
            and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and optimizer.defaults.get("fused")
            and not getattr(opt, "_muon_pending_momentum", None))


def _overflow_on_device(opt) -> torch.Tensor:
    """DeepSpeed's `has_overflow` without its `.item()`: [1] uint8, 1 where any rank's gradients hold a
    NaN or an infinity."""
    zero = zero_module()
    overflow = opt.has_overflow_partitioned_grads_serial().byte()
    zero.dist.all_reduce(overflow, op=zero.dist.ReduceOp.MAX, group=opt.dp_process_group)
    opt._model_parallel_all_reduce(tensor=overflow, op=zero.dist.ReduceOp.MAX)
    return overflow


def _clip(opt, grad: torch.Tensor, norm: torch.Tensor) -> None:
    """DeepSpeed's `unscale_and_clip_grads` for a loss scale of 1, an invalid norm replaced on the
    device (DeepSpeed tests it on the host) by infinity."""
    if opt.clip_grad <= 0.0:
        return
    clip_norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
    clip = ((clip_norm / opt.loss_scale) + 1e-6) / opt.clip_grad
    clip = torch.clamp(clip, min=1.0)
    combined_scale = clip * opt.loss_scale
    grad.data.mul_(1. / combined_scale)


@torch.no_grad()
def step(self, closure=None):
    """`DeepSpeedZeroOptimizer.step` with the skip decided on the device (the module docstring)."""
    if not decides_on_device(self):
        self.skipped_on_device = None
        return ORIGINALS["step"](self, closure)
    zero = zero_module()
    self.micro_step_id = zero.INITIAL_MICRO_STEP_ID
    self._wait_for_offload_copies()
    zero.see_memory_usage("In step before checking overflow")

    # Whether to skip, on the device: the tests DeepSpeed's step makes on the host.
    norm = self.scaled_global_norm()  # [] float32; +inf when a group's norm is invalid
    skip = torch.zeros((), dtype=torch.bool, device=norm.device)
    if self.check_grad_overflow:
        skip = skip | _overflow_on_device(self).to(norm.device).bool().reshape(())
    if self.dtype != torch.bfloat16 or self.check_grad_overflow:
        skip = skip | ~torch.isfinite(norm) | (norm < 0)
    self.overflow = False  # the host does not know; skipped_on_device does
    self.skipped_on_device = skip
    self._global_grad_norm = torch.where(skip, torch.full_like(norm, float("inf")), norm / self.loss_scale)
    self.optimizer.found_inf = skip.float().to(self.single_partition_of_fp32_groups[0].device)

    for i in range(len(self.bit16_groups)):
        self.timers(zero.OPTIMIZER_GRADIENTS_TIMER).start()
        partition_id = zero.dist.get_rank(group=self.real_dp_process_group[i])
        # DeepSpeed's lines for a partition on the device: gradients not in this partition freed, this
        # partition's gradients flattened into the fp32 partition's grad (the last rank's padded).
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        flat = self._get_preflattened_grad_partition(i)
        if flat is None:
            if partition_id == zero.dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
                flat = self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
            else:
                flat = self.flatten(self.averaged_gradients[i])
        fp32_partition = self.single_partition_of_fp32_groups[i]
        grad = flat.to(fp32_partition.dtype)
        del flat
        assert grad.numel() == self.partition_size[i], (grad.numel(), self.partition_size[i], i, partition_id)
        fp32_partition.grad = grad
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
        _clip(self, grad, norm)
        self.timers(zero.OPTIMIZER_GRADIENTS_TIMER).stop()

        self.timers(zero.OPTIMIZER_STEP_TIMER).start()
        self._optimizer_step(i)  # found_inf set: a skipped step leaves weights, moments and step count
        fp32_partition.grad = None
        del grad
        self.parallel_partitioned_bit16_groups[i][partition_id].data.copy_(fp32_partition.data)
        self.timers(zero.OPTIMIZER_STEP_TIMER).stop()
    self.optimizer.found_inf = None

    self.timers(zero.OPTIMIZER_ALLGATHER_TIMER).start()
    zero.all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                              partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                              dp_process_group=self.real_dp_process_group,
                              start_alignment_factor=self.nccl_start_alignment_factor,
                              allgather_bucket_size=self.allgather_bucket_size)
    self.timers(zero.OPTIMIZER_ALLGATHER_TIMER).stop()
    for i in range(len(self.bit16_groups)):
        self._update_model_bit16_weights(i)
    self.timers.log(zero.OPTIMIZER_TIMERS)
    zero.see_memory_usage("After zero_optimizer step")


def independent_gradient_partition_epilogue(self):
    """DeepSpeed's end-of-backward epilogue, its synchronize under `overlap_comm` a device-side wait of
    the compute stream on the reduction stream (the module docstring)."""
    original = ORIGINALS["independent_gradient_partition_epilogue"]
    reductions = self.reduction_stream
    if not (self.overlap_comm and reductions is not None and decides_on_device(self)):
        return original(self)
    accelerator = zero_module().get_accelerator()

    def wait_for_reductions(device_index=None):
        accelerator.current_stream().wait_stream(reductions)

    own = vars(accelerator).get("synchronize")  # an instance attribute already there, put back after
    accelerator.synchronize = wait_for_reductions  # on the instance: the class's method stays
    try:
        return original(self)
    finally:
        if own is None:
            del accelerator.synchronize
        else:
            accelerator.synchronize = own


def _unsupported_reason() -> str | None:
    reason = unsupported_deepspeed()
    if reason is not None:
        return reason
    zero = zero_module()
    missing = [n for n in _METHODS if not callable(getattr(zero.DeepSpeedZeroOptimizer, n, None))]
    missing += [n for n in _MODULE_GLOBALS if not hasattr(zero, n)]
    return f"missing {', '.join(missing)}" if missing else None


def install(names: tuple[str, ...] | None = None) -> bool:
    """Put this module's `step` and epilogue on `DeepSpeedZeroOptimizer` (every instance, existing or
    future); -> whether they are installed. names: only those of them (a before/after measurement), the
    others DeepSpeed's own. Idempotent: a second call changes nothing."""
    reason = _unsupported_reason()
    if reason is not None:
        log.debug("deepspeed_skip not installed: %s", reason)
        return False
    cls = zero_module().DeepSpeedZeroOptimizer
    for name, ours in _REPLACEMENTS.items():
        if getattr(cls, name) is not ours:  # a second install() must not save ours as the original
            ORIGINALS[name] = getattr(cls, name)
        setattr(cls, name, ours if names is None or name in names else ORIGINALS[name])
    return True


def installed() -> bool:
    """Whether DeepSpeedZeroOptimizer's step is this module's (DeepSpeed is not imported for the answer)."""
    zero = sys.modules.get("deepspeed.runtime.zero.stage_1_and_2")
    return zero is not None and zero.DeepSpeedZeroOptimizer.step is step


def uninstall() -> None:
    """Put DeepSpeed's own step and epilogue back (a before/after measurement)."""
    for name, original in ORIGINALS.items():
        setattr(zero_module().DeepSpeedZeroOptimizer, name, original)


# What install() puts on DeepSpeedZeroOptimizer.
_REPLACEMENTS = {"step": step, "independent_gradient_partition_epilogue": independent_gradient_partition_epilogue}

__all__ = ["ORIGINALS", "decides_on_device", "independent_gradient_partition_epilogue", "install", "installed",
           "uninstall", "step"]

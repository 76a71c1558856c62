"""ZeRO-1/2's gradient reduction when the data-parallel group is one rank.

Why: DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer.average_tensor` (deepspeed/runtime/zero/
stage_1_and_2.py) reduces each full gradient bucket the same way at any world size: it divides the
bucket by the world size, flattens its slices into a new tensor (a copy), reduces that over the
group, adds the unflattened result into the float32 gradient partition and copies it back over the
bucket, and with `overlap_comm` (ds_config.json) first synchronises the whole device
(`allreduce_and_copy`). With one rank the division is by 1 and the reduction returns its input, so
of that work only the addition into the partition changes anything: the rest is four passes over
every bf16 gradient and one device synchronisation per bucket (the `bench` model's 1.44B gradients
fill ~29 buckets of ds_config.json's 5e7 elements).

What: `install()` replaces `average_tensor` with a version that, when the bucket's every gradient
belongs to this one rank (data-parallel group of one, no expert or sequence parallelism, no CPU
offload, no Muon, no AutoEP folding), adds each gradient's slice of the bucket into its place in
the gradient partition, on the stream and with the stream ordering the original uses; anything else
goes to DeepSpeed's own method. The partition receives the same values (x / 1.0 == x, a reduction
over one rank is the identity, the copy back rewrote the bucket with itself), so training is bit
for bit what it was.

Check: `python -m pytest -q tests/test_deepspeed_one_rank.py` trains the same steps through
engines with and without it and compares the weights bit for bit.

Only DeepSpeed 0.19.x is patched (blues_torch/deepspeed_norms.py's version gate).
"""
from __future__ import annotations

import logging

from blues_torch import deepspeed_norms

log = logging.getLogger(__name__)

ORIGINALS: dict[str, object] = {}


def _one_rank(self) -> bool:
    """Whether every gradient this optimizer reduces stays on this rank, and average_tensor's
    one-rank path below covers everything the original would do with it."""
    zero = deepspeed_norms._zero_module()
    if zero.dist.get_world_size(group=self.dp_process_group) != 1 or self.sequence_parallel_size != 1:
        return False
    if self.cpu_offload or self._offload_gradient_safety_enabled or not self.reduce_scatter:
        return False
    if getattr(self, "autoep_folding_tp_group", None) is not None:
        return False
    if any(self._is_muon_group(params) for params in self.params_in_partition if params):
        return False
    groups = getattr(self, "expert_dp_process_group", None) or {}
    return all(zero.dist.get_world_size(group=g) == 1 for g in groups.values())


def average_tensor(self, tensor, communication_data_type):
    """Reduce one gradient bucket (`tensor`, flat) into the gradient partition; at one rank, add
    each gradient's slice into its place there. Else DeepSpeed's own method."""
    if not _one_rank(self):
        return ORIGINALS["average_tensor"](self, tensor, communication_data_type)
    zero = deepspeed_norms._zero_module()
    accelerator = zero.get_accelerator()
    if self.overlap_comm:  # the original's ordering: after the bucket's producers, before later compute
        stream = self.reduction_stream
        if not accelerator.resolves_data_dependency():
            bucket = self.ipg_buckets[communication_data_type]
            for producer in bucket.copy_streams or {accelerator.current_stream()}:
                stream.wait_stream(producer)
            accelerator.current_stream().wait_stream(stream)
    else:
        stream = accelerator.current_stream()
    with accelerator.stream(stream):
        self._record_gradient_stream(tensor, stream)
        offset = 0
        for i, param_index, param_id in self.ipg_buckets[communication_data_type].params:
            numel = self.bit16_groups[i][param_index].numel()
            # None when the partition is not a float32 buffer of its own: the bucket is then where
            # the gradient lives, and the original's copy back left it unchanged
            output = self._get_compact_grad_partition_slice(i, 0, param_id, numel)
            self._add_to_grad_partition_buffer(output, tensor.narrow(0, offset, numel))
            offset += numel


_REPLACEMENTS = {"average_tensor": average_tensor}


def install() -> bool:
    """Put the one-rank reduction on `DeepSpeedZeroOptimizer`; -> whether it is installed.
    Idempotent."""
    reason = deepspeed_norms._unsupported_reason()
    if reason is not None:
        log.debug("deepspeed_one_rank not installed: %s", reason)
        return False
    cls = deepspeed_norms._zero_module().DeepSpeedZeroOptimizer
    for name, replacement in _REPLACEMENTS.items():
        current = getattr(cls, name)
        if current is not replacement:
            ORIGINALS[name] = current
            setattr(cls, name, replacement)
    return True


def uninstall() -> None:
    """Put DeepSpeed's own method back (a before/after measurement)."""
    cls = deepspeed_norms._zero_module().DeepSpeedZeroOptimizer
    for name, original in ORIGINALS.items():
        setattr(cls, name, original)

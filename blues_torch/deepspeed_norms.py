"""Multi-tensor gradient norm and overflow check for DeepSpeed's ZeRO-1/2 optimizer.

Why: DeepSpeed 0.19.8's `DeepSpeedZeroOptimizer` (deepspeed/runtime/zero/stage_1_and_2.py) walks
every gradient in Python twice a step, and at the `bench` model size (134 gradient tensors in two
param groups) that cost ~60 ms of host time per step on an H200 while the GPU sat idle:

- `has_overflow_partitioned_grads_serial` (step -> check_overflow -> has_overflow; run because
  ds_config.json sets `bf16.check_grad_overflow`) calls `has_inf_or_nan` on each gradient: amax,
  amin, two isfinite, logical_and, logical_not -- ~24 ms a step.
- `get_grad_norm_direct` (step -> scaled_global_norm, once per param group) makes a float64 copy
  of each gradient and takes its `vector_norm` -- ~37-46 ms a step, plus ~10 ms of GPU time for
  the copies.

What: `install()` replaces those two methods on the class with versions that take every
gradient's float64 L2 norm in one `torch._foreach_norm(grads, 2, dtype=float64)` call (CUDA's
multi-tensor kernel: a few launches for all tensors, no float64 copies):

- overflow: a gradient holds a NaN or an infinity exactly when its float64 L2 norm is non-finite.
  Squares of bf16/fp16/fp32 values are at most 3.4e38**2 ~ 1.2e77, so their float64 sum cannot
  overflow (float64 reaches 1.8e308), and NaN and +-inf propagate through the sum. The result is
  the same device bool tensor of shape [1] the original returns, which `has_overflow` all-reduces.
- norm: the per-tensor loop is the only change. The same gradients are selected (zero padding
  dropped, zipped with the params, pipeline-replicated params skipped, model-parallel filtering),
  and the sum of squares, the data- and model-parallel all-reduces and the square root are
  DeepSpeed's own lines; the NaN/inf -> -1 masking is the same `masked_fill_` with -1 given as a
  number, where DeepSpeed's `mask_nan_or_inf_with_val_inplace` first copies a -1 tensor from the host
  (a copy that waits for the GPU to finish everything queued: the backward, at the step).

The results are the same: both compute each norm in float64 (DeepSpeed's `get_norm_dtype()`) from
the same elements; on CPU they are bit-identical, on CUDA the multi-tensor kernel may sum in a
different order, which is float64 rounding (~1e-16 relative) before the float32 cast of the total.
Whatever the fast path cannot vouch for is handed to the original method: a norm type other than
2, sparse or float64 gradients, gradients on more than one device, or a device without float64.

Check: `python -m pytest -q tests/test_deepspeed_norms.py` compares both methods with the saved
originals on a real ZeRO-2 engine (clean, NaN and inf gradients) and runs full steps through it.

Only DeepSpeed 0.19.x is patched, the version whose internals this was written against; for any
other version, or if the methods or the module globals used here are missing, `install()` leaves
DeepSpeed alone and returns False.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_SUPPORTED = (0, 19)  # major, minor of the DeepSpeed whose stage_1_and_2.py this mirrors
# The stage_1_and_2 globals the replacements use. They are looked up on that module at call
# time, so the replacements see exactly what the originals see (including anyone's patches).
_MODULE_GLOBALS = ("dist", "get_accelerator", "get_norm_dtype", "is_model_parallel_parameter", "PIPE_REPLICATED")
# float64 sums of squares of these cannot overflow (see the module docstring), so a non-finite
# norm means a non-finite element and nothing else.
_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The methods install() replaced, by name; the replacements fall back to these.
ORIGINALS: dict[str, object] = {}


def zero_module():
    from deepspeed.runtime.zero import stage_1_and_2
    return stage_1_and_2


def _batchable(grads: list[torch.Tensor]) -> bool:
    """Whether one `_foreach_norm` over grads computes what the per-tensor originals do: dense
    tensors of a dtype in _FAST_DTYPES, all on one device (the norms are stacked)."""
    if not grads:
        return True
    device = grads[0].device
    return all(g.layout is torch.strided and g.dtype in _FAST_DTYPES and g.device == device for g in grads)


def has_overflow_partitioned_grads_serial(self):
    """Whether any of this rank's partitioned gradients holds a NaN or an infinity: a [1] bool
    tensor on the current device, as DeepSpeed's original (which `has_overflow` all-reduces)."""
    zero = zero_module()
    grads = [g for i in range(len(self.bit16_groups)) for g in self.averaged_gradients[i] if g is not None]
    # get_norm_dtype() is float32 only on devices without float64 (MPS), where dtype=float64 fails.
    if zero.get_norm_dtype() is not torch.float64 or not _batchable(grads):
        return ORIGINALS["has_overflow_partitioned_grads_serial"](self)
    device = zero.get_accelerator().current_device_name()
    if not grads:
        return torch.zeros([1], dtype=torch.bool, device=device)
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float64))
    return torch.isfinite(norms).all().logical_not().reshape(1).to(device)


def get_grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeed's `get_grad_norm_direct` with the per-gradient norms taken in one multi-tensor call.

    Everything but the norms and the masking of an invalid norm (no host copy) is the original's
    code, line for line; norm types other than 2 (and gradients `_batchable` refuses) go to the
    original."""
    zero = zero_module()
    # Materialised first: the fallback must still see every gradient if it is an iterator.
    gradients, params = list(gradients), list(params)
    norm_type = float(norm_type)
    if norm_type != 2.0:
        return ORIGINALS["get_grad_norm_direct"](self, gradients, params, norm_type)

    selected = []
    param_gradients = (g for g in gradients if not getattr(g, "_zero_padding", False))
    for g, p in zip(param_gradients, params):
        # Pipeline parallelism may replicate parameters. Avoid multi-counting.
        if hasattr(p, zero.PIPE_REPLICATED) and p.ds_pipe_replicated:
            continue
        if zero.is_model_parallel_parameter(p) or (self.model_parallel_rank == 0):
            selected.append(g.data)
    if not _batchable(selected):
        return ORIGINALS["get_grad_norm_direct"](self, gradients, params, norm_type)

    if selected:
        norms = torch._foreach_norm(selected, norm_type, dtype=zero.get_norm_dtype())
        all_norms = torch.stack(norms).to(zero.get_accelerator().current_device_name())
        total_norm = all_norms.pow(norm_type).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    # From here on DeepSpeed's lines: the sum over data-parallel ranks, then model-parallel ones.
    zero.dist.all_reduce(total_norm, op=zero.dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=zero.dist.ReduceOp.SUM)
    total_norm = total_norm.pow(1. / norm_type)

    # DeepSpeed's mask_nan_or_inf_with_val_inplace (an invalid norm becomes -1) without its
    # torch.tensor(-1.0, device=...), a host-to-device copy that waits for the GPU to finish the backward.
    total_norm.masked_fill_(~torch.isfinite(total_norm), -1.0)
    return total_norm


_REPLACEMENTS = {f.__name__: f for f in (has_overflow_partitioned_grads_serial, get_grad_norm_direct)}


def unsupported_deepspeed() -> str | None:
    """None when DeepSpeed imports and is the version this module and deepspeed_skip.py mirror, else why not."""
    try:
        import deepspeed
        from packaging.version import Version
        zero_module()
    except Exception as e:  # not installed, or an install that fails to import
        return f"deepspeed not importable ({type(e).__name__}: {e})"
    if Version(deepspeed.__version__).release[:2] != _SUPPORTED:
        return f"deepspeed {deepspeed.__version__} is not {_SUPPORTED[0]}.{_SUPPORTED[1]}.x"
    return None


def _unsupported_reason() -> str | None:
    """None when this DeepSpeed is one install() may patch, else why not."""
    reason = unsupported_deepspeed()
    if reason is not None:
        return reason
    zero = zero_module()
    cls = getattr(zero, "DeepSpeedZeroOptimizer", None)
    missing = [n for n in _REPLACEMENTS if not callable(getattr(cls, n, None))]
    missing += [n for n in _MODULE_GLOBALS if not hasattr(zero, n)]
    if not hasattr(torch, "_foreach_norm"):
        missing.append("torch._foreach_norm")
    return f"missing {', '.join(missing)}" if missing else None


def install() -> bool:
    """Put the multi-tensor methods on `DeepSpeedZeroOptimizer` (every instance, existing or
    future); -> whether they are installed. Idempotent: a second call changes nothing."""
    reason = _unsupported_reason()
    if reason is not None:
        log.debug("deepspeed_norms not installed: %s", reason)
        return False
    cls = zero_module().DeepSpeedZeroOptimizer
    for name, replacement in _REPLACEMENTS.items():
        current = getattr(cls, name)
        if current is not replacement:  # a second install() must not save ours as the original
            ORIGINALS[name] = current
            setattr(cls, name, replacement)
    return True


def uninstall() -> None:
    """Put DeepSpeed's own methods back (a before/after measurement: scripts/profile_gpu.py)."""
    if ORIGINALS:
        cls = zero_module().DeepSpeedZeroOptimizer
        for name, original in ORIGINALS.items():
            setattr(cls, name, original)


__all__ = ["ORIGINALS", "install", "uninstall", "unsupported_deepspeed", "zero_module", "get_grad_norm_direct",
           "has_overflow_partitioned_grads_serial"]

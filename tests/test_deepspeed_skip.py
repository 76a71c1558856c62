"""blues_torch/deepspeed_skip.py against DeepSpeed's own ZeRO step, on real ZeRO-2 engines.

Two engines are built alike (bench.deepspeed_step.build_engine: ds_config.json's bf16 ZeRO-2 with
check_grad_overflow and torch's fused AdamW, a process group of one, the `tiny` model, same seed);
one steps with deepspeed_skip's step, the other with DeepSpeed's original, on the same gradients.
Both run the same operations on the same values (the clip's formula, the fused AdamW kernel, the
casts), so the weights, Adam moments and step counts must be equal bit for bit, on a clean step, a
clipped one and a skipped one alike. conftest.py's deepspeed_one_rank puts DeepSpeed's methods back.
"""
from __future__ import annotations

import math
import traceback
import warnings
from pathlib import Path

import pytest

from bench.deepspeed_step import build_engine, deepspeed_available
from bench.train_step import GRAD_CLIP, random_batch, train_workload

_NO_DEEPSPEED = deepspeed_available()
pytestmark = pytest.mark.skipif(_NO_DEEPSPEED is not None, reason=str(_NO_DEEPSPEED))


@pytest.fixture
def workload(deepspeed_one_rank):
    return train_workload("tiny", quick=True)


def _batch(eng, wl, seed):
    """-> (ids, targets) [B, T] of a random batch, on the engine's device."""
    import torch
    device = next(eng.module.parameters()).device
    return tuple(torch.from_numpy(a).long().to(device) for a in random_batch(wl.config, wl.batch, wl.seq, seed))


def _backward(eng, wl, *, seed, loss_factor=1.0, batch=None):
    """One forward and backward on a random batch (or `batch`), the loss times loss_factor (NaN or
    inf poisons every gradient; a large factor makes the norm exceed the clip)."""
    import torch
    ids, tgt = _batch(eng, wl, seed) if batch is None else batch
    out = eng(ids, tgt, generator=torch.Generator(device=ids.device).manual_seed(seed + 1))
    eng.backward(out.loss * loss_factor)


def _state(eng) -> list:
    """Everything a step may change: the fp32 partitions, the bf16 module weights, Adam's state."""
    opt = eng.optimizer
    tensors = [p.detach().clone() for p in opt.single_partition_of_fp32_groups]
    tensors += [p.detach().clone() for p in eng.module.parameters()]
    for p in opt.single_partition_of_fp32_groups:
        state = opt.optimizer.state[p]  # exp_avg, exp_avg_sq, step once a step has run
        tensors += [state[k].detach().clone() for k in sorted(state)]
    return tensors


def _assert_equal(a: list, b: list) -> None:
    import torch
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all())


def test_the_device_step_matches_deepspeeds_on_clean_clipped_and_skipped_steps(workload, monkeypatch):
    import torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from blues_torch import deepspeed_skip
    ours, _, _, _ = build_engine(workload, seed=0)
    theirs, _, _, _ = build_engine(workload, seed=0)
    assert deepspeed_skip.installed() and deepspeed_skip.decides_on_device(ours.optimizer)
    _assert_equal(_state(ours), _state(theirs))

    # (loss factor, whether DeepSpeed skips): clean, clipped (norm far above GRAD_CLIP), NaN, inf, clean
    steps = [(1.0, False), (1e3, False), (math.nan, True), (math.inf, True), (1.0, False)]
    for seed, (factor, skipped) in enumerate(steps):
        before = _state(ours)
        _backward(ours, workload, seed=seed, loss_factor=factor)
        _backward(theirs, workload, seed=seed, loss_factor=factor)
        ours.step()
        with monkeypatch.context() as m:
            m.setattr(DeepSpeedZeroOptimizer, "step", deepspeed_skip.ORIGINALS["step"])
            theirs.step()
        assert theirs.was_step_applied() is not skipped  # the case is what it is meant to be
        assert bool(ours.optimizer.skipped_on_device) is skipped
        ours_norm, theirs_norm = ours.get_global_grad_norm(), theirs.get_global_grad_norm()
        assert torch.is_tensor(ours_norm) and float(ours_norm) == float(theirs_norm)
        if factor == 1e3:
            assert float(ours_norm) > 10 * GRAD_CLIP  # the clip scaled this step's gradients
        _assert_equal(_state(ours), _state(theirs))
        if skipped:  # a skipped step leaves everything as it was (Adam's step count included)
            _assert_equal(_state(ours), before)
            assert float(ours_norm) == math.inf
        else:
            assert not torch.equal(_state(ours)[0], before[0])


def test_the_device_step_never_reads_the_device_on_the_host(workload, monkeypatch):
    """No tensor is read on the host inside the engine's step: every way of reading one (.item(),
    bool(), float(), int(), .tolist(), .cpu(), numpy) fails the test during clean and NaN steps
    (DeepSpeed's own step fails it at `has_overflow`'s .item()). The TrainStep over the engine hands
    back its values unread, so the training loop may queue the next step."""
    import torch

    from blues_torch.distributed import Dist
    from blues_torch.training import TrainStep

    eng, device, _, _ = build_engine(workload, seed=0)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host inside the step")

    for seed, factor in enumerate((1.0, math.nan)):
        _backward(eng, workload, seed=seed, loss_factor=factor)
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, host_read)
            eng.step()
        assert bool(eng.optimizer.skipped_on_device) is math.isnan(factor)

    train_step = TrainStep(eng.module, eng.optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16",
                           gen=torch.Generator(device=device).manual_seed(1), engine=eng)
    assert not train_step.waits_on_host
    ids, tgt = (torch.from_numpy(a).long().to(device) for a in random_batch(workload.config, workload.batch,
                                                                             workload.seq, 0))
    clean = train_step([(ids, tgt)], 1e-3)
    poisoned = train_step([(ids, tgt)], 1e-3, inject_nan=True)
    assert isinstance(clean._values, torch.Tensor) and isinstance(poisoned._values, torch.Tensor)  # unread
    (clean_values, clean_applied), (bad_values, bad_applied) = clean.read(), poisoned.read()
    assert clean_applied and math.isfinite(clean_values[0]) and math.isfinite(clean_values[-1])
    assert not bad_applied and math.isnan(bad_values[0]) and bad_values[-1] == math.inf


def test_other_optimizers_keep_deepspeeds_step(workload):
    """An unfused AdamW ignores found_inf, so its engine keeps DeepSpeed's own (host-deciding) step and
    the TrainStep reads each step on the host."""
    import torch

    from blues_torch import deepspeed_skip
    from blues_torch.distributed import Dist
    from blues_torch.training import TrainStep
    eng, device, _, _ = build_engine(workload, seed=0, overrides={"optimizer": {"params": {"fused": False}}})
    assert deepspeed_skip.installed() and not deepspeed_skip.decides_on_device(eng.optimizer)
    train_step = TrainStep(eng.module, eng.optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16",
                           gen=torch.Generator(device=device).manual_seed(1), engine=eng)
    assert train_step.waits_on_host
    ids, tgt = (torch.from_numpy(a).long().to(device) for a in random_batch(workload.config, workload.batch,
                                                                             workload.seq, 0))
    values = train_step([(ids, tgt)], 1e-3)
    assert eng.optimizer.skipped_on_device is None and isinstance(values._values, list)  # read in the step
    assert values.read()[1] and eng.was_step_applied()


class _Stream:
    """A stand-in for a CUDA stream on the CPU: records `wait_stream` calls in a shared log."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: "_Stream") -> None:
        self.log.append(("wait", self.name, other.name))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU accelerator only (the GPU test below)")
def test_the_end_of_backward_waits_on_the_device_not_the_host(workload, monkeypatch):
    """Under overlap_comm, DeepSpeed's end-of-backward epilogue synchronises the device before it frees
    the reduced gradients; deepspeed_skip's has the compute stream wait on the reduction stream there
    instead. The CPU accelerator has no streams, so the test gives it two stand-ins and says it does
    not resolve data dependencies (as CUDA's does not): DeepSpeed's own epilogue then calls
    synchronize (the path is reached), ours never does, and its wait comes after the last reduction
    and before the gradients are freed. Both engines end the step equal bit for bit."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from blues_torch import deepspeed_skip
    ours, _, _, _ = build_engine(workload, seed=0)
    theirs, _, _, _ = build_engine(workload, seed=0)
    accelerator = get_accelerator()
    logs = {}
    for name, eng in (("ours", ours), ("theirs", theirs)):
        log = logs[name] = []
        compute, reduction = _Stream("compute", log), _Stream("reduction", log)
        opt = eng.optimizer
        assert opt.overlap_comm and opt.contiguous_gradients  # ds_config.json's choices
        original_reduce, original_clear = opt.average_tensor, opt._clear_previous_reduced_grads

        def average_tensor(*args, _log=log, _reduce=original_reduce):
            result = _reduce(*args)  # launches the reduction of one bucket
            _log.append(("reduced",))
            return result

        def clear(_log=log, _clear=original_clear):
            _log.append(("clear",))
            return _clear()

        with monkeypatch.context() as m:
            m.setattr(opt, "reduction_stream", reduction)
            m.setattr(opt, "average_tensor", average_tensor)
            m.setattr(opt, "_clear_previous_reduced_grads", clear)
            m.setattr(accelerator, "resolves_data_dependency", lambda: False)
            m.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)  # CPU tensors: nothing to record
            m.setattr(accelerator, "current_stream", lambda device_index=None: compute)
            synchronize = lambda device_index=None, _log=log: _log.append(("synchronize",))  # noqa: E731
            m.setattr(accelerator, "synchronize", synchronize)
            if name == "theirs":
                m.setattr(DeepSpeedZeroOptimizer, "independent_gradient_partition_epilogue",
                          deepspeed_skip.ORIGINALS["independent_gradient_partition_epilogue"])
            _backward(eng, workload, seed=0)
            assert accelerator.synchronize is synchronize  # the one ours replaced for the epilogue is back
        opt.reduction_stream = None  # the CPU accelerator's
        eng.step()

    assert ("synchronize",) in logs["theirs"]
    ours_log = logs["ours"]
    assert ("synchronize",) not in ours_log
    last_reduce = max(i for i, e in enumerate(ours_log) if e == ("reduced",))
    after = ours_log[last_reduce + 1:]
    assert ("wait", "compute", "reduction") in after and ("clear",) in after
    assert after.index(("wait", "compute", "reduction")) < after.index(("clear",))
    _assert_equal(_state(ours), _state(theirs))


def _host_waits(run) -> list[str]:
    """Where `run()` makes the host wait for the GPU: each synchronising CUDA operation torch's sync
    debug mode reports, and each call of torch's or DeepSpeed's synchronize, with the Python lines
    that led there."""
    import torch
    from deepspeed.accelerator import get_accelerator

    sites = []

    def record(what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2]
                  if "_pytest" not in f.filename and "pluggy" not in f.filename]
        sites.append(what + " at " + " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-6:])))

    def synchronize(*args, _original=torch.cuda.synchronize, **kwargs):
        record("synchronize()")
        _original(*args, **kwargs)

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as m:
        warnings.simplefilter("always")
        m.setattr(warnings, "showwarning",
                  lambda message, *args, **kwargs: record(str(message).splitlines()[0])
                  if "synchroniz" in str(message) and "prototype" not in str(message) else None)
        m.setattr(get_accelerator(), "synchronize", synchronize)
        m.setattr(torch.cuda, "synchronize", synchronize)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sites


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (streams of its own)")
def test_on_a_gpu_backward_and_step_never_wait_on_the_host(workload):
    """On a GPU, with DeepSpeed's reduction stream real: an engine's forward, backward and step make
    the host wait for the GPU nowhere after the first step (torch's sync debug mode and the synchronize
    functions watched, on clean steps and a NaN step), and the weights, Adam state and norms end equal
    bit for bit to an engine running DeepSpeed's own epilogue and step."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from blues_torch import deepspeed_skip
    ours, _, _, _ = build_engine(workload, seed=0)
    theirs, _, _, _ = build_engine(workload, seed=0)
    assert ours.optimizer.overlap_comm and ours.optimizer.reduction_stream is not None

    for seed, factor in enumerate((1.0, 1.0, math.nan, 1.0)):
        batch = _batch(ours, workload, seed)  # its copy to the GPU waits; what follows must not
        waits = _host_waits(lambda: _backward(ours, workload, seed=seed, loss_factor=factor, batch=batch)
                            or ours.step())
        print(f"step {seed}: {len(waits)} host waits", *waits, sep="\n  ")  # pytest -s shows them
        assert seed == 0 or not waits, "\n".join(waits)  # the first step's lazy initialisations may wait
        with pytest.MonkeyPatch.context() as m:
            for name in ("step", "independent_gradient_partition_epilogue"):
                m.setattr(DeepSpeedZeroOptimizer, name, deepspeed_skip.ORIGINALS[name])
            _backward(theirs, workload, seed=seed, loss_factor=factor)
            theirs.step()
        assert float(ours.get_global_grad_norm()) == float(theirs.get_global_grad_norm())
        _assert_equal(_state(ours), _state(theirs))

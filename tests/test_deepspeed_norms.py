"""blues_torch/deepspeed_norms.py against DeepSpeed's own methods, on a real ZeRO-2 engine.

The engine is the bench's (`bench.deepspeed_step.build_engine`: ds_config.json's bf16 ZeRO-2 with
check_grad_overflow, a process group of one, built in this process) on the toy `tiny` model, so
it runs on this machine's accelerator: the CPU here, a GPU where there is one. The first engine
built on a machine JIT-compiles DeepSpeed's small shared-memory comm op (about a minute, cached
under ~/.cache/torch_extensions); later ones take milliseconds, so each test gets a fresh one.

The replacements are compared with the originals install() saved, called on the same optimizer and
gradients; then full `engine.step()`s show DeepSpeed runs them (and only them).
"""
from __future__ import annotations

import math

import pytest

from bench.deepspeed_step import build_engine, deepspeed_available
from bench.train_step import random_batch, train_workload

_NO_DEEPSPEED = deepspeed_available()
pytestmark = pytest.mark.skipif(_NO_DEEPSPEED is not None, reason=str(_NO_DEEPSPEED))

NORM, OVERFLOW = "get_grad_norm_direct", "has_overflow_partitioned_grads_serial"


@pytest.fixture
def engine(deepspeed_one_rank):
    """A fresh engine -> (engine, workload, device). Afterwards DeepSpeedZeroOptimizer and the
    environment are as they were (conftest.py's deepspeed_one_rank: build_engine calls
    deepspeed_norms.install())."""
    from blues_torch.deepspeed_shm import shm_segment

    wl = train_workload("tiny", quick=True)
    eng, device, _, _ = build_engine(wl)
    assert not shm_segment(0).exists()  # build_engine released DeepSpeed's CPU all-reduce segment
    return eng, wl, device


def _backward(eng, wl, device, *, seed=0, loss_factor=1.0):
    """One forward and backward on a random batch; the loss times loss_factor (NaN poisons every gradient)."""
    import torch
    ids, tgt = (torch.from_numpy(a).long().to(device) for a in random_batch(wl.config, wl.batch, wl.seq, seed))
    out = eng(ids, tgt, generator=torch.Generator(device=device).manual_seed(seed + 1))
    eng.backward(out.loss * loss_factor)


def _groups(opt):
    """(gradients, params) of each param group, as scaled_global_norm passes them."""
    return [(opt.averaged_gradients[i], opt.params_in_partition[i]) for i in range(len(opt.bit16_groups))]


def _assert_same_norm(got, want, device):
    """Both sum the same float64 per-gradient norms into a float32 total. On the CPU the per-tensor
    kernels are the same, so the totals are equal; CUDA's multi-tensor kernel sums each gradient in
    another order (float64 rounding), which can move the float32 total by one unit in the last place."""
    import torch
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == () and got.device == want.device
    torch.testing.assert_close(got, want, rtol=0 if device.type == "cpu" else 2 ** -23, atol=0)


def test_install_replaces_both_methods_once_keeping_the_originals(engine):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from blues_torch import deepspeed_norms
    originals = dict(deepspeed_norms.ORIGINALS)
    assert set(originals) == {NORM, OVERFLOW}
    for name in (NORM, OVERFLOW):
        assert getattr(DeepSpeedZeroOptimizer, name) is getattr(deepspeed_norms, name) is not originals[name]
        assert originals[name].__module__ == "deepspeed.runtime.zero.stage_1_and_2"
    assert deepspeed_norms.install()  # build_engine installed them already: a second call changes nothing
    assert deepspeed_norms.ORIGINALS == originals
    assert all(getattr(DeepSpeedZeroOptimizer, name) is getattr(deepspeed_norms, name) for name in (NORM, OVERFLOW))


def test_install_refuses_a_deepspeed_it_was_not_checked_against(monkeypatch):
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from blues_torch import deepspeed_norms
    before = {name: getattr(DeepSpeedZeroOptimizer, name) for name in (NORM, OVERFLOW)}
    for name, method in before.items():  # restored afterwards, should install() touch them after all
        monkeypatch.setattr(DeepSpeedZeroOptimizer, name, method)
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    assert deepspeed_norms.install() is False
    assert {name: getattr(DeepSpeedZeroOptimizer, name) for name in (NORM, OVERFLOW)} == before


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_replacements_agree_with_deepspeed_on_clean_and_non_finite_gradients(engine, bad):
    import torch

    from blues_torch import deepspeed_norms
    eng, wl, device = engine
    opt = eng.optimizer
    norm, overflow = deepspeed_norms.ORIGINALS[NORM], deepspeed_norms.ORIGINALS[OVERFLOW]
    _backward(eng, wl, device)
    groups = _groups(opt)
    assert len(groups) == 2 and all(len(grads) > 1 for grads, _ in groups)  # decay and no-decay groups

    clean = []
    for grads, params in groups:
        got = opt.get_grad_norm_direct(grads, params)
        _assert_same_norm(got, norm(opt, grads, params), device)
        assert math.isfinite(got.item()) and got.item() > 0
        clean.append(got)
    got, want = opt.has_overflow_partitioned_grads_serial(), overflow(opt)
    assert got.dtype == want.dtype == torch.bool and got.shape == want.shape == (1,) and got.device == want.device
    assert not got.item() and not want.item()
    assert opt.has_overflow() is False  # DeepSpeed's all-reduce and .item() over the replacement's tensor

    # One bad element in the last gradient of one group at a time: any gradient of any group counts.
    for poisoned, (grads, params) in enumerate(groups):
        element = [g for g in grads if not getattr(g, "_zero_padding", False)][-1].view(-1)[-1:]
        kept = element.clone()
        element.fill_(bad)
        for i, (grads_i, params_i) in enumerate(groups):
            got = opt.get_grad_norm_direct(grads_i, params_i)
            _assert_same_norm(got, norm(opt, grads_i, params_i), device)
            # DeepSpeed masks a non-finite norm to -1; the other group's norm is untouched.
            assert got.item() == (-1.0 if i == poisoned else clean[i].item())
        assert opt.has_overflow_partitioned_grads_serial().item() and overflow(opt).item()
        assert opt.has_overflow() is True
        element.copy_(kept)
    assert not opt.has_overflow_partitioned_grads_serial().item()


def test_engine_step_runs_the_replacements(engine, monkeypatch):
    """DeepSpeed's step reaches the multi-tensor paths, never the per-tensor loops: the saved
    originals (the replacements' fallback) and the per-tensor overflow test are made to fail. A clean
    step applies with the global norm the originals compute; a NaN loss skips the step. The step is
    DeepSpeed's own, which reports the skip on the host (deepspeed_skip.py's: test_deepspeed_skip.py)."""
    import torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from blues_torch import deepspeed_norms, deepspeed_skip
    eng, wl, device = engine
    opt = eng.optimizer
    real = dict(deepspeed_norms.ORIGINALS)
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "step", deepspeed_skip.ORIGINALS["step"])

    def per_tensor_path(*args, **kwargs):
        raise AssertionError("DeepSpeed's per-tensor path ran")

    for name in (NORM, OVERFLOW):
        monkeypatch.setitem(deepspeed_norms.ORIGINALS, name, per_tensor_path)
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "_has_inf_or_nan", staticmethod(per_tensor_path))

    def weights():
        return [p.detach().clone() for p in opt.single_partition_of_fp32_groups]

    # A clean step: applied, clipped by the norm DeepSpeed's own methods give for these gradients.
    _backward(eng, wl, device, seed=0)
    with monkeypatch.context() as original_methods:
        for name in (NORM, OVERFLOW):
            original_methods.setattr(DeepSpeedZeroOptimizer, name, real[name])
        want = opt.scaled_global_norm() / opt.loss_scale
    before = weights()
    eng.step()
    assert eng.was_step_applied()
    assert not any(torch.equal(a, b) for a, b in zip(before, weights()))
    got = eng.get_global_grad_norm()
    _assert_same_norm(torch.as_tensor(got), want, device)

    # A NaN loss: every gradient is NaN, the overflow check catches it and the step is skipped.
    _backward(eng, wl, device, seed=1, loss_factor=math.nan)
    before = weights()
    eng.step()
    assert not eng.was_step_applied()
    assert all(torch.equal(a, b) for a, b in zip(before, weights()))
    assert eng.get_global_grad_norm() == math.inf

    # And training goes on: the next clean step applies.
    _backward(eng, wl, device, seed=2)
    eng.step()
    assert eng.was_step_applied() and math.isfinite(float(eng.get_global_grad_norm()))

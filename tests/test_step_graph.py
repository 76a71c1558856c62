"""blues_torch/step_graph.py: the training step replayed from one CUDA graph (`train_torch.py --cuda_graph`).

On a CPU: what the graph relies on in TrainStep. Flags given as a device tensor and the lr given as a
tensor (what the graph fills before each replay) train exactly as numbers do, bit for bit; steps a
graph cannot hold (float32 experts, capacity mode) are refused.
On a GPU: the graphed bf16 step, compiled and eager, against the ordinary one, two models from the
same weights and generator seed: every step's losses, norm and applied flag and the final weights
equal bit for bit, with the lr changing every step (a graph that held the first lr would drift),
flags changing, and a NaN step (run outside the graph) skipped by both.
"""
from __future__ import annotations

import math

import pytest
import torch

from bench.train_step import GRAD_CLIP, random_batch, train_workload
from blues_torch import BluesModel
from blues_torch.distributed import Dist
from blues_torch.training import TrainStep, make_optimizer

# A different lr every step, each exact in float32: the graph's lr tensor is float32 (the fused AdamW's
# type for it), an ordinary step's lr a Python float (double), and the two must give the same update.
LRS = [2.0 ** -10 * (1 + i / 8) for i in range(8)]


def _step(device, config, *, compile=False, precision="fp32") -> TrainStep:
    torch.manual_seed(0)
    with torch.device(device):
        model = BluesModel(config)
    model.train()
    optimizer = make_optimizer(model, lr=LRS[0], weight_decay=0.1, device=device)
    dist = Dist(False)
    dist.device = torch.device(device)  # a CPU step on a GPU machine too (Dist picks CUDA where there is one)
    return TrainStep(model, optimizer, dist=dist, grad_clip=GRAD_CLIP, precision=precision,
                     gen=torch.Generator(device=device).manual_seed(1), compile=compile)


def _batches(wl, device, n):
    return [tuple(torch.from_numpy(a).long().to(device) for a in random_batch(wl.config, wl.batch, wl.seq, seed))
            for seed in range(n)]


def test_tensor_flags_and_lr_train_as_numbers_do():
    wl = train_workload("tiny", quick=True)
    numbers, tensors = _step("cpu", wl.config), _step("cpu", wl.config)
    lr_tensor = torch.zeros(())
    for i, batch in enumerate(_batches(wl, "cpu", 4)):
        flags = (i % 2 == 0, i == 3)
        a = numbers([batch], LRS[i], flags=flags).read()
        lr_tensor.fill_(LRS[i])
        b = tensors([batch], lr_tensor, flags=torch.tensor([float(f) for f in flags])).read()
        assert a == b and a[0][4:6] == [float(f) for f in flags]  # the flags come back averaged (one process)
    for p, q in zip(numbers.model.parameters(), tensors.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_the_graphed_step_trains_as_the_ordinary_step(compile):
    from blues_torch.step_graph import GraphedTrainStep

    wl = train_workload("tiny", quick=True)
    ordinary, graphed = (_step("cuda", wl.config, compile=compile, precision="bf16") for _ in range(2))
    graph = GraphedTrainStep(graphed, warmup=2)
    batches = _batches(wl, "cuda", len(LRS))
    nan_step = 5  # after the capture (step 3): an ordinary step between replays
    for i, batch in enumerate(batches):
        flags = (i % 2 == 0, False)
        a = ordinary([batch], LRS[i], inject_nan=i == nan_step, flags=flags).read()
        b = graph([batch], LRS[i], inject_nan=i == nan_step, flags=flags).read()
        assert a[1] is b[1] and a[1] is (i != nan_step), i
        assert a[0] == b[0] or (i == nan_step and math.isnan(b[0][0])), (i, a, b)
    assert graph.graph is not None  # the later steps were replays
    for p, q in zip(ordinary.model.parameters(), graphed.model.parameters()):
        assert torch.equal(p, q)


def test_steps_a_graph_cannot_hold_are_refused_before_training(monkeypatch):
    """float32 experts and capacity mode read the device on the host: refused with one line each."""
    import dataclasses

    from blues.errors import UsageError
    from blues_torch import step_graph

    wl = train_workload("tiny", quick=True)
    step = _step("cpu", wl.config)
    monkeypatch.setattr(step.dist, "device", torch.device("cuda"))  # past the device check, on a CPU
    with pytest.raises(UsageError, match="--precision bf16"):
        step_graph.GraphedTrainStep(step)
    step.precision = "bf16"
    step.model.config = dataclasses.replace(wl.config, capacity_factor=1.25)
    with pytest.raises(UsageError, match="dropless"):
        step_graph.GraphedTrainStep(step)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_the_bench_row_says_why_it_did_not_run_on_a_cpu():
    from bench.train_step import torch_train
    row = torch_train(train_workload("tiny", quick=True), steps=1, warmup=1, compile=True, cuda_graph=True)
    assert row.variant == "compile cuda graph" and "CUDA" in row.skipped and row.tokens_per_s is None

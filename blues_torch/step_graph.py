"""The whole training step replayed from one CUDA graph (`train_torch.py --cuda_graph`).

Why: at small sizes the compiled step is host-bound. At `tiny` on an H200 the compiled TrainStep took
22.4 ms a step for 15.9 ms of GPU kernels (667 launches a step); the same step captured once and
replayed ran 985.8k tokens/s against 684.2k (scripts/step_graph_probe.py, docs/performance.md, Log
2026-12-05). A replay launches every kernel of forward, backward, clipping and the fused AdamW with
one call, and nothing in the step reads the device, so it can be captured whole.

How: `GraphedTrainStep` wraps a TrainStep (plain PyTorch, one process, CUDA). Its first `warmup`
calls are ordinary steps run on a side stream (torch.compile and every lazy initialisation happen
there, as CUDA graph capture asks); the next call captures the step over static inputs and every
call from then on copies its batch, lr and flags into those inputs and replays:
- lr: every param group's lr is one float32 device tensor (the fused AdamW takes a tensor lr), filled
  per step: the schedule's lr rounded to float32 (relative error at most 6e-8), where an ordinary step
  hands the kernel a double;
- flags: a device tensor filled per step (TrainStep adds tensor flags to its sums as it adds numbers);
- the batch: copied into the captured micro-batch tensors (same shapes every step);
- randomness: the TrainStep's generator is registered with the graph, so each replay draws new
  router noise and dropout;
- outputs: the step's values are copied out of the graph's buffers before the next replay
  overwrites them, so the loop may queue a step ahead as without the graph.
A step with `inject_nan` (the tests' hook) runs ordinarily, outside the graph; a capture that fails
leaves a warning and ordinary steps.

The graph keeps the step's activations in its own memory pool between steps: more resident memory
than the ordinary step, whose activations are freed after each backward. Use it where the step is
host-bound (small models, short sequences); at `bench` the step is GPU-bound.
"""
from __future__ import annotations

import logging

import torch

from blues.errors import UsageError
from blues_torch.training import StepValues, TrainStep


logger = logging.getLogger("blues")


class GraphedTrainStep:
    """A TrainStep replayed from one CUDA graph after `warmup` ordinary steps (the module docstring);
    called like TrainStep."""

    engine = None  # plain PyTorch only
    waits_on_host = False

    def __init__(self, step: TrainStep, warmup: int = 3):
        if step.dist.device.type != "cuda":
            raise UsageError(f"--cuda_graph needs a CUDA GPU; this process trains on {step.dist.device.type}")
        if step.engine is not None:
            raise UsageError("--cuda_graph is for plain PyTorch: DeepSpeed's step cannot be captured "
                             "(drop --deepspeed)")
        if step.dist.world_size > 1:
            raise UsageError(f"--cuda_graph runs in one process; this run has {step.dist.world_size}")
        # Only the bf16 dropless experts (one grouped GEMM over device-side counts) run without reading the
        # device: float32 experts split their rows by counts read on the host, and capacity mode selects
        # its kept rows with a boolean mask whose count the host reads; a capture cannot hold either.
        if step.precision != "bf16":
            raise UsageError(f"--cuda_graph needs --precision bf16 (this run: {step.precision}): the float32 "
                             "experts read their token counts on the host, which a CUDA graph cannot hold")
        if step.model.config.capacity_factor is not None:
            raise UsageError("--cuda_graph needs dropless experts: capacity_factor selects the kept tokens on "
                             "the host, which a CUDA graph cannot hold")
        self.step, self.warmup = step, warmup
        self.calls = 0
        self.failed = False  # the capture failed: ordinary steps from then on
        self.side = torch.cuda.Stream()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # the captured inputs
        self.lr = torch.zeros((), dtype=torch.float32, device=step.dist.device)
        self.flags: torch.Tensor | None = None
        self.out: torch.Tensor | None = None  # [values..., applied]

    def __call__(self, batches, lr: float, inject_nan: bool = False, flags=()) -> StepValues:
        self.calls += 1
        if inject_nan or self.failed or (self.graph is None and self.calls <= self.warmup):
            return self._on_side_stream(lambda: self.step(batches, lr, inject_nan, flags))
        if self.graph is None:
            try:
                self._capture(batches, flags)
            except Exception as e:  # e.g. an operation that cannot be captured: train on, ordinarily
                logger.warning("the training step could not be captured in a CUDA graph (%s); running it "
                               "ordinarily", str(e).splitlines()[0] if str(e) else type(e).__name__)
                torch.cuda.synchronize()
                self.failed, self.graph = True, None
                return self._on_side_stream(lambda: self.step(batches, lr, inject_nan, flags))
        for (x, y), (sx, sy) in zip(batches, self.batches):
            sx.copy_(x, non_blocking=True)
            sy.copy_(y, non_blocking=True)
        self.lr.fill_(lr)
        for i, flag in enumerate(flags):
            self.flags[i].fill_(float(flag))
        self.graph.replay()
        out = self.out.clone()  # the next replay overwrites self.out
        return StepValues(out[:-1], out[-1] > 0)

    def _on_side_stream(self, fn):
        current = torch.cuda.current_stream()
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            result = fn()
        current.wait_stream(self.side)
        return result

    def _capture(self, batches, flags) -> None:
        step = self.step
        self.batches = [(x.clone(), y.clone()) for x, y in batches]
        self.flags = torch.zeros(len(flags), dtype=torch.float32, device=self.lr.device)
        for group in step.optimizer.param_groups:
            group["capturable"] = True  # step counts and found_inf stay on the device
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(step.gen)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            values = step(self.batches, self.lr, flags=self.flags)
            self.out = torch.cat([values._values, values._applied.float().reshape(1)])
        self.graph = graph

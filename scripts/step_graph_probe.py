"""What one CUDA graph of the whole PyTorch training step would be worth where the compiled step is
host-bound (`tiny`: 22.4 ms a step against 15.9 ms of GPU kernels on an H200, 667 kernels a step;
docs/performance.md, Log 2026-12-05), before the trainer is changed to capture it.

    python scripts/step_graph_probe.py [--presets tiny] [--steps 40]

Two ways, same process, same model and batch, taking turns (2 rounds each):
- `queued`: the trainer's compiled TrainStep (blues_torch/training.py) launched one step ahead of the
  one it reads, as blues/loop.py runs it;
- `graph`: that same TrainStep captured once in a `torch.cuda.CUDAGraph` (forward, backward, clipping,
  the fused AdamW with `capturable`, the zeroing of gradients) and replayed, one replay ahead of the
  losses read (each replay's values copied out before the next overwrites them).
The lr is fixed (the graph holds it; the trainer would hand AdamW a tensor), and the router noise comes
from the generator registered with the graph (or the default one where torch cannot register it).
tokens/s = tokens of the timed steps / wall time from the first launch to the last read. Every loss
read must be finite (asserted); whether the loss fell from the first read to the last is printed.
Needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train_step import GRAD_CLIP, LR, WEIGHT_DECAY, random_batch, train_workload  # noqa: E402
from blues_torch import BluesModel  # noqa: E402
from blues_torch.distributed import Dist  # noqa: E402
from blues_torch.training import TrainStep, make_optimizer  # noqa: E402

ROUNDS = 2


def capture(step: TrainStep, batch) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """-> (graph of one whole step, its [6] output: 4 losses, the gradient norm, whether applied)."""
    for group in step.optimizer.param_groups:
        group["capturable"] = True  # the fused AdamW's step count and found_inf stay on the device
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch's capture docs ask
        for _ in range(3):
            step([batch], LR).read()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if hasattr(graph, "register_generator_state"):
        graph.register_generator_state(step.gen)
    else:
        step.gen = None  # the default CUDA generator, which every capture registers
    with torch.cuda.graph(graph):
        values = step([batch], LR)
        out = torch.cat([values._values, values._applied.float().reshape(1)])  # [6]
    return graph, out


def probe(preset: str, steps: int) -> None:
    wl = train_workload(preset, quick=False)
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = BluesModel(wl.config)
    model.train()
    batch = tuple(torch.from_numpy(a).long().to(device) for a in random_batch(wl.config, wl.batch, wl.seq))
    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=device)
    step = TrainStep(model, optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16",
                     gen=torch.Generator(device=device).manual_seed(1), compile=True)
    for _ in range(3):  # compile
        step([batch], LR).read()
    began = time.perf_counter()
    graph, out = capture(step, batch)
    torch.cuda.synchronize()
    print(f"{preset}: captured in {time.perf_counter() - began:.1f} s (3 warm-up steps included), "
          f"peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB", flush=True)

    def launch_queued():
        return step([batch], LR)

    def launch_graph():
        graph.replay()
        return out.clone()  # queued copy: the next replay overwrites out

    ways = {"queued": (launch_queued, lambda v: v.read()[0]), "graph": (launch_graph, lambda t: t.tolist())}
    seconds = {way: [] for way in ways}
    losses = {way: [] for way in ways}
    for _ in range(ROUNDS):
        for way, (launch, read) in ways.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            pending = None
            for _ in range(steps):
                nxt = launch()
                if pending is not None:
                    losses[way].append(read(pending)[0])
                pending = nxt
            losses[way].append(read(pending)[0])
            seconds[way].append((time.perf_counter() - t0) / steps)
    every = [x for way in ways for x in losses[way]]
    assert all(math.isfinite(x) for x in every), "a non-finite loss"
    first, last = losses["queued"][0], losses["graph"][-1]
    print(f"{preset}: loss {first:.3f} -> {last:.3f} over {len(every)} timed steps"
          f"{'' if last < first else ' (DID NOT FALL)'}")
    for way in ways:
        per_step = statistics.median(seconds[way])
        print(f"{preset:<6} {way:<7} {wl.tokens / per_step:>12,.0f} tokens/s  {per_step * 1e3:6.2f} ms a step  "
              f"(rounds: {', '.join(f'{s * 1e3:.2f}' for s in seconds[way])} ms)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: step_graph_probe.py needs a CUDA GPU")
    for preset in args.presets:
        probe(preset, args.steps)


if __name__ == "__main__":
    main()

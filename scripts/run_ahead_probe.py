"""What queueing one training step ahead (blues/loop.py) is worth: the trainers' own steps, each
framework timed two ways in the same process, alternating, from the same state:

- `read each`: launch a step, read its losses (the device synchronises), launch the next: the loop
  of one step at a time;
- `queued`: launch step n + 1, then read step n: the loop as it runs now in one process.

    python scripts/run_ahead_probe.py [--frameworks torch,jax] [--presets tiny,bench] [--steps 30] [--quick]

tokens/s = tokens of the timed steps / wall time from the first launch to the last read. PyTorch is the
compiled TrainStep (fused AdamW, the non-finite skip inside it), JAX the jitted step of
blues_jax/training.py; the ways take turns training one model on one batch, and every loss read must
be finite (checked). Prints one table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.train_step import (GRAD_CLIP, LR, WEIGHT_DECAY, jax_step_inputs, make_jax_train_step,  # noqa: E402
                              random_batch, torch_device, train_workload)

ROUNDS = 2  # each way timed this many times, alternating


def time_ways(launch, read, sync, steps: int) -> tuple[dict, dict]:
    """({way: [seconds per step, one per round]}, {way: [the losses it read]})."""
    out = {"read each": [], "queued": []}
    losses = {"read each": [], "queued": []}
    for _ in range(ROUNDS):
        for way in out:
            sync()
            t0 = time.perf_counter()
            pending = None
            for _ in range(steps):
                if way == "read each":
                    losses[way].append(read(launch()))
                else:
                    nxt = launch()
                    if pending is not None:
                        losses[way].append(read(pending))
                    pending = nxt
            if pending is not None:
                losses[way].append(read(pending))
            out[way].append((time.perf_counter() - t0) / steps)
    return out, losses


def torch_ways(wl, steps: int, warmup: int):
    import torch

    from blues_torch import BluesModel
    from blues_torch.distributed import Dist
    from blues_torch.training import TrainStep, make_optimizer

    device = torch_device()
    torch.manual_seed(0)
    with torch.device(device):
        model = BluesModel(wl.config)
    model.train()
    ids, tgt = (torch.from_numpy(a).long().to(device) for a in random_batch(wl.config, wl.batch, wl.seq))
    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=device)
    step = TrainStep(model, optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16",
                     gen=torch.Generator(device=device).manual_seed(1), compile=device.type == "cuda")
    for _ in range(warmup):
        step([(ids, tgt)], LR).read()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return time_ways(lambda: step([(ids, tgt)], LR), lambda p: p.read()[0][0], sync, steps)


def jax_ways(wl, steps: int, warmup: int):
    import jax

    state, step_fn, sharding = make_jax_train_step(wl.config)
    inputs = jax_step_inputs(wl.config, wl.batch, wl.seq, sharding)
    compiled = step_fn.lower(*state, *inputs).compile()
    box = {"state": state}
    del state

    def launch():
        *box["state"], out = compiled(*box["state"], *inputs)
        return out

    for _ in range(warmup):
        float(launch()["losses"][0])
    return time_ways(launch, lambda out: float(out["losses"][0]),
                     lambda: jax.block_until_ready(box["state"]), steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frameworks", default="torch,jax")
    p.add_argument("--presets", default="tiny,bench")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the bench's toy sizes (a CPU smoke test)")
    a = p.parse_args()
    rows = []
    for preset in a.presets.split(","):
        wl = train_workload(preset, a.quick)
        for fw in a.frameworks.split(","):
            times, losses = (torch_ways if fw == "torch" else jax_ways)(wl, a.steps, a.warmup)
            per = {way: float(np.median(t)) for way, t in times.items()}
            ok = all(np.isfinite(v).all() and len(v) == ROUNDS * a.steps for v in losses.values())
            rows.append((preset, fw, wl.tokens / per["read each"], wl.tokens / per["queued"], ok))
            print(f"{preset} {fw}: read each {per['read each'] * 1e3:.2f} ms/step, queued {per['queued'] * 1e3:.2f}",
                  flush=True)
    print("\n| preset | framework | read each step, tokens/s | queued one ahead | gain | losses finite |")
    print("|---|---|---:|---:|---:|---|")
    for preset, fw, each, queued, ok in rows:
        print(f"| {preset} | {fw} | {each:,.0f} | {queued:,.0f} | {queued / each - 1:+.1%} | {ok} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

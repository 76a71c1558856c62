"""The experts' grouped GEMMs with float32 weights under autocast (plain PyTorch's training) against
bf16 weights (DeepSpeed's bf16 module), eager and compiled: time of a forward + backward and the
cutlass kernels each runs, by tile signature, and aten::_grouped_mm by input shape.

    python scripts/grouped_mm_probe.py [--tokens 16384] [--iters 10]

Round 7 read DeepSpeed's compiled step as spending 44 ms in grouped GEMMs against plain PyTorch's 31.
This probe (H200, round 8) showed the kernels identical for every weight form and plain PyTorch's
compiled step running 60 grouped GEMMs a step instead of 72: the experts' input gradient was missing,
the first sign that torch 2.11's compiled graph had lost the layers' gradients (blues_torch/model.py,
_RMSNormFunction). `--whole-steps` prints both training steps' grouped GEMMs by shape. Needs a Hopper GPU.
"""
from __future__ import annotations

import argparse
import collections
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from blues.config import BluesConfig  # noqa: E402
from blues_torch.experts import expert_mlp  # noqa: E402


def signature(kernel: str) -> str:
    """A cutlass kernel's distinguishing parts: its first integer template arguments (tile and cluster
    shapes), the schedule, and the operand layouts."""
    ints = re.findall(r"Li(\d+)E", kernel)[:9]
    schedule = next((s for s in ("Cooperative", "Pingpong") if s in kernel), "?")
    layouts = "".join("R" if m == "RowMajor" else "C" for m in re.findall(r"(RowMajor|ColumnMajor)", kernel))[:4]
    return f"{'x'.join(ints)} {schedule} {layouts}"


def make_inputs(cfg: BluesConfig, tokens: int, mode: str, device):
    """mode: "fp32+autocast" (plain PyTorch), "bf16" (DeepSpeed's module), "bf16 flat view" (the same
    weights as views into one flat buffer at an odd multiple of 8 elements, as ZeRO lays them out)."""
    g = torch.Generator(device=device).manual_seed(0)
    d, f, e, k = cfg.hidden_size, cfg.hidden_size * cfg.embedding_multiplier_scale, cfg.tot_num_experts, cfg.chosen_num_experts
    w_dtype = torch.float32 if mode == "fp32+autocast" else torch.bfloat16
    w_in = torch.randn(e, d, 2 * f, generator=g, device=device) * d ** -0.5  # [E, d, 2F]
    w_out = torch.randn(e, f, d, generator=g, device=device) * f ** -0.5  # [E, F, d]
    if mode == "bf16 flat view":
        flat = torch.empty(8 * 1001 + w_in.numel() + w_out.numel(), device=device, dtype=w_dtype)
        a = 8 * 1001
        w_in = flat[a:a + w_in.numel()].view_as(w_in).copy_(w_in)
        w_out = flat[a + w_in.numel():].view_as(w_out).copy_(w_out)
    w_in = w_in.to(w_dtype).requires_grad_()
    w_out = w_out.to(w_dtype).requires_grad_()
    x = torch.randn(tokens, d, generator=g, device=device, dtype=w_dtype).requires_grad_()  # [N, d]
    probs = torch.rand(tokens, e, generator=g, device=device).softmax(-1)  # [N, E]
    weights, indices = probs.topk(k, dim=-1)  # [N, k]
    return x, indices, weights, w_in, w_out


def run(mode: str, compiled: bool, cfg, tokens: int, iters: int, device):
    x, indices, weights, w_in, w_out = make_inputs(cfg, tokens, mode, device)
    fn = torch.compile(expert_mlp) if compiled else expert_mlp
    grad = torch.randn(tokens, cfg.hidden_size, device=device, dtype=x.dtype)  # [N, d]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "fp32+autocast"):
            y = fn(x, indices, weights, None, w_in, w_out)  # [N, d]
        y.backward(grad)

    for _ in range(3):
        step()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    print(f"\n{mode:<16} {'compiled' if compiled else 'eager':<8} forward+backward {statistics.median(times):7.2f} ms "
          f"(median of {iters})")
    report(step, iters)


def report(step, iters: int) -> None:
    """Profile `iters` calls of step: cutlass kernels by signature, aten::_grouped_mm by input shape."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0 and "cutlass" in ev.key:
            kernels[signature(ev.key)] += ev.self_device_time_total / 1e3 / iters
            calls[signature(ev.key)] += ev.count / iters
    print(f"    cutlass kernels {sum(kernels.values()):6.2f} ms")
    for sig, ms in kernels.most_common():
        print(f"    {ms:6.2f} ms  x{calls[sig]:4.1f}  {sig}")
    for ev in prof.key_averages(group_by_input_shape=True):
        if ev.key == "aten::_grouped_mm":
            print(f"    aten::_grouped_mm x{ev.count / iters:4.1f} {ev.device_time_total / 1e3 / iters:6.2f} ms  {ev.input_shapes}")


def whole_steps(preset: str, iters: int) -> None:
    """The same tables for whole training steps: plain PyTorch compiled (float32 weights, autocast) and
    the DeepSpeed engine with its module compiled (bf16 module), as scripts/profile_gpu.py runs them."""
    from bench import deepspeed_step
    from bench.train_step import random_batch, train_workload
    from scripts.profile_gpu import _plain_step

    wl = train_workload(preset, quick=False)
    device = torch.device("cuda")
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, 0)
    ids = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    tgt = torch.from_numpy(tgt_np).long().to(device)  # [B, T]
    forward, backward, update = _plain_step(wl, ids, tgt, compile=True)
    engine = deepspeed_step.build_engine(wl, compile=True)[0]
    paths = {"PyTorch, torch.compile": lambda: (backward(forward()), update()),
             "DeepSpeed ZeRO-2, compiled": lambda: (engine.backward(engine(ids, tgt).loss), engine.step())}
    for name, step in paths.items():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        print(f"\n{name}, whole training steps ({preset})")
        report(step, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--whole-steps", type=int, default=0, help="also profile this many whole training steps of each path")
    args = p.parse_args()
    cfg = BluesConfig.preset(args.preset)
    device = torch.device("cuda")
    for compiled in (False, True):
        for mode in ("fp32+autocast", "bf16", "bf16 flat view"):
            run(mode, compiled, cfg, args.tokens, args.iters, device)
    if args.whole_steps:
        whole_steps(args.preset, args.whole_steps)


if __name__ == "__main__":
    main()

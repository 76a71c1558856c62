"""Where the time and the memory go, on a GPU: the two questions the benchmark's table cannot answer.

    python scripts/profile_gpu.py memory   # bench preset, one eager training step: saved activations by layer part
    python scripts/profile_gpu.py decode   # tiny preset, greedy decode step: CUDA kernels per token, eager vs compiled
    python scripts/profile_gpu.py jax-train [--preset bench]   # JAX training step: GPU time by kernel kind
    python scripts/profile_gpu.py torch-train [--preset bench]   # the same for the torch.compile'd step

`memory`: the training step of bench/train_step.py (bf16 autocast, float32 weights, AdamW) at
batch 8 x 2048; every tensor autograd saves for the backward is attributed to the innermost module
running when it was saved (storage counted once) and the totals are printed by module kind, with
the allocator's readings after the forward, the backward and the optimizer step. Variants:
--chunks (the loss chunk sizes to compare) and --checkpointing.

`decode`: `blues_torch.generation`'s decode step at batch 1 and 64, bf16, captured in a CUDA graph,
without and with torch.compile; torch.profiler over --steps replays lists the kernels per token and
the top kernels by GPU time.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20


def saved_tensor_breakdown(model, step_forward) -> tuple[dict[str, int], object]:
    """Bytes autograd saves during step_forward(), by the innermost module kind that saved them."""
    stack: list[str] = []
    hooks = []
    def enter(module, args):
        stack.append(type(module).__name__)

    def leave(module, args, output):
        stack.pop()  # returns None: the output is left alone

    for module in model.modules():
        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    totals: collections.Counter = collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in params:
            seen.add(ptr)
            where = stack[-1] if stack else "loss/outside"
            totals[f"{where} {str(t.dtype).replace('torch.', '')}"] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step_forward()
    finally:
        for h in hooks:
            h.remove()
    return dict(totals), out


def memory(args) -> None:
    from blues.config import BluesConfig
    from blues_torch import BluesModel
    from bench.train_step import BETAS, LR, WEIGHT_DECAY, random_batch, torch_param_groups

    cfg = BluesConfig.preset("bench")
    device = torch.device("cuda")
    ids_np, tgt_np = random_batch(cfg, 8, 2048)
    ids = torch.from_numpy(ids_np).long().to(device)
    tgt = torch.from_numpy(tgt_np).long().to(device)
    for chunk in args.chunks:
        for ckpt in args.checkpointing:
            torch.manual_seed(0)
            with torch.device(device):
                model = BluesModel(cfg, loss_chunk_size=chunk, gradient_checkpointing=ckpt)
            model.train()
            opt = torch.optim.AdamW(torch_param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=True)

            def forward():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(ids, tgt)

            for i in range(3):  # step 0 creates the optimizer state; step 2 is measured
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                if i == 2:
                    totals, out = saved_tensor_breakdown(model, forward)
                else:
                    out = forward()
                torch.cuda.synchronize()
                fwd_peak, after_fwd = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
                out.loss.backward()
                torch.cuda.synchronize()
                bwd_peak = torch.cuda.max_memory_allocated()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                del out
            print(f"\n== bench, batch 8 x 2048, eager, loss chunk {chunk}, gradient_checkpointing {ckpt}")
            print(f"   before step {base / GIB:.2f} GiB; after forward {after_fwd / GIB:.2f} "
                  f"(forward peak {fwd_peak / GIB:.2f}); step peak {max(fwd_peak, bwd_peak, torch.cuda.max_memory_allocated()) / GIB:.2f} GiB")
            print(f"   saved for backward: {sum(totals.values()) / GIB:.2f} GiB")
            for key, n in sorted(totals.items(), key=lambda kv: -kv[1]):
                if n >= 16 * MIB:
                    print(f"     {key:<28} {n / MIB:9.0f} MiB")
            model = opt = None  # free this variant's memory before the next
            torch.cuda.empty_cache()


def decode(args) -> None:
    from torch.profiler import ProfilerActivity, profile
    from blues_torch import BluesModel
    from blues_torch.generation import _decoder, generate
    from bench.decode import _greedy, decode_config, random_prompts

    cfg = decode_config("tiny", False, 32, 256)
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = BluesModel(cfg)
    model.eval().to(torch.bfloat16)
    eot = cfg.vocab_size - 1
    for compile in (False, True):
        for batch in (1, 64):
            prompts = random_prompts(cfg, batch, 32)
            generate(model, prompts, 8, _greedy(), eot_id=eot, stop_at_eot=False, compile=compile)  # capture
            dec = _decoder(model, batch, 8, _greedy(), eot, False, True, compile)
            assert dec.graph is not None, "decode step not captured"
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    dec.graph.replay()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernels = sum(e.count for e in events)
            gpu_us = sum(e.self_device_time_total for e in events)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                dec.graph.replay()
            end.record()
            torch.cuda.synchronize()
            wall_us = start.elapsed_time(end) * 1e3 / args.steps
            print(f"\n== decode tiny b{batch} bf16, {'compiled' if compile else 'eager'} step in a CUDA graph: "
                  f"{kernels / args.steps:.0f} kernels/token, kernel time {gpu_us / args.steps:.0f} us/token, "
                  f"replay {wall_us:.0f} us/token = {batch * 1e6 / wall_us:,.0f} tokens/s")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
                print(f"   {e.self_device_time_total / args.steps:7.1f} us  x{e.count / args.steps:4.1f}  {e.key[:110]}")


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("GEMM (cuBLAS/cuBLASLt/CUTLASS)", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("attention (cuDNN)", ("cudnn", "fmha", "flash", "sdpa")),
    ("grouped GEMM (Mosaic)", ("mosaic", "ragged")),
    ("optimizer / foreach (multi_tensor_apply)", ("multi_tensor_apply",)),
    ("sort / scan", ("sort", "cub::", "scan")),
    ("reductions / elementwise fusions", ("fusion", "reduce", "loop_", "input_", "wrapped_", "transpose", "concatenate",
                                           "triton_")),
    ("copies / memset", ("memcpy", "memset", "copy")),
)


def _kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def jax_train(args) -> None:
    """Trace --steps JAX training steps (bench/train_step.py's step) and sum GPU kernel time."""
    import glob
    import tempfile
    import time
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from blues_jax import BluesModel
    from bench.train_step import jax_optimizer, make_jax_train_step, random_batch, train_workload

    wl = train_workload(args.preset, quick=False)
    model = BluesModel(wl.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    model.train()
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, 0)
    ids, tgt = jnp.asarray(ids_np), jnp.asarray(tgt_np)
    state, step = make_jax_train_step(model, jax_optimizer())
    del model
    for _ in range(3):  # compile and warm up
        state, loss = step(state, ids, tgt)
    jax.block_until_ready(loss)
    trace_dir = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, loss = step(state, ids, tgt)
        jax.block_until_ready(loss)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    kernels: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    ops: dict[str, str] = {}
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                kernels[ev.name] += ev.duration_ns
                counts[ev.name] += 1
                stats = dict(ev.stats)
                ops.setdefault(ev.name, str(stats.get("hlo_op", stats.get("tf_op", "")))[:48])
    _print_kernels(f"\n== JAX training step, {args.preset} (batch {wl.batch} x {wl.seq}): {wall_ms:.1f} ms wall "
                   f"per step (traced, {wl.tokens / wall_ms * 1e3:,.0f} tokens/s)", kernels, counts, ops,
                   args.steps, args.top)


def _print_kernels(title: str, kernels, counts, ops, steps: int, top: int) -> None:
    """kernels/counts: name -> total ns / calls over `steps` steps; ops: name -> the op that launched it."""
    busy_ms = sum(kernels.values()) / 1e6 / steps
    print(f"{title}, GPU kernels {busy_ms:.1f} ms per step")
    kinds: collections.Counter = collections.Counter()
    for name, ns in kernels.items():
        kinds[_kernel_kind(name)] += ns
    for kind, ns in kinds.most_common():
        print(f"  {ns / 1e6 / steps:8.2f} ms  {ns / max(sum(kinds.values()), 1):5.1%}  {kind}")
    print("  top kernels (ms per step, calls per step, op):")
    for name, ns in kernels.most_common(top):
        print(f"  {ns / 1e6 / steps:8.2f} ms  x{counts[name] / steps:5.1f}  {ops.get(name, ''):48s}  {name[:90]}")


def torch_train(args) -> None:
    """Profile --steps compiled PyTorch training steps (bench/train_step.py's step: bf16 autocast,
    float32 weights, fused AdamW) and sum GPU kernel time."""
    import time
    from blues_torch import BluesModel
    from bench.train_step import (BETAS, LR, WEIGHT_DECAY, random_batch, torch_param_groups,
                                  train_workload)

    wl = train_workload(args.preset, quick=False)
    device = torch.device("cuda")
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, 0)
    ids = torch.from_numpy(ids_np).long().to(device)
    tgt = torch.from_numpy(tgt_np).long().to(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = BluesModel(wl.config)
    model.train()
    opt = torch.optim.AdamW(torch_param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=True)
    forward = torch.compile(model)
    params = list(model.parameters())

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(ids, tgt)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # compile and warm up
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    peak = torch.cuda.max_memory_allocated() / GIB
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            kernels[e.key] += int(e.self_device_time_total * 1e3)
            counts[e.key] += e.count
    _print_kernels(f"\n== torch.compile training step, {args.preset} (batch {wl.batch} x {wl.seq}): {wall_ms:.1f} ms "
                   f"wall per step ({wl.tokens / wall_ms * 1e3:,.0f} tokens/s untraced), peak {peak:.2f} GiB",
                   kernels, counts, {}, args.steps, args.top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=("memory", "decode", "jax-train", "torch-train"))
    p.add_argument("--preset", default="bench", help="jax-train: the preset (its bench batch and sequence)")
    p.add_argument("--chunks", type=int, nargs="+", default=[4096, 1024])
    p.add_argument("--checkpointing", type=lambda s: s == "on", nargs="+", default=[False],
                   help="on/off values of the model's gradient_checkpointing to compare")
    p.add_argument("--steps", type=int, default=50, help="decode steps (jax-train: training steps) profiled")
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    for what in args.what:
        {"memory": memory, "decode": decode, "jax-train": jax_train, "torch-train": torch_train}[what](args)


if __name__ == "__main__":
    main()

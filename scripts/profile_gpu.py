"""Where the time and the memory go, on a GPU: the two questions the benchmark's table cannot answer.

    python scripts/profile_gpu.py memory   # bench preset, one eager training step: saved activations by layer part
    python scripts/profile_gpu.py decode   # tiny preset, greedy decode step: CUDA kernels per token, eager vs compiled
    python scripts/profile_gpu.py jax-decode   # the same for JAX's compiled decode loop (XLA_FLAGS apply)
    python scripts/profile_gpu.py jax-train [--preset bench]   # JAX training step: GPU time by kernel kind
    python scripts/profile_gpu.py torch-train [--preset bench]   # the same for the torch.compile'd step
    python scripts/profile_gpu.py deepspeed-train [--preset bench]   # DeepSpeed's step against plain PyTorch's, by phase
    python scripts/profile_gpu.py jax-dispatch [--preset bench]   # the JAX step's host time, two forms of its state

`memory`: the training step of bench/train_step.py (bf16 autocast, float32 weights, AdamW) at
batch 8 x 2048; every tensor autograd saves for the backward is attributed to the innermost module
running when it was saved (storage counted once) and the totals are printed by module kind, with
the allocator's readings after the forward, the backward and the optimizer step. Variants:
--chunks (the loss chunk sizes to compare) and --checkpointing.

`decode`: `blues_torch.generation`'s decode step at batch 1 and 64, bf16, captured in a CUDA graph,
without and with torch.compile; torch.profiler over --steps replays lists the kernels per token and
the top kernels by GPU time.

`jax-train` also names the top XLA fusions: their HLO instruction in the compiled step (shape, the JAX
op and source line it came from, the ops fused), which the kernel names alone do not say.

`deepspeed-train`: the compiled PyTorch step, the DeepSpeed engine eager (with DeepSpeed's own
per-gradient norm loops, then blues_torch/deepspeed_norms.py's) and compiled (the trainer's per-block compile),
each timed by phase (forward, backward, optimizer step; synchronised between phases, medians) and
whole (unsynchronised); then the compiled engine's GPU kernels and, by Python's profiler, the host
time of its backward and step by DeepSpeed function: where the engine's own cost goes.

JAX is imported by the JAX sections only: a PyTorch profile neither needs it nor lets it reserve GPU memory.
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import gc
import glob
import io
import pstats
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench import deepspeed_step  # noqa: E402
from bench.decode import _greedy, decode_config, random_prompts  # noqa: E402
from bench.train_step import (GRAD_CLIP, LR, WEIGHT_DECAY, fresh_torch_compile, jax_step_inputs,  # noqa: E402
                              make_jax_train_step, random_batch, train_workload)
from blues.config import BluesConfig  # noqa: E402
from blues_torch import BluesModel  # noqa: E402
from blues_torch.distributed import Dist  # noqa: E402
from blues_torch.generation import _decoder, generate  # noqa: E402
from blues_torch.training import TrainStep, compile_for_training, make_optimizer  # noqa: E402

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
            opt = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=device)

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
    """Trace --steps JAX training steps (blues_jax/training.py's, as the bench runs it) and sum GPU kernel time."""
    import jax

    wl = train_workload(args.preset, quick=False)
    state, jitted, sharding = make_jax_train_step(wl.config)  # the trainer's step (blues_jax/training.py)
    inputs = jax_step_inputs(wl.config, wl.batch, wl.seq, sharding)
    step = jitted.lower(*state, *inputs).compile()  # compiled here so that its HLO can be read below
    for _ in range(3):  # warm up
        *state, out = step(*state, *inputs)
    jax.block_until_ready(out)
    trace_dir = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            *state, out = step(*state, *inputs)
        jax.block_until_ready(out)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    kernels, counts, ops = _traced_kernels(trace_dir)
    _print_kernels(f"\n== JAX training step, {args.preset} (batch {wl.batch} x {wl.seq}): {wall_ms:.1f} ms wall "
                   f"per step (traced, {wl.tokens / wall_ms * 1e3:,.0f} tokens/s)", kernels, counts, ops,
                   args.steps, args.top)
    _print_fusions(step.as_text(), [name for name, _ in kernels.most_common(args.top)], kernels, args.steps)


def _traced_kernels(trace_dir: str):
    """GPU kernels of a jax.profiler trace: name -> total ns, name -> calls, name -> the HLO op."""
    import jax

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
    return kernels, counts, ops


def jax_decode(args) -> None:
    """blues_jax.generation's greedy decoding, tiny preset, bf16, batch 1 and 64 (bench/decode.py's
    call): the decode step's time as the difference of a 256- and a 32-token generation over the 224
    extra steps, and the kernels of one 256-token call per token (prefill included)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from blues_jax import BluesModel as JaxModel
    from blues_jax.generation import generate as jax_generate

    new, short = 256, 32
    cfg = decode_config("tiny", False, 32, new)
    model = JaxModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    model.eval()
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    eot = cfg.vocab_size - 1
    for batch in (1, 64):
        prompts = random_prompts(cfg, batch, 32)

        def run(n: int) -> float:
            t0 = time.perf_counter()
            jax_generate(model, prompts, n, _greedy(), eot_id=eot, stop_at_eot=False)  # returns host lists
            return time.perf_counter() - t0

        run(new), run(short)  # compile
        whole = statistics.median(run(new) for _ in range(5))
        part = statistics.median(run(short) for _ in range(5))
        step_us = (whole - part) * 1e6 / (new - short)
        trace_dir = tempfile.mkdtemp()
        with jax.profiler.trace(trace_dir):
            run(new)
        kernels, counts, ops = _traced_kernels(trace_dir)
        _print_kernels(f"\n== JAX decode tiny b{batch} bf16: call {whole * 1e3:.2f} ms = {batch * new / whole:,.0f} "
                       f"tokens/s; step {step_us:.1f} us = {batch * 1e6 / step_us:,.0f} tokens/s; kernels per token "
                       f"of one call (prefill included)", kernels, counts, ops, new, args.top)


def jax_dispatch(args) -> None:
    """Host time of the JAX training step (blues_jax/training.py's): how long the call takes to return
    (argument handling and launch, while a synchronised step leaves the GPU idle), the step
    synchronised after each call (as the bench times it), and steps queued back to back."""
    import jax

    wl = train_workload(args.preset, quick=False)
    print(f"\n== JAX training step, {args.preset} (batch {wl.batch} x {wl.seq}), host side, ms (medians of {args.steps})")
    state, step, sharding = make_jax_train_step(wl.config)
    inputs = jax_step_inputs(wl.config, wl.batch, wl.seq, sharding)
    for _ in range(3):
        *state, out = step(*state, *inputs)
    jax.block_until_ready(out)
    call, synced = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        *state, out = step(*state, *inputs)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        call.append((t1 - t0) * 1e3)
        synced.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        *state, out = step(*state, *inputs)
    jax.block_until_ready(out)
    queued = (time.perf_counter() - t0) * 1e3 / args.steps
    print(f"   {len(jax.tree.leaves(state))} state arrays, call returns {statistics.median(call):6.2f}, synchronised "
          f"step {statistics.median(synced):7.2f}, queued step {queued:7.2f} "
          f"({wl.tokens / statistics.median(synced) * 1e3:,.0f} / {wl.tokens / queued * 1e3:,.0f} tokens/s)", flush=True)


def _hlo_sources(hlo: str) -> dict[int, str]:
    """Stack frame id -> its innermost frames in this repository ("file:line function", outermost last),
    from the FileNames / FunctionNames / FileLocations / StackFrames tables of an HLO module's text."""
    tables: dict[str, dict[int, str]] = {}
    section = None
    for line in hlo.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            tables[section] = {}
        elif section and (m := re.match(r"(\d+) (.*)$", line)):
            tables[section][int(m.group(1))] = m.group(2)
        elif section:
            section = None
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations, frames = tables.get("FileLocations", {}), tables.get("StackFrames", {})
    repo = str(Path(__file__).resolve().parents[1]) + "/"

    def where(frame: int) -> list[str]:
        out, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", frames[frame])
            spec = locations.get(int(loc.group(1)), "")
            f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", spec)
            if f:
                path = files.get(int(f.group(1)), "").strip('"')
                if path.startswith(repo) and "/.venv/" not in path:
                    out.append(f"{path[len(repo):]}:{f.group(3)} {functions.get(int(f.group(2)), '').strip(chr(34))}")
            frame = int(loc.group(2))  # a frame that is its own parent is the outermost
        return out

    return {frame: " < ".join(where(frame)[:3]) for frame in frames}


def _print_fusions(hlo: str, kernel_names: list[str], kernels, steps: int) -> None:
    """For each kernel that is an XLA fusion, its instruction in the optimized HLO: the result shape, its
    operands, the code that made it, and the ops of its fused computation by count."""
    sources = _hlo_sources(hlo)
    instr = {}  # HLO name -> (result shape, operands, called computation, op_name, source)
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) fusion\((.*?)\), kind=.*?calls=%?([\w.\-]+)", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            operands = ", ".join(re.sub(r"\.\d+$", "", o.strip().lstrip("%")) for o in m.group(3).split(","))
            instr[m.group(1)] = (m.group(2)[:70], operands[:150], m.group(4), op.group(1) if op else "",
                                 sources.get(int(frame.group(1)), "") if frame else "")
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"%?([\w.\-]+) \(.*\) -> .* \{$", line.strip())
        if head:
            current = head.group(1)
            bodies[current] = []
        elif current and (op := re.search(r" = .*? ([a-z][a-z\-]*)\(", line)):
            bodies[current].append(op.group(1))
    print("  the top fusions in the compiled HLO (kernel -> instruction = shape, operands, origin, fused ops):")
    for name in kernel_names:
        key = name if name in instr else next((k for k in instr if k.replace(".", "_") == name), None)
        if key is None:  # not an XLA fusion (a library or Pallas kernel)
            continue
        shape, operands, called, op_name, src = instr[key]
        ops = collections.Counter(bodies.get(called, []))
        kinds = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in ops.most_common(9) if k != "parameter")
        print(f"  {kernels[name] / 1e6 / steps:8.2f} ms  {key} = {shape}\n"
              f"             ({operands})\n             {op_name[-90:]}  [{src}]\n             fuses: {kinds}")


def _print_kernels(title: str, kernels, counts, ops, steps: int, top: int) -> None:
    """kernels/counts: name -> total ns / calls over `steps` steps; ops: name -> the op that launched it."""
    busy_ms = sum(kernels.values()) / 1e6 / steps
    unit, scale = ("us", 1e3) if busy_ms < 1 else ("ms", 1e6)  # decode steps are microseconds
    print(f"{title}, GPU kernels {busy_ms * 1e6 / scale:.1f} {unit} per step, "
          f"{sum(counts.values()) / steps:.0f} kernels")
    kinds: collections.Counter = collections.Counter()
    for name, ns in kernels.items():
        kinds[_kernel_kind(name)] += ns
    for kind, ns in kinds.most_common():
        print(f"  {ns / scale / steps:8.2f} {unit}  {ns / max(sum(kinds.values()), 1):5.1%}  {kind}")
    print(f"  top kernels ({unit} per step, calls per step, op):")
    for name, ns in kernels.most_common(top):
        print(f"  {ns / scale / steps:8.2f} {unit}  x{counts[name] / steps:5.1f}  {ops.get(name, ''):48s}  {name[:90]}")


def _torch_kernels(prof) -> tuple[collections.Counter, collections.Counter]:
    """A torch.profiler run's CUDA kernels: name -> total ns, name -> calls."""
    kernels: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            kernels[e.key] += int(e.self_device_time_total * 1e3)
            counts[e.key] += e.count
    return kernels, counts


def torch_train(args) -> None:
    """Profile --steps compiled PyTorch training steps (blues_torch/training.py's TrainStep, as the bench
    runs it: bf16 autocast, float32 weights, fused AdamW) and sum GPU kernel time."""

    wl = train_workload(args.preset, quick=False)
    device = torch.device("cuda")
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, 0)
    ids = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    tgt = torch.from_numpy(tgt_np).long().to(device)  # [B, T]
    torch.manual_seed(0)
    with torch.device(device):
        model = BluesModel(wl.config)
    model.train()
    fresh_torch_compile()
    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=device)
    train_step = TrainStep(model, optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16",
                           gen=torch.Generator(device=device).manual_seed(1), compile=True)  # the trainer's step

    def step():
        train_step([(ids, tgt)], LR)

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
    kernels, counts = _profile_steps(step, args.steps)
    _print_kernels(f"\n== torch.compile training step, {args.preset} (batch {wl.batch} x {wl.seq}): {wall_ms:.1f} ms "
                   f"wall per step ({wl.tokens / wall_ms * 1e3:,.0f} tokens/s untraced), peak {peak:.2f} GiB",
                   kernels, counts, {}, args.steps, args.top)


def _phases(forward, backward, update, steps: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each phase (synchronised around it) and of the whole step run without syncs."""
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": [], "whole": []}
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = forward()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        backward(loss)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        update()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i >= warmup:
            for key, dt in zip(("forward", "backward", "step"), (t1 - t0, t2 - t1, t3 - t2)):
                phases[key].append(dt * 1e3)
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        backward(forward())
        update()
        torch.cuda.synchronize()
        phases["whole"].append((time.perf_counter() - t0) * 1e3)
    return {key: statistics.median(ms) for key, ms in phases.items()}


def _plain_step(wl, ids, tgt, compile: bool, loss_chunk_size: int | None = None):
    """The PyTorch training step's phases (float32 weights, bf16 autocast, clipping, the trainer's
    optimizer from blues_torch/training.py) as (forward, backward, update) callables, to time each;
    the loss chunk the model's default unless given."""

    torch.manual_seed(0)
    with torch.device(ids.device):
        model = BluesModel(wl.config, loss_chunk_size=loss_chunk_size)
    model.train()
    opt = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=ids.device)
    if compile:
        fresh_torch_compile()
    if compile:
        compile_for_training(model)  # the trainer's --compile: each block compiled
    run = model
    params = list(model.parameters())

    def forward():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return run(ids, tgt).loss

    def update():
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return forward, lambda loss: loss.backward(), update


def _whole(forward, backward, update):
    """One step of (forward, backward, update) phases, as one callable."""
    return lambda: (backward(forward()), update())


def _profile_steps(step, steps: int):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return _torch_kernels(prof)


def deepspeed_train(args) -> None:
    """Plain PyTorch (compiled, eager), then the DeepSpeed engine (eager, compiled): phases; the GPU
    kernels of both compiled steps; DeepSpeed's host time by function."""

    wl = train_workload(args.preset, quick=False)
    device = torch.device("cuda")
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, 0)
    ids = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    tgt = torch.from_numpy(tgt_np).long().to(device)  # [B, T]
    print(f"\n== one training step, {args.preset} (batch {wl.batch} x {wl.seq}), ms (medians of {args.steps}): "
          "phases synchronised, whole step not")
    print(f"   {'path':<34} {'forward':>8} {'backward':>9} {'step':>7} {'sum':>7} {'whole':>7} {'tokens/s':>9}")

    def report(name, times):
        total = times["forward"] + times["backward"] + times["step"]
        print(f"   {name:<34} {times['forward']:8.1f} {times['backward']:9.1f} {times['step']:7.1f} {total:7.1f} "
              f"{times['whole']:7.1f} {wl.tokens / times['whole'] * 1e3:9,.0f}", flush=True)

    tables = []
    for compile in (True, False):
        step = _plain_step(wl, ids, tgt, compile)
        report(f"PyTorch, {'torch.compile' if compile else 'eager'}", _phases(*step, args.steps))
        if compile:
            tables.append(("PyTorch, torch.compile", _profile_steps(_whole(*step), args.steps)))
        del step
        gc.collect()
        torch.cuda.empty_cache()
    # DeepSpeed's own norm and overflow loops first (eager), for the before/after of
    # blues_torch/deepspeed_norms.py in one run; the engines after it use the multi-tensor ones.
    for compile, fast_norms in ((False, False), (False, True), (True, True)):
        engine, _, note, _ = deepspeed_step.build_engine(wl, compile=compile, fast_norms=fast_norms)
        step = (lambda: engine(ids, tgt).loss, engine.backward, engine.step)
        norms = "" if fast_norms else ", own norms"
        report(f"DeepSpeed ZeRO-2, {'compiled' if compile else 'eager'}{norms}", _phases(*step, args.steps))
        if compile:
            tables.append(("DeepSpeed ZeRO-2, compiled", _profile_steps(_whole(*step), args.steps)))
        else:
            del engine, step
            gc.collect()
            torch.cuda.empty_cache()
    print(f"   ({note})")
    for name, (kernels, counts) in tables:
        _print_kernels(f"\n== {name}", kernels, counts, {}, args.steps, args.top)

    for phase in ("backward", "step"):
        profiler = cProfile.Profile()
        for _ in range(args.steps):
            loss = engine(ids, tgt).loss
            if phase == "step":
                engine.backward(loss)
            torch.cuda.synchronize()
            profiler.enable()
            if phase == "backward":
                engine.backward(loss)
            else:
                engine.step()
            torch.cuda.synchronize()
            profiler.disable()
            if phase == "backward":
                engine.step()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(f"\n== host time in DeepSpeed's {phase} (compiled, cProfile, {args.steps} calls; "
              "synchronize = waiting for the GPU)")
        print("\n".join(line for line in out.getvalue().splitlines()[3:] if line.strip()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="+", choices=("memory", "decode", "jax-decode", "jax-train", "torch-train", "deepspeed-train",
                                              "jax-dispatch"))
    p.add_argument("--preset", default="bench", help="jax-train: the preset (its bench batch and sequence)")
    p.add_argument("--chunks", type=int, nargs="+", default=[4096, 1024])
    p.add_argument("--checkpointing", type=lambda s: s == "on", nargs="+", default=[False],
                   help="on/off values of the model's gradient_checkpointing to compare")
    p.add_argument("--steps", type=int, default=50, help="decode steps (jax-train: training steps) profiled")
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    for what in args.what:
        {"memory": memory, "decode": decode, "jax-decode": jax_decode, "jax-train": jax_train, "torch-train": torch_train,
         "deepspeed-train": deepspeed_train, "jax-dispatch": jax_dispatch}[what](args)


if __name__ == "__main__":
    main()

"""Greedy decoding of `tiny` under variants of the compiled step, side by side (one GPU call).

    python scripts/decode_probe.py                       # every torch variant, then each JAX variant
    python scripts/decode_probe.py --torch base cdt --jax

The bench's decode call (prompt 32, 256 new tokens, bf16, random weights; bench/decode.py) through
blues_torch.generation with compile=True, under changes that leave the function alone:
- `base`: the project's decode step as it is;
- `cdt`: inductor's coordinate-descent tuning of its Triton kernels (`options=` of torch.compile);
- `ref-attn`: attention through the reference's einsum/softmax (one query over the cache), which
  inductor fuses, instead of SDPA's kernel;
- `max-autotune`: inductor's Triton GEMM templates with fused epilogues (autotuned);
- `unfused-head`: the LM head's logits and then the argmax, instead of the fused greedy head
  (blues_torch/greedy_head.py);
- `no-decode-attention`: the cache's masked attention through SDPA, instead of the one-query
  kernel (blues_torch/decode_attention.py).
JAX variants: the attention implementation of the prefill (`cudnn`, `xla`), and, with cuDNN,
`unfused-head` (the head's float32 logits and then the argmax instead of blues_jax/greedy_head.py)
and `no-decode-attention` (XLA's masked attention instead of blues_jax/decode_attention.py).
Per variant and batch (1, 64): tokens/s over whole generate calls (median of --calls after two
warm-up calls), the captured step's kernels and GPU time per token (torch.profiler over replays),
and how many greedy tokens equal the `base` variant's (bf16: a changed reduction order can flip a
near-tie, so this is reported, not asserted). JAX variants run in child processes (`--jax-one`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import NEW_TOKENS, PROMPT, _greedy, decode_config, random_prompts  # noqa: E402

TORCH_VARIANTS = ("base", "cdt", "ref-attn", "ref-attn+cdt", "max-autotune", "unfused-head", "no-decode-attention")
JAX_VARIANTS = ("cudnn", "xla", "unfused-head", "no-decode-attention")


def _torch_variant(name: str, calls: int, steps: int, base_tokens: dict) -> list[str]:
    import torch
    import torch._dynamo
    from torch.profiler import ProfilerActivity, profile

    from blues_torch import BluesModel
    from blues_torch import decode_attention, generation, greedy_head

    torch._dynamo.reset()
    generation._DECODERS.clear()
    cfg = decode_config("tiny", False, PROMPT, NEW_TOKENS)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = BluesModel(cfg)
    model.eval().to(torch.bfloat16)
    if "ref-attn" in name:
        for layer in model.layers:
            layer.attn.attn_impl = "reference"
    options = {}
    if "cdt" in name:
        options["coordinate_descent_tuning"] = True
    if name == "max-autotune":
        options.update(max_autotune=True, coordinate_descent_tuning=True)
    real_compile = torch.compile

    def compile_with_options(fn, **kw):
        return real_compile(fn, options=options or None, **kw)

    generation.torch.compile = compile_with_options  # the module's torch: only _Decoder compiles through it
    fused_applies, attention_applies = greedy_head.fused_applies, decode_attention.applies
    if name == "unfused-head":
        greedy_head.fused_applies = lambda h: False
    if name == "no-decode-attention":
        decode_attention.applies = lambda q: False
    eot = cfg.vocab_size - 1
    lines = []
    try:
        for batch in (1, 64):
            prompts = random_prompts(cfg, batch, PROMPT, batch)
            t0 = time.perf_counter()
            tokens = generation.generate(model, prompts, NEW_TOKENS, _greedy(), eot_id=eot, stop_at_eot=False,
                                         compile=True)
            first = time.perf_counter() - t0
            times = []
            for i in range(calls + 1):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                tokens = generation.generate(model, prompts, NEW_TOKENS, _greedy(), eot_id=eot, stop_at_eot=False,
                                             compile=True)
                torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            base = base_tokens.setdefault(batch, tokens)
            same = sum(a == b for ra, rb in zip(tokens, base) for a, b in zip(ra, rb))
            dec = next(iter(generation._DECODERS.values()))
            if dec.graph is None:  # the capture failed (generation logged why): eager steps, nothing to replay
                lines.append(f"| torch {name} | {batch} | {batch * NEW_TOKENS / med:,.0f} | not captured | | | "
                             f"{same}/{batch * NEW_TOKENS} | {first:.1f} |")
                print(lines[-1], flush=True)
                continue
            dec.cache.index.fill_(PROMPT)  # replays continue from the prompt: steps < NEW_TOKENS stay in the cache
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    dec.graph.replay()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            kernels = sum(e.count for e in events) / steps
            gpu_us = sum(e.self_device_time_total for e in events) / steps
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dec.cache.index.fill_(PROMPT)
            start.record()
            for _ in range(steps):
                dec.graph.replay()
            end.record()
            torch.cuda.synchronize()
            replay_us = start.elapsed_time(end) * 1e3 / steps
            lines.append(f"| torch {name} | {batch} | {batch * NEW_TOKENS / med:,.0f} | {replay_us:.0f} | "
                         f"{gpu_us:.0f} | {kernels:.0f} | {same}/{batch * NEW_TOKENS} | {first:.1f} |")
            print(lines[-1], flush=True)
            top = sorted(events, key=lambda e: -e.self_device_time_total)[:8]
            for e in top:
                print(f"      {e.self_device_time_total / steps:6.1f} us x{e.count / steps:4.1f} {e.key[:100]}", flush=True)
    finally:
        generation.torch.compile = real_compile
        greedy_head.fused_applies, decode_attention.applies = fused_applies, attention_applies
        generation._DECODERS.clear()
    return lines


def _jax_one(variant: str, calls: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from blues_jax import BluesModel, decode_attention, greedy_head
    from blues_jax.generation import generate

    if variant == "unfused-head":
        greedy_head.fused_applies = lambda dtype, d: False
    if variant == "no-decode-attention":
        decode_attention.applies = lambda q: False
    cfg = decode_config("tiny", False, PROMPT, NEW_TOKENS)
    attn = variant if variant in ("cudnn", "xla") else "cudnn"
    model = BluesModel(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, attn_impl=attn)
    model.eval()
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    eot = cfg.vocab_size - 1
    for batch in (1, 64):
        prompts = random_prompts(cfg, batch, PROMPT, batch)
        t0 = time.perf_counter()
        generate(model, prompts, NEW_TOKENS, _greedy(), eot_id=eot, stop_at_eot=False)
        first = time.perf_counter() - t0
        times = []
        for i in range(calls + 1):
            t0 = time.perf_counter()
            out = generate(model, prompts, NEW_TOKENS, _greedy(), eot_id=eot, stop_at_eot=False)
            if i:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        digest = int(np.asarray(out, dtype=np.int64).sum())
        print(f"| jax {variant} {os.environ.get('XLA_FLAGS', '')} | {batch} | {batch * NEW_TOKENS / med:,.0f} | | | | "
              f"sum {digest} | {first:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torch", nargs="*", choices=TORCH_VARIANTS, default=list(TORCH_VARIANTS))
    p.add_argument("--jax", nargs="*", choices=JAX_VARIANTS, default=list(JAX_VARIANTS))
    p.add_argument("--jax-one", choices=JAX_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--steps", type=int, default=50, help="graph replays profiled and timed")
    args = p.parse_args()
    if args.jax_one:
        _jax_one(args.jax_one, args.calls)
        return
    print("| variant | batch | tokens/s (call) | replay us | kernel us | kernels | tokens = base | first call s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    base_tokens: dict = {}
    for name in args.torch:
        try:
            _torch_variant(name, args.calls, args.steps, base_tokens)
        except Exception as e:  # one variant failing (e.g. an autotune error) leaves the others
            print(f"| torch {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |", flush=True)
    for variant in args.jax:
        subprocess.run([sys.executable, __file__, "--jax-one", variant, "--calls", str(args.calls)], check=False)


if __name__ == "__main__":
    main()

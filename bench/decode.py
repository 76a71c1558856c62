"""Greedy decoding throughput with the KV cache: batch 1 and 64, prompt 32, 256 new tokens.

Uses the project's generation code (`blues_torch/generation.py`: static cache and a CUDA-graph
decode step, `torch.compile`d first with `--torch-compile on|both`; `blues_jax/generation.py`: prefill plus a compiled `while_loop`), on a model whose
weights are cast to bf16 (as the peer's are). tokens/s = batch * new tokens / wall time of one
`generate` call (prefill included), median over the timed calls; the first calls (compilation,
graph capture) are warm-up.

Context: the tiny preset's context is 256 positions, less than 32 + 256. The weights do not depend
on the context (RoPE is computed on the fly), so the decode model is the preset with
`max_position_embeddings` raised to prompt + new tokens, which is also the size of the caches.

Check, before timing (float32 weights, float32 matmuls): the greedy tokens the cached decoder
emits must be exactly the argmax of a full forward pass over the same sequence (teacher forcing on
the generated text), position by position — the design page's "decoding with a cache computes the
same logits as the full forward pass". With random weights the top-2 logit gap is ~0.2, float32
differences ~1e-6, so a tie flip has odds of ~1e-4 per run. Where the fused greedy head applies
(bf16 on a GPU), the timed model's greedy tokens through it must also equal those through the
logits' argmax (`_check_fused_head`).
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from blues.config import BluesConfig
from bench.mfu import decode_flops_per_token
from bench.report import Row
from bench.timing import PeakMemory, log, time_steps, torch_sync
from bench.train_step import model_config

PROMPT, NEW_TOKENS, BATCHES = 32, 256, (1, 64)
QUICK_PROMPT, QUICK_NEW, QUICK_BATCHES = 8, 16, (1, 64)
CHECK_BATCH, CHECK_NEW = 2, 16


def decode_config(preset: str, quick: bool, prompt: int, new: int) -> BluesConfig:
    cfg = model_config(preset, quick)
    return dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, prompt + new))


def random_prompts(config: BluesConfig, batch: int, prompt: int, seed: int = 0) -> list[list[int]]:
    # ids below vocab_size - 1: the last id serves as the (unused: equal lengths) padding id
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size - 1, (batch, prompt)).tolist()


def _greedy():
    from blues.sampling import SamplingParams
    return SamplingParams(temperature=0.0)


def _teacher_forced_match(plain_logits_fn, model, prompts, generated) -> tuple[int, int]:
    """(matches, total): argmax of the full forward over prompt + generated[:-1] vs generated."""
    seq = np.concatenate([np.asarray(prompts), np.asarray(generated)], axis=1)  # [B, P + n]
    logits = plain_logits_fn(model, seq[:, :-1])  # [B, P + n - 1, V]
    p = len(prompts[0])
    predicted = logits[:, p - 1:].argmax(-1)  # [B, n]: the token each position predicts
    gen = np.asarray(generated)
    return int((predicted == gen).sum()), gen.size


def _check_cached_greedy(generate, plain_logits, model, cfg: BluesConfig, prompt: int, seed: int) -> tuple[bool, str]:
    """Before timing (float32 model): KV-cached greedy decoding picks the full forward's argmax at every step."""
    prompts = random_prompts(cfg, CHECK_BATCH, prompt, seed + 7)
    generated = generate(model, prompts, CHECK_NEW, _greedy(), eot_id=cfg.vocab_size - 1, stop_at_eot=False)
    hits, total = _teacher_forced_match(plain_logits, model, prompts, generated)
    msg = f"fp32 cached greedy == full-forward argmax {hits}/{total}"
    log(f"  check: {msg}")
    return hits == total, msg


def _check_fused_head(generate, model, cfg: BluesConfig, prompt: int, seed: int) -> tuple[bool, str]:
    """The timed (bf16) model: greedy tokens through the fused head (blues_*/greedy_head.py) are the
    logits' argmax's, step by step. Only the head differs between the two runs (the same layers'
    kernels), so a flip needs two logits within the GEMMs' float32 rounding of each other."""
    prompts = random_prompts(cfg, CHECK_BATCH, prompt, seed + 9)
    kw = dict(eot_id=cfg.vocab_size - 1, stop_at_eot=False)
    fused = generate(model, prompts, CHECK_NEW, _greedy(), **kw)
    plain = generate(model, prompts, CHECK_NEW, _greedy(), fused_head=False, **kw)
    same = sum(a == b for rf, rp in zip(fused, plain) for a, b in zip(rf, rp))
    total = CHECK_BATCH * CHECK_NEW
    msg = f"bf16 fused head == logits argmax {same}/{total}"
    log(f"  check: {msg}")
    return same == total and all(len(r) == CHECK_NEW for r in fused), msg


def _both(first: tuple[bool | None, str], second: tuple[bool, str] | None) -> tuple[bool | None, str]:
    if second is None:
        return first
    ok = second[0] if first[0] is None else first[0] and second[0]
    return ok, "; ".join(m for m in (first[1], second[1]) if m)


# ==== PyTorch =========================================================================================

def _decode_row(framework: str, backend: str, cfg: BluesConfig, *, preset, batch, prompt, new, quick,
                times, reading, tokens, check_msg, check_ok, variant: str = "bf16") -> Row:
    """One decode row: tokens/s over the whole generate call (prefill included)."""
    n_out = sum(len(r) for r in tokens)
    return Row(framework=framework, workload=f"decode b{batch}", variant=variant,
               tokens_per_s=batch * new / times.median_s,
               flops_per_token=decode_flops_per_token(cfg, prompt, new), dense_framework=framework,
               step_ms=times.median_s * 1e3, spread=times.spread, peak_gib=reading.peak_gib,
               peak_exact=reading.exact, check=check_msg + f"; {n_out}/{batch * new} tokens out",
               check_ok=None if check_ok is None else (check_ok and n_out == batch * new),
               notes=f"{backend}; prompt {prompt}, {new} new; ms per call (prefill included)",
               config={"preset": preset, "batch": batch, "prompt": prompt, "new": new, "quick": quick})


def torch_decode(preset: str, *, quick: bool, steps: int, warmup: int, seed: int = 0, check: bool = True,
                 compile: bool = False) -> list[Row]:
    """`compile`: torch.compile the decode step before its CUDA graph is captured (generate(compile=True));
    the float32 check then runs the compiled step too."""
    import torch
    from blues_torch import BluesModel, greedy_head
    from blues_torch.generation import generate, plain_logits
    from bench.train_step import fresh_torch_compile, torch_device

    prompt, new, batches = (QUICK_PROMPT, QUICK_NEW, QUICK_BATCHES) if quick else (PROMPT, NEW_TOKENS, BATCHES)
    cfg = decode_config(preset, quick, prompt, new)
    device = torch_device()
    torch.manual_seed(seed)
    with torch.device(device):
        model = BluesModel(cfg)
    model.eval()
    eot = cfg.vocab_size - 1
    if compile:
        fresh_torch_compile()
    generate = functools.partial(generate, compile=compile)
    check_ok, check_msg = _check_cached_greedy(generate, plain_logits, model, cfg, prompt, seed) if check else (None, "")
    model.to(torch.bfloat16)
    if check and greedy_head.fused_applies(model.embed):  # the head's check runs the eager step (no second compile)
        eager = functools.partial(generate, compile=False)
        check_ok, check_msg = _both((check_ok, check_msg), _check_fused_head(eager, model, cfg, prompt, seed))
    rows = []
    for batch in batches:
        mem = PeakMemory("torch", device)
        mem.reset()
        prompts = random_prompts(cfg, batch, prompt, seed + batch)
        out = {}

        def call():
            out["tokens"] = generate(model, prompts, new, _greedy(), eot_id=eot, stop_at_eot=False)
            return None

        times = time_steps(call, lambda _: torch_sync(device), warmup=warmup, steps=steps,
                           label=f"torch decode b{batch}")
        reading = mem.read()
        rows.append(_decode_row("torch", device.type, cfg, preset=preset, batch=batch, prompt=prompt, new=new,
                                quick=quick, times=times, reading=reading, tokens=out["tokens"],
                                check_msg=check_msg, check_ok=check_ok, variant="bf16 compile" if compile else "bf16"))
    del model
    return rows


# ==== JAX =============================================================================================

def jax_decode(preset: str, *, quick: bool, steps: int, warmup: int, seed: int = 0, check: bool = True) -> list[Row]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from blues_jax import BluesModel, greedy_head
    from blues_jax.generation import generate, plain_logits
    from bench.timing import jax_sync

    prompt, new, batches = (QUICK_PROMPT, QUICK_NEW, QUICK_BATCHES) if quick else (PROMPT, NEW_TOKENS, BATCHES)
    cfg = decode_config(preset, quick, prompt, new)
    eot = cfg.vocab_size - 1
    model = BluesModel(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    model.eval()
    check_ok, check_msg = None, ""
    if check:
        # float32 matmuls at full precision: on GPUs XLA's default for float32 dots is TF32.
        with jax.default_matmul_precision("float32"):
            check_ok, check_msg = _check_cached_greedy(generate, plain_logits, model, cfg, prompt, seed)
    del model
    # The timed model: bf16 compute and bf16 weights (so the cache, sized from the embedding's dtype, is bf16 too).
    model = BluesModel(cfg, rngs=nnx.Rngs(seed), dtype=jnp.bfloat16)
    model.eval()
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    if check and greedy_head.fused_applies(jnp.bfloat16, cfg.hidden_size):
        check_ok, check_msg = _both((check_ok, check_msg), _check_fused_head(generate, model, cfg, prompt, seed))
    rows = []
    for batch in batches:
        mem = PeakMemory("jax")
        mem.reset()
        prompts = random_prompts(cfg, batch, prompt, seed + batch)
        out = {}

        def call():
            out["tokens"] = generate(model, prompts, new, _greedy(), eot_id=eot, stop_at_eot=False)
            return None  # generate returns host lists: the device work is done

        times = time_steps(call, jax_sync, warmup=warmup, steps=steps, label=f"jax decode b{batch}")
        reading = mem.read()
        rows.append(_decode_row("jax", jax.default_backend(), cfg, preset=preset, batch=batch, prompt=prompt, new=new,
                                quick=quick, times=times, reading=reading, tokens=out["tokens"],
                                check_msg=check_msg, check_ok=check_ok))
    return rows

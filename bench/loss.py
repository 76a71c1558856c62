"""The LM head + cross-entropy, chunked vs plain, forward and backward, at 16k tokens.

The inputs are those the model hands its loss: the final hidden states h (PyTorch: float32 [N, d],
the residual stream's dtype, matmuls under bf16 autocast; JAX: the compute dtype, bf16 [B, T, d]),
the float32 tied embedding [Vp, d] and random targets. Each variant computes the loss and its
gradients with respect to h and the embedding.

Time: median of timed calls of forward + backward. Extra memory: the working memory beyond the
inputs and the two gradients the call must return (in a training step those gradient buffers
exist whatever the loss does): PyTorch, the allocator's peak minus what was allocated before the
call minus the returned gradients; JAX, XLA's `temp_size_in_bytes` of the compiled function
(arguments and outputs excluded), a planning figure that needs no reset of the peak counter.

Check: chunked loss and gradients against the plain ones in the same run. Both round the logits
to bf16 GEMM outputs; the loss is a mean over 16k tokens, so its relative difference is far
below bf16's 4e-3 (1e-3 allowed); the gradients are bf16 GEMM outputs accumulated in different
orders (chunked: over chunks in float32), so 1e-2 relative (METHOD.md's range for bf16 operands).
"""
from __future__ import annotations

import numpy as np

from blues.config import BluesConfig
from bench.mfu import lm_head_loss_flops_per_token
from bench.report import Row
from bench.timing import GIB, jax_sync, time_steps, torch_sync, xla_temp_bytes
from bench.train_step import model_config, _rel

LOSS_TOL, GRAD_TOL = 1e-3, 1e-2
TOKENS = (8, 2048)  # B x T = 16,384 tokens: the bench preset's training batch
QUICK_TOKENS = (4, 128)
TORCH_CHUNKS = (1024, 2048, 4096, 8192)
JAX_CHUNKS = (1024, 4096)
QUICK_CHUNKS = (128, 256)


def _inputs(config: BluesConfig, b: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = config.hidden_size
    h = rng.standard_normal((b, t, d)).astype(np.float32)  # unit-RMS, as after the final norm
    embed = (rng.standard_normal((config.padded_vocab_size, d)) / np.sqrt(d)).astype(np.float32)
    embed[config.vocab_size:] = 0.0  # the padding rows are zero, as in the model
    targets = rng.integers(0, config.vocab_size, (b, t)).astype(np.int32)
    return h, embed, targets


def _loss_row(framework, variant, workload, n_tokens, seconds, spread, extra_bytes, cfg, check, check_ok, notes,
              dense_framework, shape) -> Row:
    return Row(framework=framework, workload=workload, variant=variant, tokens_per_s=n_tokens / seconds,
               flops_per_token=lm_head_loss_flops_per_token(cfg), dense_framework=dense_framework,
               step_ms=seconds * 1e3, spread=spread,
               peak_gib=None if extra_bytes is None else extra_bytes / GIB, peak_exact=True,
               check=check, check_ok=check_ok, notes=notes, config=shape)


# ==== PyTorch =========================================================================================

def torch_loss(preset: str = "bench", *, quick: bool, steps: int, warmup: int, chunks=None, seed: int = 0) -> list[Row]:
    import torch
    from blues_torch.loss import chunked_lm_loss, cross_entropy, lm_head_logits
    from bench.train_step import torch_device

    cfg = model_config(preset, quick)
    b, t = QUICK_TOKENS if quick else TOKENS
    chunks = chunks or (QUICK_CHUNKS if quick else TORCH_CHUNKS)
    device = torch_device()
    cuda = device.type == "cuda"
    h_np, e_np, t_np = _inputs(cfg, b, t, seed)
    h = torch.from_numpy(h_np).to(device).reshape(b * t, -1).requires_grad_()  # [N, d] float32
    embed = torch.from_numpy(e_np).to(device).requires_grad_()  # [Vp, d] float32
    targets = torch.from_numpy(t_np).long().to(device).reshape(-1)  # [N]
    shape = {"preset": preset, "tokens": b * t, "vocab": cfg.vocab_size, "d": cfg.hidden_size, "quick": quick}

    def plain():
        return cross_entropy(lm_head_logits(h, embed, cfg.vocab_size), targets)

    def chunked(c):
        return lambda: chunked_lm_loss(h, embed, targets, cfg.vocab_size, c)

    def fwd_bwd(fn):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn()
        grad_h, grad_e = torch.autograd.grad(loss, [h, embed])
        return loss.detach(), grad_h, grad_e

    def extra_bytes(fn):
        if not cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss, gh, ge = fwd_bwd(fn)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        out = gh.numel() * gh.element_size() + ge.numel() * ge.element_size() + loss.numel() * loss.element_size()
        return peak - before - out

    ref_loss, ref_gh, ref_ge = fwd_bwd(plain)
    ref_loss, ref_gh, ref_ge = float(ref_loss), ref_gh.float().cpu().numpy(), ref_ge.float().cpu().numpy()
    variants = [("loss plain", "", plain)] + [("loss chunked", f"chunk {c}", chunked(c)) for c in chunks]
    results = []
    for workload, variant, fn in variants:
        if workload == "loss chunked":
            loss, gh, ge = fwd_bwd(fn)
            e_loss = abs(float(loss) - ref_loss) / abs(ref_loss)
            e_gh = _rel(gh.float().cpu().numpy(), ref_gh)
            e_ge = _rel(ge.float().cpu().numpy(), ref_ge)
            del loss, gh, ge
            ok = e_loss < LOSS_TOL and e_gh < GRAD_TOL and e_ge < GRAD_TOL
            check = (f"vs plain: loss rel {e_loss:.1e} (< {LOSS_TOL:.0e}), grad_h {e_gh:.1e}, "
                     f"grad_embed {e_ge:.1e} (< {GRAD_TOL:.0e})")
        else:
            ok, check = None, f"reference (loss {ref_loss:.4f})"
        extra = extra_bytes(fn)
        times = time_steps(lambda: fwd_bwd(fn), lambda _: torch_sync(device), warmup=warmup, steps=steps,
                           label=f"torch {workload} {variant}".strip())
        results.append((workload, variant, times, extra, check, ok))
    return _rows("torch", results, b * t, cfg, shape, device.type)


def _rows(framework, results, n_tokens, cfg, shape, backend) -> list[Row]:
    plain = next(r for r in results if r[0] == "loss plain")
    rows = []
    for workload, variant, times, extra, check, ok in results:
        notes = f"{backend}; peak column = extra memory over inputs + grads"
        if workload == "loss chunked":
            notes += f"; {times.median_s / plain[2].median_s:.2f}x plain's time"
            if extra is not None and plain[3]:
                notes += f", {extra / plain[3]:.2f}x its extra memory"
        rows.append(_loss_row(framework, variant, workload, n_tokens, times.median_s, times.spread, extra, cfg,
                              check, ok, notes, framework, shape))
    return rows


# ==== JAX =============================================================================================

def jax_loss(preset: str = "bench", *, quick: bool, steps: int, warmup: int, chunks=None, seed: int = 0) -> list[Row]:
    import jax
    import jax.numpy as jnp
    from blues_jax import xent_kernel
    from blues_jax.loss import chunked_lm_loss, cross_entropy, lm_head_logits

    cfg = model_config(preset, quick)
    b, t = QUICK_TOKENS if quick else TOKENS
    chunks = chunks or (QUICK_CHUNKS if quick else JAX_CHUNKS)
    h_np, e_np, t_np = _inputs(cfg, b, t, seed)
    h = jnp.asarray(h_np, jnp.bfloat16)  # [B, T, d]: the model hands the head its compute dtype
    embed = jnp.asarray(e_np)  # [Vp, d] float32
    targets = jnp.asarray(t_np)  # [B, T]
    shape = {"preset": preset, "tokens": b * t, "vocab": cfg.vocab_size, "d": cfg.hidden_size, "quick": quick}

    def plain(h, embed):
        return cross_entropy(lm_head_logits(h, embed, cfg.vocab_size), targets)

    fused = xent_kernel.fused_applies(h.dtype)  # as the model's training step chooses on one device

    def chunked(c):
        return lambda h, embed: chunked_lm_loss(h, embed, targets, cfg.vocab_size, c, fused=fused)

    def compile_fwd_bwd(fn):
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(h, embed).compile()

    plain_c = compile_fwd_bwd(plain)
    ref_loss, (ref_gh, ref_ge) = plain_c(h, embed)
    ref_loss, ref_gh, ref_ge = float(ref_loss), np.asarray(ref_gh, np.float32), np.asarray(ref_ge, np.float32)
    variants = [("loss plain", "", plain_c)] + [("loss chunked", f"chunk {c}", compile_fwd_bwd(chunked(c))) for c in chunks]
    results = []
    for workload, variant, compiled in variants:
        if workload == "loss chunked":
            loss, (gh, ge) = compiled(h, embed)
            e_loss = abs(float(loss) - ref_loss) / abs(ref_loss)
            e_gh = _rel(np.asarray(gh, np.float32), ref_gh)
            e_ge = _rel(np.asarray(ge, np.float32), ref_ge)
            ok = e_loss < LOSS_TOL and e_gh < GRAD_TOL and e_ge < GRAD_TOL
            check = (f"vs plain: loss rel {e_loss:.1e} (< {LOSS_TOL:.0e}), grad_h {e_gh:.1e}, "
                     f"grad_embed {e_ge:.1e} (< {GRAD_TOL:.0e})")
        else:
            ok, check = None, f"reference (loss {ref_loss:.4f})"
        times = time_steps(lambda: compiled(h, embed), jax_sync, warmup=warmup, steps=steps,
                           label=f"jax {workload} {variant}".strip())
        results.append((workload, variant, times, xla_temp_bytes(compiled), check, ok))
    rows = _rows("jax", results, b * t, cfg, shape, jax.default_backend())
    for row in rows:
        row.notes = row.notes.replace("extra memory over inputs + grads", "extra memory (XLA temp plan)")
    return rows

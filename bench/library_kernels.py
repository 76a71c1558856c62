"""Library kernels against Blues' own, same call and shapes: time, extra memory, numerical agreement.

Three kernels of a training step, each forward + backward at the bench and tiny presets' shapes:

- LM head + loss (`kernel loss <preset>`): Blues' chunked loss with its Triton softmax kernels
  (blues_torch.loss.chunked_lm_loss, the model's chunk size) against liger-kernel's fused linear
  cross-entropy (`liger_fused_linear_cross_entropy`) and cut-cross-entropy's `linear_cross_entropy`
  (its CCE kernels, default `filter_eps="high"`: it skips gradient entries below bf16 resolution).
  Inputs: bf16 hidden states h [N, d] (N = B*T of the preset) and a bf16 tied embedding, random
  targets in [0, V); Blues takes its padded [Vp, d] layout, the libraries its first V rows (a view:
  the same call the model would make). Gradients with respect to h and the embedding.
- Gated GeLU (`kernel gated-gelu <preset>`): the experts' activation on [M, 2F] (M = N * k
  token-expert pairs, F the expert width), bf16. Blues: blues_torch.gated_gelu (aten forward,
  Triton backward). liger: `liger_geglu(gate, value)` on two contiguous [M, F] halves (as a model
  with separate gate and up projections hands them over). NOT like-for-like: Blues' GeLU is the
  exact (erf) one, liger's GEGLU the tanh approximation; its row is compared against both the
  exact reference (Blues' definition: the approximation's own error shows) and a tanh reference
  (the kernel's own accuracy).
- RMSNorm (`kernel rmsnorm <preset>`): [N, d] float32 (the residual stream under autocast) with a
  float32 scale. Blues: blues_torch.model.RMSNorm, eager and under torch.compile (how the
  compiled model runs it: inductor fuses it). liger: `LigerRMSNorm`-style `liger_rms_norm`
  (casting_mode "llama", not in place).

Numbers: median time of forward + backward (bench.timing.time_steps; the short elementwise
kernels run `reps` calls back to back per sample), extra memory = the allocator's peak minus
what was allocated before the call minus the tensors it returns (bench/loss.py's convention), and
the relative error (||x - ref|| / ||ref||) of the value and each gradient against a float32
reference computed from the same (rounded) inputs. Tolerances: the loss is a mean over >= 16k
tokens of bf16-rounded logits, so 1e-3 relative; outputs and gradients are bf16 (2^-9 ~ 2e-3 per
element), 1e-2 relative (bench/loss.py's LOSS_TOL, GRAD_TOL, METHOD.md's range for bf16 operands).
A wrong kernel is O(1) off.

These kernels need CUDA (Triton). On a CPU each library row is skipped with its reason and the
Blues rows run their CPU paths, which covers the shapes, the reference and the comparison. The
libraries are optional imports (carried as wheels to the GPU by scripts/gpu_peers.sh), so this
module imports them inside its functions.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from blues.config import BluesConfig
from bench.loss import GRAD_TOL, LOSS_TOL, _inputs
from bench.mfu import lm_head_loss_flops_per_token
from bench.report import Row
from bench.timing import GIB, log, time_steps, torch_sync
from bench.train_step import SHAPES, QUICK_SHAPES, model_config, torch_device

KERNELS = ("loss", "gated-gelu", "rmsnorm")
REPS = {"loss": 1, "gated-gelu": 5, "rmsnorm": 10}  # calls per timed sample (bench.timing.time_steps)


@dataclass
class Candidate:
    framework: str  # "torch" (Blues' kernel) or the library's package name
    variant: str
    run: Callable[[], tuple] | None  # forward + backward: (value, *gradients), None when unavailable
    unavailable: str | None = None  # why run is None
    reference: str = "exact"  # which float32 reference it is held to ("exact" or "tanh", gated GeLU only)


def library_available(package: str) -> str | None:
    """None if `package` (liger-kernel, cut-cross-entropy) imports with CUDA to run on, else why not."""
    import torch
    module = {"liger-kernel": "liger_kernel.transformers.functional", "cut-cross-entropy": "cut_cross_entropy"}[package]
    try:
        __import__(module)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"{package} is not importable ({type(e).__name__}: {first})"
    if not torch.cuda.is_available():
        return f"{package}'s Triton kernels need a CUDA device"
    return None


def kernel_shapes(kernel: str, preset: str, quick: bool) -> dict:
    """The call's sizes at a preset: the training batch's tokens N, width d, vocabulary V, experts."""
    cfg = model_config(preset, quick)
    b, t = (QUICK_SHAPES if quick else SHAPES)[preset]
    n = b * t
    if kernel == "loss":
        return {"b": b, "t": t, "n": n, "d": cfg.hidden_size, "vocab": cfg.vocab_size, "padded": cfg.padded_vocab_size,
                "chunk": min(cfg.default_loss_chunk_size, n)}
    if kernel == "gated-gelu":
        return {"m": n * cfg.chosen_num_experts, "f": cfg.expert_hidden_size}
    if kernel == "rmsnorm":
        return {"n": n, "d": cfg.hidden_size, "eps": cfg.rms_norm_eps}
    raise ValueError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")


# ==== the three calls ==================================================================================

def loss_candidates(cfg: BluesConfig, shape: dict, device, seed: int):
    """(inputs, candidates, reference) for the LM head + loss."""
    import torch
    import torch.nn.functional as F
    from blues_torch.loss import chunked_lm_loss

    h_np, e_np, t_np = _inputs(cfg, shape["b"], shape["t"], seed)
    h = torch.from_numpy(h_np).reshape(shape["n"], -1).to(device, torch.bfloat16).requires_grad_()  # [N, d]
    embed = torch.from_numpy(e_np).to(device, torch.bfloat16).requires_grad_()  # [Vp, d], rows V.. zero
    targets = torch.from_numpy(t_np).reshape(-1).long().to(device)  # [N]
    v = shape["vocab"]

    def grads(loss):
        gh, ge = torch.autograd.grad(loss, [h, embed])
        return loss.detach().float(), gh, ge[:v]

    def blues():
        return grads(chunked_lm_loss(h, embed, targets, v, shape["chunk"]))

    def reference():
        hf, ef = h.detach().float().requires_grad_(), embed.detach()[:v].float().requires_grad_()
        loss = F.cross_entropy(hf @ ef.t(), targets)  # [N, V] float32 logits
        gh, ge = torch.autograd.grad(loss, [hf, ef])
        return loss.detach(), gh, ge

    cands = [Candidate("torch", "blues triton" if device.type == "cuda" else "blues (cpu path)", blues)]
    reason = library_available("liger-kernel")
    if reason is None:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        cands.append(Candidate("liger-kernel", "fused linear ce",
                               lambda: grads(liger_fused_linear_cross_entropy(h, embed[:v], targets))))
    else:
        cands.append(Candidate("liger-kernel", "fused linear ce", None, reason))
    reason = library_available("cut-cross-entropy")
    if reason is None:
        from cut_cross_entropy import linear_cross_entropy
        cands.append(Candidate("cut-cross-entropy", "cce", lambda: grads(linear_cross_entropy(h, embed[:v], targets))))
    else:
        cands.append(Candidate("cut-cross-entropy", "cce", None, reason))
    return cands, reference


def gated_gelu_candidates(shape: dict, device, seed: int):
    import torch
    import torch.nn.functional as F
    from blues_torch.gated_gelu import gated_gelu

    m, f = shape["m"], shape["f"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(m, 2 * f, generator=g).to(device, torch.bfloat16).requires_grad_()  # [M, 2F] value | gate
    grad_out = torch.randn(m, f, generator=g).to(device, torch.bfloat16)  # [M, F]
    value_c, gate_c = (x.detach().contiguous().requires_grad_() for x in hidden.chunk(2, dim=-1))  # [M, F] each

    def blues():
        out = gated_gelu(hidden)
        (gh,) = torch.autograd.grad(out, [hidden], grad_out)
        return out.detach(), gh

    def reference(approximate: str):
        def run():
            hf = hidden.detach().float().requires_grad_()
            value, gate = hf.chunk(2, dim=-1)
            out = F.gelu(gate, approximate=approximate) * value
            (gh,) = torch.autograd.grad(out, [hf], grad_out.float())
            return out.detach(), gh
        return run

    cands = [Candidate("torch", "blues (erf)", blues)]
    reason = library_available("liger-kernel")
    if reason is None:
        from liger_kernel.transformers.functional import liger_geglu

        def liger():
            # liger's backward writes the gradients over its saved inputs: fresh copies each call
            # (their copy, 2 x [M, F] bf16, is inside the timed region).
            gate, value = (t.detach().clone().requires_grad_() for t in (gate_c, value_c))
            out = liger_geglu(gate, value)  # gelu_tanh(gate) * value
            d_gate, d_value = torch.autograd.grad(out, [gate, value], grad_out)
            return out.detach(), torch.cat([d_value, d_gate], dim=-1)  # Blues' [value | gate] layout

        for ref in ("exact", "tanh"):
            cands.append(Candidate("liger-kernel", f"geglu (tanh) vs {ref}", liger, reference=ref))
    else:
        cands.append(Candidate("liger-kernel", "geglu (tanh)", None, reason))
    return cands, {"exact": reference("none"), "tanh": reference("tanh")}


def rmsnorm_candidates(shape: dict, device, seed: int):
    import torch
    from blues_torch.model import RMSNorm

    n, d, eps = shape["n"], shape["d"], shape["eps"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()  # [N, d] float32
    grad_out = torch.randn(n, d, generator=g).to(device)
    norm = RMSNorm(d, eps).to(device)
    with torch.no_grad():
        norm.scale.copy_(1.0 + 0.1 * torch.randn(d, generator=g))
    scale = norm.scale

    def runner(fn):
        def run():
            out = fn(x)
            gx, gs = torch.autograd.grad(out, [x, scale], grad_out)
            return out.detach(), gx, gs
        return run

    def reference():
        xf, sf = x.detach().double().requires_grad_(), scale.detach().double().requires_grad_()
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * sf
        gx, gs = torch.autograd.grad(out, [xf, sf], grad_out.double())
        return out.detach(), gx, gs

    cands = [Candidate("torch", "blues eager", runner(norm))]
    if device.type == "cuda":
        cands.append(Candidate("torch", "blues compiled", runner(torch.compile(norm, dynamic=False))))
    reason = library_available("liger-kernel")
    if reason is None:
        from liger_kernel.transformers.functional import liger_rms_norm
        cands.append(Candidate("liger-kernel", "rms_norm",
                               runner(lambda t: liger_rms_norm(t, scale, eps, 0.0, "llama", False))))
    else:
        cands.append(Candidate("liger-kernel", "rms_norm", None, reason))
    return cands, reference  # float64: the float32 candidates' own rounding is what shows


# ==== measuring =======================================================================================

def extra_bytes(run, device) -> int | None:
    """Peak allocated during one call, minus what was there before and what it returns."""
    import torch
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    returned = sum(t.numel() * t.element_size() for t in out)
    del out
    return peak - before - returned


def errors(out, ref) -> list[float]:
    """Relative error ||x - ref|| / ||ref|| of the value and each gradient, in float64 on their device
    (a bench gradient of the embedding is 200M numbers: no copy to the host)."""
    return [float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)) for a, b in zip(out, ref)]


def kernel_rows(kernel: str, preset: str, *, quick: bool, steps: int, warmup: int, seed: int = 0) -> list[Row]:
    """One row per candidate (Blues' and the libraries') for one kernel at one preset."""
    import torch
    device = torch_device()
    cfg = model_config(preset, quick)
    shape = kernel_shapes(kernel, preset, quick)
    if kernel == "loss":
        cands, ref_fn = loss_candidates(cfg, shape, device, seed)
        refs = {"exact": ref_fn}
        names, tols = ["loss", "grad_h", "grad_embed"], [LOSS_TOL, GRAD_TOL, GRAD_TOL]
        tokens = shape["n"]
    elif kernel == "gated-gelu":
        cands, refs = gated_gelu_candidates(shape, device, seed)
        names, tols = ["out", "grad"], [GRAD_TOL, GRAD_TOL]
        tokens = shape["m"]
    else:
        cands, ref_fn = rmsnorm_candidates(shape, device, seed)
        refs = {"exact": ref_fn}
        names, tols = ["out", "grad_x", "grad_scale"], [GRAD_TOL, GRAD_TOL, GRAD_TOL]
        tokens = shape["n"]
    workload = f"kernel {kernel} {preset}"
    config = {"preset": preset, "kernel": kernel, "quick": quick, **shape}
    # Every reference runs before any candidate, from inputs no library kernel has touched yet.
    reference_out = {name: tuple(t.detach().clone() for t in fn()) for name, fn in refs.items()}

    def reference(name):
        return reference_out[name]

    rows, timed = [], {}
    for c in cands:
        if c.run is None:
            rows.append(Row(framework=c.framework, workload=workload, variant=c.variant, skipped=c.unavailable,
                            config=config))
            continue
        try:
            errs = errors(c.run(), reference(c.reference))
            ok = all(math.isfinite(e) and e < tol for e, tol in zip(errs, tols))
            check = (f"vs float32 {'' if c.reference == 'exact' else c.reference + ' '}reference: "
                     + ", ".join(f"{n} {e:.1e} (< {tol:.0e})" for n, e, tol in zip(names, errs, tols)))
            if id(c.run) not in timed:  # a kernel held to two references is timed once
                extra = extra_bytes(c.run, device)
                times = time_steps(c.run, lambda _: torch_sync(device), warmup=warmup, steps=steps,
                                   label=f"{c.framework} {workload} {c.variant}", reps=REPS[kernel])
                timed[id(c.run)] = (times, extra)
            times, extra = timed[id(c.run)]
        except Exception as e:  # one candidate failing (an old Triton, an API change) must not take the rest
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            rows.append(Row(framework=c.framework, workload=workload, variant=c.variant,
                            error=f"{type(e).__name__}: {first}"[:300], config=config))
            log(f"  {c.framework} {workload} {c.variant}: ERROR {type(e).__name__}: {first[:200]}")
            continue
        rows.append(Row(framework=c.framework, workload=workload, variant=c.variant, tokens_per_s=tokens / times.median_s,
                        flops_per_token=lm_head_loss_flops_per_token(cfg) if kernel == "loss" else None,
                        dense_framework="torch", step_ms=times.median_s * 1e3, spread=times.spread,
                        peak_gib=None if extra is None else extra / GIB, peak_exact=True, check=check, check_ok=ok,
                        notes=f"{device.type}; {_version(c.framework)}peak column = extra memory over inputs + outputs",
                        config=config))
    _compare_to_blues(rows)
    del cands, reference_out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _version(framework: str) -> str:
    """"liger-kernel 0.8.5; " for a library's row, "" for Blues'."""
    if framework == "torch":
        return ""
    import importlib.metadata
    try:
        return f"{framework} {importlib.metadata.version(framework)}; "
    except importlib.metadata.PackageNotFoundError:
        return ""


def _compare_to_blues(rows: list[Row]) -> None:
    """Each library row's notes: its time and extra memory over Blues' first row of the kernel."""
    ours = next((r for r in rows if r.framework == "torch" and r.step_ms), None)
    if ours is None:
        return
    for r in rows:
        if r.framework == "torch" or not r.step_ms:
            continue
        r.notes += f"; {r.step_ms / ours.step_ms:.2f}x Blues' time ({ours.variant})"
        if r.peak_gib is not None and ours.peak_gib:
            r.notes += f", {r.peak_gib / ours.peak_gib:.2f}x its extra memory"


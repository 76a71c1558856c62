"""The benchmark's correctness checks: every fast path it times against its reference path, on inputs
where a bug shows, before anything is timed.

Kernel checks (`check_torch_attention`, `check_jax_attention`) compare one attention backend with
`reference_attention` on random bf16 q/k/v. Model checks (`check_torch_model_paths`,
`check_jax_model_paths`, `check_torch_compiled_gradients`) run one forward and backward of the whole
model three ways and compare what they show (`Probe`):

- fast: bf16, the paths the benchmark times (PyTorch: SDPA / flash-attn, `torch._grouped_mm`, the
  Triton gated-GeLU backward and loss kernels, the chunked loss, optionally `torch.compile`; JAX:
  cuDNN attention, the sorted experts with Mosaic grouped GEMMs and the Pallas gated-GeLU kernels,
  the chunked loss with its Pallas kernel);
- reference: bf16, the reference paths (reference attention, the per-expert loop / the blocks form,
  aten / XLA elementwise code, the materialised loss);
- float32: the reference paths in float32, the anchor both are measured against.

A fast path is right when it is no further from float32 than the bf16 reference path is: each
figure is the fast path's error minus the reference path's (`excess`), so bf16 rounding, which both
have, cancels, and a bug, which only the fast path has, stands out. Compared: the residual stream
after every block, the top-k expert choices of every layer, the loss and every parameter's gradient.

Inputs where a bug shows: a freshly initialised model hides most bugs (its blocks add little to the
residual stream, and the loss of uniform random targets is ~ln V whatever the blocks do: routing
every token to the wrong expert moved it by 2.5e-3). The model checks run on a copy whose attention
and expert output projections are rescaled so that each branch adds unit RMS to the residual
stream (`scale_branches`: measured in one float32 forward), router noise and dropout off.

The fast paths are chosen inside the model (a GPU, bf16, Triton, Hopper); `fast_paths`, a context
manager factory entered around the fast run, is where a test plants a bug on a CPU
(tests/test_bench_checks.py), or where a caller could force a path. docs/performance.md lists
which bug each check catches and where its threshold comes from.

torch and jax are imported inside the functions that use them: a JAX-only bench process never
loads torch's model code, and the reverse.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np

from blues.config import BluesConfig

# Tolerances of the kernel checks (relative error ||fast - ref|| / ||ref||):
# attention in bf16: the output is rounded to bf16 (2^-9 ~ 2e-3 relative) and flash/cuDNN kernels
# also round the probabilities to bf16 before P @ V; METHOD.md puts bf16-operand results between
# 1e-3 and 1e-2. 2e-2 leaves headroom; a wrong mask, scale or head grouping is O(1).
ATTN_TOL = 2e-2


@dataclass(frozen=True)
class Thresholds:
    """How much further from float32 the fast path may be than the bf16 reference path.

    Measured bf16 noise (docs/performance.md, "Correctness checks"): between two correct bf16 paths
    on a CPU the excess was at most 3.4e-3 (layers), 0 (routing), 5.5e-4 (loss) and 1.1e-2 (the
    worst parameter's gradient); at the bench size on an H200 a router's gradient (a small sum of
    cancelling terms whose top-k choices flip on near ties) was 0.37 from float32 compiled and 0.32
    in eager bf16, an excess of 0.05; JAX's fast paths (cuDNN attention, Mosaic experts, Pallas
    kernels) at `tiny` on an H200 were 5.0e-2 further from float32 than its bf16 reference paths at a
    block's output. Each bound is well above that and below what the planted bugs give (layers
    0.45-0.84, loss 0.5, gradients 0.8-1.7)."""
    layer: float = 0.15  # relative error of the residual stream after a block
    routing: float = 0.05  # fraction of tokens whose top-k expert set differs from float32's
    loss: float = 1e-2  # relative error of the loss
    grad: float = 0.2  # relative error of a parameter's gradient


THRESHOLDS = Thresholds()


def rel(a, b) -> float:
    """||a - b|| / ||b|| in float64 (numpy arrays, or anything np.asarray takes)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def loss_check(losses: list[float]) -> tuple[bool, str]:
    """Every loss finite and the last below the first (the same batch, repeated, must be learnt)."""
    finite = all(math.isfinite(x) for x in losses)
    ok = finite and losses[-1] < losses[0]
    return ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps" + ("" if finite else " (non-finite)")


# ==== the comparison: framework-free ==================================================================

@dataclass
class Probe:
    """What one forward and backward of a model shows. Arrays are the framework's own (on device)."""
    layers: list[Any]  # the residual stream after each block, [B, T, d] each (empty: not recorded)
    routes: np.ndarray  # [L, B, T, k] chosen experts
    loss: float
    grads: dict[str, Any]  # parameter name -> gradient (a parameter no gradient reached is absent)


def route_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[L] fraction of tokens choosing the same set of k experts. a, b [L, B, T, k]."""
    a, b = np.sort(np.asarray(a), -1), np.sort(np.asarray(b), -1)
    return (a == b).all(-1).reshape(a.shape[0], -1).mean(-1)


def compare(fast: Probe, reference: Probe, exact: Probe, rel_fn: Callable[[Any, Any], float] = rel,
            tol: Thresholds = THRESHOLDS) -> tuple[bool, str]:
    """Each figure of `fast` against `exact` (float32), less the same figure of `reference` (bf16):
    the worst layer, routing, loss and gradient excess, each within its threshold."""
    def excess(err_fast: float, err_ref: float) -> float:
        return err_fast - err_ref if math.isfinite(err_fast) else math.inf

    parts, ok = [], True

    def judge(name: str, value: float, bound: float, where: str = "") -> None:
        nonlocal ok
        good = math.isfinite(value) and value < bound
        ok &= good
        parts.append(f"{name} {value:.1e}{f' ({where})' if where else ''}{' <' if good else ' NOT <'} {bound:.2g}")

    if fast.layers:
        layer = [excess(rel_fn(f, x), rel_fn(r, x)) for f, r, x in zip(fast.layers, reference.layers, exact.layers)]
        worst = int(np.argmax(layer))
        judge("layer", layer[worst], tol.layer, f"block {worst}")
    agree_fast, agree_ref = route_agreement(fast.routes, exact.routes), route_agreement(reference.routes, exact.routes)
    routing = agree_ref - agree_fast  # [L] how many more tokens the fast path routes differently
    worst = int(np.argmax(routing))
    judge("routing", float(routing[worst]), tol.routing, f"layer {worst}: {agree_fast[worst]:.1%} agree")
    judge("loss", excess(abs(fast.loss - exact.loss) / abs(exact.loss),
                         abs(reference.loss - exact.loss) / abs(exact.loss)), tol.loss)
    # a parameter the fast path gave no gradient is 1.0 from float32's
    grad = {name: excess(rel_fn(fast.grads[name], g) if name in fast.grads else 1.0,
                         rel_fn(reference.grads[name], g) if name in reference.grads else 1.0)
            for name, g in exact.grads.items()}
    worst_name = max(grad, key=lambda n: grad[n] if math.isfinite(grad[n]) else math.inf)
    judge("grad", grad[worst_name], tol.grad, worst_name)
    return ok, "vs float32, excess over bf16 reference: " + ", ".join(parts)


@contextlib.contextmanager
def recording(owner, name: str, sink: list, pick: Callable[[Any], Any]):
    """While active, every call of owner.<name> appends pick(its result) to sink."""
    original = getattr(owner, name)

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        sink.append(pick(out))
        return out

    with mock.patch.object(owner, name, record):
        yield


def paths(model, mode: str, fast_paths, reference_paths):
    """The context of a probe run: "fast" is training mode (the chunked loss) inside
    `fast_paths(model)` (None: the model's own choice); otherwise eval mode (the materialised loss)
    inside `reference_paths(model)`. Both frameworks' modules have train() and eval()."""
    if mode == "fast":
        model.train()
        return fast_paths(model) if fast_paths else contextlib.nullcontext()
    model.eval()
    return reference_paths(model)


def _branch_scale(rms: float, target: float = 1.0) -> float:
    return target / rms if rms > 0 and math.isfinite(rms) else 1.0


# ==== PyTorch =========================================================================================

def check_torch_attention(config: BluesConfig, batch: int, seq: int, device, attn_impl: str = "auto") -> tuple[bool, str]:
    """The backend attn_impl resolves to, vs reference_attention, on random bf16 q/k/v of this shape."""
    import torch
    from blues_torch.attention import attention, reference_attention, resolve_attn_impl
    g = torch.Generator(device=device).manual_seed(1)
    b = min(batch, 2)  # the reference materialises [B, K, G, T, T] float32 scores
    shape_q = (b, seq, config.num_attention_heads, config.head_dim)
    shape_kv = (b, seq, config.num_key_value_heads, config.head_dim)
    q, k, v = (torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) for s in (shape_q, shape_kv, shape_kv))
    backend = resolve_attn_impl(attn_impl, device, torch.bfloat16, config.attn_logit_softcap)
    with torch.no_grad():
        fast = attention(q, k, v, softcap=config.attn_logit_softcap, impl=attn_impl).float()
        ref = reference_attention(q.float(), k.float(), v.float(), softcap=config.attn_logit_softcap)
    err = rel(fast.cpu(), ref.cpu())
    ok = math.isfinite(err) and err < ATTN_TOL
    return ok, f"attn {backend} vs reference rel {err:.1e} (< {ATTN_TOL:.0e})"


@contextlib.contextmanager
def torch_reference_paths(model):
    """Switch a blues_torch model to its reference paths: reference attention in every layer, the
    per-expert loop instead of torch._grouped_mm and aten's gated-GeLU backward instead of the
    Triton kernel (both predicates are looked up on every call, so replacing them for the block is
    enough). The loss's reference is the materialised one, which the model takes in eval mode."""
    import blues_torch.experts as experts
    import blues_torch.gated_gelu as gated_gelu
    saved_impl = [layer.attn.attn_impl for layer in model.layers]
    for layer in model.layers:
        layer.attn.attn_impl = "reference"
    try:
        with mock.patch.object(experts, "_grouped_mm_ok", lambda *a, **k: False), \
                mock.patch.object(gated_gelu, "fused_applies", lambda *a, **k: False):
            yield
    finally:
        for layer, impl in zip(model.layers, saved_impl):
            layer.attn.attn_impl = impl


def _torch_rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def torch_check_model(model):
    """A copy of `model` for the checks: router noise and dropout off, the residual branches
    rescaled (scale_branches)."""
    import torch
    from blues_torch import BluesModel
    quiet = dataclasses.replace(model.config, router_noise_std=0.0, dropout=0.0)
    with torch.device(model.embed.device):
        copy = BluesModel(quiet, attn_impl=model.layers[0].attn.attn_impl, loss_chunk_size=model.loss_chunk_size)
    copy.load_state_dict(model.state_dict())
    return copy


def torch_scale_branches(model, ids) -> None:
    """Rescale each block's attn.o and moe.w_out so its branch adds unit RMS to the residual stream,
    from one float32 forward (each branch reads a normalised input, so one pass suffices)."""
    import torch
    from blues_torch import model as tm
    attn, moe = [], []
    rms = lambda t: float(t.float().square().mean().sqrt())  # noqa: E731
    model.eval()
    with torch.no_grad(), recording(tm.Attention, "forward", attn, rms), \
            recording(tm.MoE, "forward", moe, lambda out: rms(out[0])):
        model(ids)
        for layer, a, m in zip(model.layers, attn, moe):
            layer.attn.o.mul_(_branch_scale(a))
            layer.moe.w_out.mul_(_branch_scale(m))


def torch_probe(model, ids, tgt, mode: str, *, forward=None, fast_paths=None) -> Probe:
    """One forward and backward. mode "fast": training mode (the chunked loss), bf16 autocast, the
    model's own paths inside `fast_paths(model)`; "reference": eval mode (the materialised loss), bf16,
    torch_reference_paths; "float32": the same without autocast. `forward`: what runs the model
    (a compiled module, say); per-block outputs are recorded around Block.forward."""
    import torch
    from blues_torch import model as tm
    layers: list = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(paths(model, mode, fast_paths, torch_reference_paths))
        stack.enter_context(recording(tm.Block, "forward", layers, lambda out: out[0].detach().float()))
        stack.enter_context(torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=mode != "float32"))
        model.zero_grad(set_to_none=True)
        out = (model if forward is None else forward)(ids, tgt)
        out.loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return Probe(layers=layers[-len(model.layers):] if layers else [], routes=out.expert_indices.cpu().numpy(),
                 loss=float(out.loss.detach()), grads=grads)


def check_torch_model_paths(model, ids, tgt, device=None, *, fast_paths=None, compile_fn=None) -> tuple[bool, str]:
    """The model's fast paths (and, with `compile_fn`, the compiled model) against its reference
    paths, on a rescaled copy (module docstring): layers, routing, loss and every gradient."""
    import torch
    model = torch_check_model(model)
    torch_scale_branches(model, ids)
    forward = compile_fn(model) if compile_fn is not None else None
    fast = torch_probe(model, ids, tgt, "fast", forward=forward, fast_paths=fast_paths)
    if forward is not None:  # dynamo's cache holds the compiled copy: free it before anything is measured
        del forward
        torch._dynamo.reset()
    reference = torch_probe(model, ids, tgt, "reference")
    exact = torch_probe(model, ids, tgt, "float32")
    ok, text = compare(fast, reference, exact, _torch_rel)
    return ok, ("compiled " if compile_fn is not None else "model ") + text


def training_compile(model):
    """train_torch.py --compile's compile of `model` (blues_torch.training.compile_for_training: each
    block of the training forward); returns the model, which now runs its blocks compiled."""
    from blues_torch.training import compile_for_training
    compile_for_training(model)
    return model


def check_torch_compiled_gradients(model, ids, tgt, compile_fn=None) -> tuple[bool, str]:
    """The compiled training step (`training_compile` by default) against the reference paths: the
    same comparison as check_torch_model_paths, the fast run through the compiled model."""
    return check_torch_model_paths(model, ids, tgt, compile_fn=compile_fn or training_compile)


def compiled_gradient_errors(model, ids, tgt, compile_fn=None, autocast: bool = True) -> dict[str, tuple[float, float]]:
    """One training forward and backward, compiled (`compile_fn`, `training_compile` by default) and
    eager, both in bf16, and the eager float32 reference, router noise off so that all take the same
    routes as far as rounding lets them: each parameter's (compiled's, eager bf16's) relative gradient
    error against the reference (compiled's 1.0 where it gave none). autocast: bf16 autocast over the
    model's float32 weights (the reference: autocast off); else the model is bf16 (DeepSpeed's mode)
    and the reference a float32 copy of it. The model's compiled blocks are as they were afterwards."""
    import copy

    import torch
    quiet = dataclasses.replace(model.config, router_noise_std=0.0)
    owners = [model, *(layer.moe for layer in model.layers)]  # the modules that read the noise setting
    saved = [m.config for m in owners]
    for m in owners:
        m.config = quiet
    saved_block, model.compiled_block = model.compiled_block, None  # the eager runs are eager

    def gradients(run, module, bf16_autocast):
        module.zero_grad(set_to_none=True)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16_autocast):
            run(ids, tgt).loss.backward()
        grads = {name: p.grad.float().clone() for name, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        return grads

    try:
        reference_model = model if autocast else copy.deepcopy(model).float()
        reference = gradients(reference_model, reference_model, False)
        del reference_model
        eager = gradients(model, model, autocast)
        compiled = gradients((compile_fn or training_compile)(model), model, autocast)
    finally:
        for m, cfg in zip(owners, saved):
            m.config = cfg
        model.compiled_block = saved_block

    def rel_to_reference(name, grads):
        return _torch_rel(grads[name], reference[name]) if name in grads else 1.0

    return {name: (rel_to_reference(name, compiled), rel_to_reference(name, eager)) for name in reference}


# ==== JAX =============================================================================================

def check_jax_attention(config: BluesConfig, batch: int, seq: int, attn_impl: str = "auto") -> tuple[bool, str]:
    import jax
    import jax.numpy as jnp
    from blues_jax.attention import attention, reference_attention, resolve_attn_impl
    b = min(batch, 2)
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (b, seq, config.num_attention_heads, config.head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (b, seq, config.num_key_value_heads, config.head_dim), jnp.bfloat16)
    v = jax.random.normal(kv, (b, seq, config.num_key_value_heads, config.head_dim), jnp.bfloat16)
    softcap = config.attn_logit_softcap
    backend = resolve_attn_impl(attn_impl, jax.default_backend(), jnp.bfloat16, softcap, config.head_dim)
    fast = jax.jit(lambda q, k, v: attention(q, k, v, softcap=softcap, impl=attn_impl))(q, k, v)
    ref = jax.jit(lambda q, k, v: reference_attention(q, k, v, softcap=softcap))(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    err = rel(np.asarray(fast, np.float32), np.asarray(ref, np.float32))
    ok = math.isfinite(err) and err < ATTN_TOL
    return ok, f"attn {backend} vs reference rel {err:.1e} (< {ATTN_TOL:.0e})"


@contextlib.contextmanager
def jax_reference_paths(model):
    """Switch a blues_jax model to its reference paths: reference attention in every layer and the
    blocks form of the experts (no Mosaic grouped GEMMs, no Pallas gated GeLU); both are chosen
    when a function is traced. The loss's reference is the materialised one (eval mode)."""
    import blues_jax.experts as experts
    saved_impl = [layer.attn.attn_impl for layer in model.layers]
    for layer in model.layers:
        layer.attn.attn_impl = "reference"
    try:
        with mock.patch.object(experts, "_sorted_pays", lambda *a, **k: False):
            yield
    finally:
        for layer, impl in zip(model.layers, saved_impl):
            layer.attn.attn_impl = impl


def jax_scale_branches(model, ids) -> list[tuple[float, float]]:
    """Each block's (attn.o, moe.w_out) factor that gives its branches unit RMS (as
    torch_scale_branches), from one jitted forward of `model`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from blues_jax import model as jm
    rms = lambda t: jnp.sqrt(jnp.mean(jnp.square(t.astype(jnp.float32))))  # noqa: E731
    model.eval()
    graphdef, state = nnx.split(model)

    def run(state):
        attn, moe = [], []
        with jm.blocks_traced_inline(), recording(jm.Attention, "__call__", attn, rms), \
                recording(jm.MoE, "__call__", moe, lambda out: rms(out[0])):
            nnx.merge(graphdef, state)(ids)
        return attn, moe

    attn, moe = jax.jit(run)(state)
    return [(_branch_scale(float(a)), _branch_scale(float(m))) for a, m in zip(attn, moe)]


def jax_check_model(config: BluesConfig, ids, attn_impl: str = "auto", seed: int = 0,
                    loss_chunk_size: int | None = None):
    """A bf16-compute model for the checks: router noise and dropout off, the residual branches
    rescaled (from a float32 forward)."""
    import jax.numpy as jnp
    from flax import nnx
    from blues_jax import BluesModel
    quiet = dataclasses.replace(config, router_noise_std=0.0, dropout=0.0)
    # Unrolled blocks: the checks record each block's values as it runs, which a scan's body would
    # hide (tests/test_jax_model.py holds the scan to the unrolled blocks).
    model = BluesModel(quiet, rngs=nnx.Rngs(seed), attn_impl=attn_impl, dtype=jnp.bfloat16,
                       loss_chunk_size=loss_chunk_size, scan_layers=False)
    with jax_compute_dtype(model, jnp.float32):
        scales = jax_scale_branches(model, jnp.asarray(ids))
    for layer, (s_attn, s_moe) in zip(model.layers, scales):
        layer.attn.o.value = layer.attn.o.value * s_attn
        layer.moe.w_out.value = layer.moe.w_out.value * s_moe
    return model


@contextlib.contextmanager
def jax_compute_dtype(model, dtype):
    """Run `model` with another compute dtype: its parameters are float32 either way, and each
    module reads its `dtype` when traced, so one model serves the bf16 and the float32 runs."""
    from flax import nnx
    modules = [m for _, m in nnx.iter_modules(model) if hasattr(m, "dtype")]
    saved = [m.dtype for m in modules]
    for m in modules:
        m.dtype = dtype
    try:
        yield
    finally:
        for m, d in zip(modules, saved):
            m.dtype = d


def jax_probe(model, ids, tgt, mode: str, *, fast_paths=None) -> Probe:
    """One jitted forward and backward; modes as torch_probe ("float32": float32 compute). The
    results come to the host (numpy), so that three runs' gradients do not sit on the device
    beside the model while the benchmark measures its peak memory."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from blues_jax import model as jm
    layers: list = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(paths(model, mode, fast_paths, jax_reference_paths))
        if mode == "float32":
            stack.enter_context(jax_compute_dtype(model, jnp.float32))
        stack.enter_context(jm.blocks_traced_inline())  # each layer's values from this trace
        stack.enter_context(recording(jm, "_run_block", layers, lambda out: out[0]))
        graphdef, state = nnx.split(model)

        def run(state):
            def loss_fn(m):
                layers.clear()
                out = m(ids, tgt)
                return out.loss, (out.expert_indices, list(layers))
            (loss, (routes, hs)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(nnx.merge(graphdef, state))
            return loss, routes, hs, nnx.to_pure_dict(grads)

        loss, routes, hs, grads = jax.jit(run)(state)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    return Probe(layers=[np.asarray(h, np.float32) for h in hs], routes=np.asarray(routes), loss=float(loss),
                 grads={jax.tree_util.keystr(path): np.asarray(g) for path, g in flat})


def check_jax_model_paths(config: BluesConfig, ids, tgt, attn_impl: str = "auto", *, seed: int = 0,
                          fast_paths=None) -> tuple[bool, str]:
    """A bf16 model's fast paths against its reference paths, bf16 and float32, rescaled (module
    docstring): layers, routing, loss and every gradient."""
    import jax.numpy as jnp
    # Two blocks at the workload's widths: every kernel runs at its real shapes, and XLA compiles the
    # three probes (each an unrolled forward and backward) in seconds; at the bench preset's 12
    # blocks they took over 4 minutes on an H200 (2026-12-04).
    config = dataclasses.replace(config, num_layers=min(config.num_layers, 2))
    ids, tgt = jnp.asarray(ids), jnp.asarray(tgt)
    model = jax_check_model(config, ids, attn_impl, seed)
    fast = jax_probe(model, ids, tgt, "fast", fast_paths=fast_paths)
    reference = jax_probe(model, ids, tgt, "reference")
    exact = jax_probe(model, ids, tgt, "float32")
    ok, text = compare(fast, reference, exact)
    return ok, "model " + text

"""Training throughput: one full optimizer step (forward, backward, clip, AdamW), both frameworks.

PyTorch: float32 parameters (the master weights), bf16 autocast for the matmuls, gradient clipping
by global norm and `torch.optim.AdamW(fused=True)` (train_torch.py's optimizer: betas (0.9, 0.95),
decay on matrices only); optionally the model under `torch.compile`.
JAX: one `jax.jit` step (the NNX functional pattern: merge, `nnx.value_and_grad`, optimizer update,
split) with the whole state donated, float32 parameters, bf16 compute (`dtype=bfloat16`), optax
`clip_by_global_norm` + `adamw`.

Both train on one fixed batch of uniformly random token ids (the same for the peer), so no data
loading is timed; the loss on a repeated batch must fall, which is one of the checks. Before the
timing, the fast paths are checked against the reference ones on the same shapes (bench/checks.py):
the attention backend against the reference attention, and the whole model's layers, routing,
loss and gradients with the fast paths (compiled, in PyTorch's compile row) against the reference
paths.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from blues.config import BluesConfig
from bench.mfu import train_flops_per_token
from bench.report import Row
from bench.timing import PeakMemory, log, time_steps, torch_sync, jax_sync, xla_memory_bytes
from bench.checks import (check_jax_attention, check_jax_model_paths, check_torch_attention,  # noqa: F401
                          check_torch_compiled_gradients, check_torch_model_paths, compiled_gradient_errors,
                          loss_check, rel as _rel, torch_reference_paths)

LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0


@dataclass(frozen=True)
class Workload:
    name: str  # "train bench" | "train tiny"
    preset: str
    config: BluesConfig
    batch: int
    seq: int
    quick: bool = False

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def describe(self) -> dict:
        return {"preset": self.preset, "batch": self.batch, "seq": self.seq, "quick": self.quick,
                "model": self.config.to_dict()}


# CPU smoke-test sizes: the same code paths (GQA, top-k > 1, padded vocabulary, post norms) at a
# size that compiles and runs in seconds on two cores.
QUICK_CONFIGS = {
    "bench": dict(vocab_size=1000, max_position_embeddings=64, num_layers=1, hidden_size=64, head_dim=16,
                  num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                  embedding_multiplier_scale=2),
    "tiny": dict(vocab_size=1000, max_position_embeddings=32, num_layers=1, hidden_size=48, head_dim=16,
                 num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=1,
                 embedding_multiplier_scale=2),
}
SHAPES = {"bench": (8, 2048), "tiny": (64, 256)}  # the batch x sequence per preset
QUICK_SHAPES = {"bench": (4, 64), "tiny": (8, 32)}


def model_config(preset: str, quick: bool) -> BluesConfig:
    # --quick has toy versions of bench and tiny; any other preset maps to the tiny toy
    return BluesConfig(**QUICK_CONFIGS.get(preset, QUICK_CONFIGS["tiny"])) if quick else BluesConfig.preset(preset)


def train_workload(preset: str, quick: bool) -> Workload:
    batch, seq = (QUICK_SHAPES if quick else SHAPES)[preset]
    return Workload(f"train {preset}", preset, model_config(preset, quick), batch, seq, quick)


def random_batch(config: BluesConfig, batch: int, seq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random token ids: inputs and next-token targets, int32 [B, T] each."""
    window = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq + 1), dtype=np.int64)
    return window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)


# ==== PyTorch =========================================================================================

def torch_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fresh_torch_compile() -> None:
    """Forget every graph compiled earlier in this process. A section that runs a second preset
    in one process would otherwise recompile the model with dynamic shapes (dynamo's automatic
    dynamic: the second set of shapes marks them dynamic), which is not the static-shape graph a
    training run compiles, and measures differently (docs/performance.md, round 5)."""
    import torch
    torch._dynamo.reset()


def torch_param_groups(model, weight_decay: float) -> list[dict]:
    """train_torch.py's groups: decay on matrices (ndim >= 2) only."""
    return [{"params": [p for p in model.parameters() if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]


def torch_train(wl: Workload, *, steps: int, warmup: int, compile: bool = False, attn_impl: str = "auto",
                check: bool = True, seed: int = 0) -> Row:
    import torch
    from blues_torch import BluesModel

    device = torch_device()
    variant = "compile" if compile else "eager"
    mem = PeakMemory("torch", device)
    mem.reset()
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a CPU init of 1.4B parameters takes minutes
        model = BluesModel(wl.config, attn_impl=attn_impl)
    model.train()
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, seed)
    ids = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    tgt = torch.from_numpy(tgt_np).long().to(device)  # [B, T]

    checks = []
    if check:
        checks.append(check_torch_attention(wl.config, wl.batch, wl.seq, device, attn_impl))
        checks.append(check_torch_model_paths(model, ids[:1], tgt[:1], device))
        if compile:
            checks.append(check_torch_compiled_gradients(model, ids[:1], tgt[:1]))
        log(f"  checks: {'; '.join(c[1] for c in checks)}")
        mem.reset()  # the checks' transient buffers (materialised logits) are not the training step's

    optimizer = torch.optim.AdamW(torch_param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=EPS,
                                  fused=device.type == "cuda")
    if compile:
        fresh_torch_compile()
    forward = torch.compile(model) if compile else model
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    params = list(model.parameters())
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(ids, tgt, generator=gen)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)  # no host sync: the norm stays on the device
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        return None

    graphs = {}

    def count_graphs(key):
        if compile:
            from torch._dynamo.utils import counters
            graphs[key] = counters["stats"]["unique_graphs"]

    count_graphs("start")
    times = time_steps(step, lambda _: torch_sync(device), warmup=warmup, steps=steps,
                       label=f"torch {wl.name} {variant}", after_warmup=lambda: count_graphs("warm"))
    count_graphs("end")
    reading = mem.read()
    loss_values = [float(x) for x in torch.stack(losses).float().cpu()]
    checks.append(loss_check(loss_values))
    del model, optimizer, forward, losses
    notes = f"{device.type}; attn {_torch_backend(wl.config, device, attn_impl)}"
    if compile:
        # a graph compiled during the timed steps means recompilation is in the numbers
        notes += (f"; torch.compile: {graphs['warm'] - graphs['start']} graph(s) in warm-up "
                  f"({times.warmup_s[0] if times.warmup_s else 0:.0f} s first step), {graphs['end'] - graphs['warm']} during timing")
    return _train_row("torch", wl, variant, times, reading, checks, "torch", notes)


def _torch_backend(config, device, attn_impl) -> str:
    import torch
    from blues_torch.attention import resolve_attn_impl
    return resolve_attn_impl(attn_impl, device, torch.bfloat16, config.attn_logit_softcap)


def _train_row(framework, wl, variant, times, reading, checks, dense_framework, notes) -> Row:
    tokens_per_s = wl.tokens / times.median_s
    return Row(framework=framework, workload=wl.name, variant=variant, tokens_per_s=tokens_per_s,
               flops_per_token=train_flops_per_token(wl.config, wl.seq), dense_framework=dense_framework,
               step_ms=times.median_s * 1e3, spread=times.spread, peak_gib=reading.peak_gib,
               peak_exact=reading.exact, check="; ".join(c[1] for c in checks),
               check_ok=all(c[0] for c in checks), notes=notes, config=wl.describe())


# ==== JAX =============================================================================================

def jax_optimizer():
    import jax
    import optax
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731 matrices only
    return optax.chain(optax.clip_by_global_norm(GRAD_CLIP),
                       optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, mask=decay_mask))


def make_jax_train_step(model, tx, pure_state: bool = False):
    """(state, jitted step): step(state, ids, tgt) -> (state, loss), the state donated.

    pure_state: the state crosses the jit boundary as nested dicts of arrays rather than nnx.State
    (whose Variables are flattened and rebuilt in Python on every call)."""
    import jax
    from flax import nnx
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)  # no arrays held

    def step(state, ids, tgt):
        if pure_state:
            pure, state = state, jax.tree.map(lambda a: a, template)
            nnx.replace_by_pure_dict(state, pure)
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(lambda m: m(ids, tgt).loss)(model)
        optimizer.update(model, grads)
        out = nnx.state((model, optimizer))
        return (nnx.to_pure_dict(out) if pure_state else out), loss

    return (nnx.to_pure_dict(state) if pure_state else state), jax.jit(step, donate_argnums=0)


def jax_train(wl: Workload, *, steps: int, warmup: int, attn_impl: str = "auto", remat: bool = False,
              check: bool = True, seed: int = 0) -> Row:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from blues_jax import BluesModel

    mem = PeakMemory("jax")
    mem.reset()
    checks = [check_jax_attention(wl.config, wl.batch, wl.seq, attn_impl),
              check_jax_model_paths(wl.config, *random_batch(wl.config, 1, wl.seq, seed), attn_impl, seed=seed)
              ] if check else []
    if checks:
        log(f"  checks: {'; '.join(c[1] for c in checks)}")
    model = BluesModel(wl.config, rngs=nnx.Rngs(seed), attn_impl=attn_impl, remat=remat, dtype=jnp.bfloat16)
    model.train()
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, seed)
    ids, tgt = jnp.asarray(ids_np), jnp.asarray(tgt_np)
    state, step_fn = make_jax_train_step(model, jax_optimizer())
    del model  # the state holds the parameters; the donated buffers must have no other owner
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, ids, tgt).compile()
    compile_s = time.perf_counter() - t0
    planned = xla_memory_bytes(compiled)
    box = {"state": state}
    losses = []

    def step():
        box["state"], loss = compiled(box["state"], ids, tgt)
        losses.append(loss)
        return loss

    times = time_steps(step, jax_sync, warmup=warmup, steps=steps, label=f"jax {wl.name}")
    reading = mem.read()
    checks.append(loss_check([float(x) for x in jax.device_get(losses)]))
    del box, state
    notes = f"{jax.default_backend()}; attn {_jax_backend(wl.config, attn_impl)}; compile {compile_s:.0f} s"
    if planned is not None:
        notes += f"; XLA plan {planned / 1024 ** 3:.2f} GiB"
    return _train_row("jax", wl, "remat" if remat else "jit", times, reading, checks, "jax", notes)


def _jax_backend(config, attn_impl) -> str:
    import jax
    import jax.numpy as jnp
    from blues_jax.attention import resolve_attn_impl
    return resolve_attn_impl(attn_impl, jax.default_backend(), jnp.bfloat16, config.attn_logit_softcap, config.head_dim)


# ==== torch vs jax on identical weights ===============================================================

# Loss: both frameworks run their matmuls in bf16 but round in different places (torch autocast
# keeps bf16 logits, JAX float32 logits; torch's residual stream under autocast is float32, as is
# JAX's), so per-token NLLs differ by bf16 rounding (~4e-3 relative) and average out over the batch;
# 1e-2 relative allows for that. KL: logits of unit scale perturbed by ~1e-2 give a KL of ~1e-4
# nats; 1e-2 nats still flags any real disagreement (two unrelated random models are ~1 nat apart).
PARITY_LOSS_TOL, PARITY_KL_TOL = 1e-2, 1e-2


def parity_bf16(preset: str = "tiny", *, quick: bool, seed: int = 0) -> Row:
    """The same canonical weights in both models, bf16 compute, eval mode: loss and mean KL."""
    import jax
    import jax.numpy as jnp
    import torch
    from parity.convert import from_canonical, to_canonical
    from blues_torch import BluesModel

    cfg = model_config(preset, quick)
    b, t = 2, min(cfg.max_position_embeddings, 256)
    device = torch_device()
    torch.manual_seed(seed)
    with torch.device(device):
        tmodel = BluesModel(cfg)
    tmodel.eval()
    jmodel = from_canonical(to_canonical(tmodel), cfg, "jax", dtype=jnp.bfloat16)
    jmodel.eval()
    ids_np, tgt_np = random_batch(cfg, b, t, seed + 3)
    ids = torch.from_numpy(ids_np).long().to(device)
    tgt = torch.from_numpy(tgt_np).long().to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        tout = tmodel(ids, tgt)
    t_loss = float(tout.loss)
    t_logp = torch.log_softmax(tout.logits.float(), dim=-1)  # [B, T, V]
    from flax import nnx
    graphdef, state = nnx.split(jmodel)
    jout = jax.jit(lambda s, i, y: nnx.merge(graphdef, s)(i, y))(state, jnp.asarray(ids_np), jnp.asarray(tgt_np))
    j_loss = float(jout.loss)
    j_logp = torch.log_softmax(torch.from_numpy(np.asarray(jout.logits, np.float32)).to(device), dim=-1)
    kl = float((t_logp.exp() * (t_logp - j_logp)).sum(-1).mean())  # KL(torch || jax), nats per position
    agree = float((t_logp.argmax(-1) == j_logp.argmax(-1)).float().mean())
    err = abs(t_loss - j_loss) / abs(j_loss)
    ok = math.isfinite(err) and err < PARITY_LOSS_TOL and math.isfinite(kl) and kl < PARITY_KL_TOL
    check = (f"loss torch {t_loss:.4f} vs jax {j_loss:.4f} (rel {err:.1e} < {PARITY_LOSS_TOL:.0e}); "
             f"KL {kl:.1e} nats (< {PARITY_KL_TOL:.0e}); argmax agree {agree:.1%}")
    del tmodel, jmodel, tout, jout, t_logp, j_logp
    return Row(framework="torch vs jax", workload="parity bf16", variant=preset, check=check, check_ok=ok,
               notes=f"{device.type} / {jax.default_backend()}; batch {b} x {t}, eval mode, converted weights",
               config={"preset": preset, "batch": b, "seq": t, "quick": quick})

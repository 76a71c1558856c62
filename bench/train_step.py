"""Training throughput: one full optimizer step (forward, backward, clip, AdamW), both frameworks,
timed through the trainers' own step objects, so a benchmark figure is what training runs.

PyTorch: blues_torch/training.py's `TrainStep` over its `make_optimizer` (AdamW with blues/adamw.py's
constants, decay on matrices only, fused), float32 parameters (the master weights), bf16 autocast,
clipping by global norm, the non-finite guard; optionally the model under `torch.compile` (the
trainer's --compile). JAX: blues_jax/training.py's jitted step (optax AdamW, clipping, the non-finite
guard, donated state) on a one-device mesh, float32 parameters, bf16 compute, one micro-batch.

Steps are timed as the training loop runs them (blues/loop.py): each step is queued before the
previous one's losses are read, LOOP_REPS steps back to back per timed sample.

Both train on one fixed batch of uniformly random token ids (the same for the peer), so no data
loading is timed; the loss on a repeated batch must fall, which is one of the checks. Before the
timing, the fast paths are checked against the reference ones on the same shapes (bench/checks.py):
the attention backend against the reference attention, and the whole model's layers, routing,
loss and gradients with the fast paths (compiled, in PyTorch's compile row) against the reference
paths.

Each framework (torch, JAX, and their packages) is imported inside the functions that use it: a
bench run picks its frameworks (--framework), and JAX must not reserve GPU memory in a torch-only run.
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

LR, WEIGHT_DECAY, GRAD_CLIP = 1e-3, 0.1, 1.0  # the bench's optimizer settings (betas, eps: blues/adamw.py)
LOOP_REPS = 4  # training steps per timed sample, back to back (bench.timing.time_steps)


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
    training run compiles, and measures differently."""
    import torch
    torch._dynamo.reset()




def torch_train(wl: Workload, *, steps: int, warmup: int, compile: bool = False, attn_impl: str = "auto",
                check: bool = True, seed: int = 0, cuda_graph: bool = False) -> Row:
    """cuda_graph: the step replayed from one CUDA graph (train_torch.py --cuda_graph), captured in
    the last warm-up step."""
    import torch
    from blues_torch import BluesModel
    from blues_torch.distributed import Dist
    from blues_torch.step_graph import GraphedTrainStep
    from blues_torch.training import TrainStep, compiled_graphs, make_optimizer

    device = torch_device()
    variant = ("compile" if compile else "eager") + (" cuda graph" if cuda_graph else "")
    if cuda_graph and device.type != "cuda":
        return Row(framework="torch", workload=wl.name, variant=variant, skipped="a CUDA graph needs a CUDA GPU",
                   config=wl.describe())
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

    optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, device=device)
    if compile:
        fresh_torch_compile()
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    train_step = TrainStep(model, optimizer, dist=Dist(False), grad_clip=GRAD_CLIP, precision="bf16", gen=gen,
                           compile=compile)
    if cuda_graph:
        train_step = GraphedTrainStep(train_step, warmup=max(warmup - 1, 1))
    pending = []

    def step():
        pending.append(train_step([(ids, tgt)], LR))  # the trainer's step, queued as the loop queues it
        if len(pending) > 1:
            pending[-2].read()  # the loop reads a step's losses once the next step is queued

    graphs = {}

    def count_graphs(key):
        if compile:
            graphs[key] = compiled_graphs()

    count_graphs("start")
    times = time_steps(step, lambda _: torch_sync(device), warmup=warmup, steps=steps, reps=LOOP_REPS,
                       label=f"torch {wl.name} {variant}", after_warmup=lambda: count_graphs("warm"))
    count_graphs("end")
    reading = mem.read()
    checks.append(loss_check([p.read()[0][0] for p in pending]))
    del model, optimizer, train_step, pending
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

def make_jax_train_step(config: BluesConfig, *, seed: int = 0, attn_impl: str = "auto", remat: bool = False,
                        scan_layers: bool = False):
    """blues_jax/training.py's step and state on a one-device mesh, bf16 compute, the bench's optimizer
    settings: (state, step, batch sharding); `step(*state, inputs [1, B, T], targets [1, B, T], lr,
    inject_nan)` -> (*state, metrics), the state (params, opt_state, rng) donated."""
    import jax
    import jax.numpy as jnp
    from blues_jax import training
    from blues_jax.sharding import make_mesh

    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    graphs, tx, shardings, params, opt_state, rng = training.build_train_state(
        config, mesh, seed=seed, dtype=jnp.bfloat16, lr=LR, weight_decay=WEIGHT_DECAY, attn_impl=attn_impl,
        remat=remat, scan_layers=scan_layers)
    step = training.make_train_step(graphs[0], tx, shardings, grad_accum=1, grad_clip=GRAD_CLIP,
                                    weight_decay=WEIGHT_DECAY)
    return (params, opt_state, rng), step, shardings["micro_batches"]


def jax_step_inputs(config: BluesConfig, batch: int, seq: int, sharding, seed: int = 0):
    """The bench's fixed batch as the step's arguments after the state: (inputs, targets, lr, inject_nan)."""
    import jax

    ids, tgt = random_batch(config, batch, seq, seed)
    return (jax.device_put(ids[None], sharding), jax.device_put(tgt[None], sharding), np.float32(LR),
            np.bool_(False))


def jax_train(wl: Workload, *, steps: int, warmup: int, attn_impl: str = "auto", remat: bool = False,
              scan_layers: bool = False, check: bool = True, seed: int = 0) -> Row:
    import jax

    mem = PeakMemory("jax")
    mem.reset()
    checks = [check_jax_attention(wl.config, wl.batch, wl.seq, attn_impl),
              check_jax_model_paths(wl.config, *random_batch(wl.config, 1, wl.seq, seed), attn_impl, seed=seed)
              ] if check else []
    if checks:
        log(f"  checks: {'; '.join(c[1] for c in checks)}")
    state, step_fn, sharding = make_jax_train_step(wl.config, seed=seed, attn_impl=attn_impl, remat=remat,
                                                   scan_layers=scan_layers)
    inputs = jax_step_inputs(wl.config, wl.batch, wl.seq, sharding, seed)
    t0 = time.perf_counter()
    compiled = step_fn.lower(*state, *inputs).compile()
    compile_s = time.perf_counter() - t0
    planned = xla_memory_bytes(compiled)
    box = {"state": state}
    del state  # donated to the first step: the box holds the only references
    losses = []

    def step():
        *box["state"], out = compiled(*box["state"], *inputs)
        losses.append(out["losses"][0])
        if len(losses) > 1:
            float(losses[-2])  # the loop reads a step's losses once the next step is queued
        return out["losses"][0]

    times = time_steps(step, jax_sync, warmup=warmup, steps=steps, reps=LOOP_REPS, label=f"jax {wl.name}")
    reading = mem.read()
    checks.append(loss_check([float(x) for x in jax.device_get(losses)]))
    del box
    notes = f"{jax.default_backend()}; attn {_jax_backend(wl.config, attn_impl)}; compile {compile_s:.0f} s"
    if planned is not None:
        notes += f"; XLA plan {planned / 1024 ** 3:.2f} GiB"
    variant = ("scan" if scan_layers else "jit") + (" remat" if remat else "")
    return _train_row("jax", wl, variant, times, reading, checks, "jax", notes)


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

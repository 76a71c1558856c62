"""The torchtitan peer: PyTorch's own MoE training stack at Blues' shapes, in the same run.

torchtitan 0.2.2 (TORCHTITAN_VERSION), its Qwen3-MoE model family: the one of its MoE families
with grouped-query attention at a free head count and tied embeddings. The model comes from
Blues' config (d, L, H x Dh, K KV heads, E experts top-k, F = d * multiplier as each expert's
width, V, tied embeddings, RoPE theta, RMSNorm eps, the batch's sequence length) and is built and
trained the way torchtitan's single-GPU trainer (torchtitan/train.py) does it:

- built on the meta device, `to_empty` on the GPU, `init_weights()`: its initialisation;
- `parallelize_qwen3` with a one-device ParallelDims: on one GPU that applies its per-block
  compile and nothing else (no FSDP, TP, EP or CP at world size 1). `apply_compile` compiles each
  part of an MoE block on its own (attention, norms, the router; fullgraph=True), leaves the
  experts' module eager and compiles their grouped-GEMM function instead;
- experts through `torch._grouped_mm` (MoEArgs.use_grouped_mm, its default) with its token
  padding to groups of 8;
- its loss, `build_cross_entropy_loss` (sum reduction, compiled as the "loss" compile component
  of its default), divided by the number of valid tokens as train.py does;
- its mixed precision on one device, `maybe_enable_amp`: bf16 autocast over float32 parameters
  (float32 master weights), and `build_optimizers`: AdamW, implementation "fused";
- its clip, `dist_utils.clip_grad_norm_(..., foreach=True)`, max_norm 1.0.

Deviations, each on purpose:
- torchtitan 0.2.2, not 0.3.0: 0.3.0 imports `torch.distributed.fsdp.DataParallelMeshDims` (and
  its spmd_types 0.2.3 `torch.distributed._mesh_layout._FlatLayout`) at module level, which
  torch 2.11 (the GPU image) lacks; 0.2.2 is the newest release that imports there.
- Qwen3's architecture, not Blues': SwiGLU experts (SiLU; Blues: gated GeLU), q/k RMSNorm on the
  heads, no post norms, softmax router with top-k weights renormalised (route_norm), no router
  aux or z-loss, no router noise; these cost little and are noted, not emulated.
- Activation checkpointing off (its default is selective, every second block): Blues and the
  Hugging Face peer recompute nothing, and one batch fits the GPU without it.
- No learning-rate schedule (its default warms up linearly from ~0 over 200 steps, in which a few
  steps learn nothing): a constant lr, Blues' bench lr (bench.train_step.LR), betas (0.9, 0.95),
  eps 1e-8 and weight decay 0.1 are torchtitan's own defaults and Blues'.
- The auxiliary-loss-free load balancing bias is never updated: the Qwen3 train spec builds its
  optimizer with `build_optimizers`, without torchtitan's balancing hook (as torchtitan does).
- No data loader, tokenizer, checkpointer or metrics: the same fixed random batch as every Blues
  row (inputs and next-token labels), so only the training step is timed.
- On a CPU (tests, --quick) only: experts run torchtitan's for-loop path (MoEArgs.use_grouped_mm
  False; its grouped path pads token groups with a Triton kernel), nothing is compiled, and
  `torch.histc`, which its router uses to count tokens per expert and which has no CPU kernel for
  int64, counts a float32 copy of the expert ids (the same counts) while the step runs.

torchtitan and the packages it imports that the GPU image lacks are carried as wheels
(scripts/gpu_peers.sh); torchtitan stays an optional import, so the module imports it inside
its functions. The wheel set for the GPU image (torchtitan's imports that the image lacks, the
library-kernel peers and DeepSpeed; found by importing this module with nothing else installed),
built from the repository root:

    ../shared/tools/device-wheels torchtitan==0.2.2 tyro docstring-parser shtab typeguard torchdata \
        datasets multiprocess dill liger-kernel cut-cross-entropy
"""
from __future__ import annotations

import contextlib

from blues.config import BluesConfig
from bench.report import Row
from bench.timing import PeakMemory, log, time_steps, torch_sync
from bench.train_step import (GRAD_CLIP, LOOP_REPS, LR, Workload, _train_row, fresh_torch_compile, loss_check,
                              random_batch, torch_device)

TORCHTITAN_VERSION = "0.2.2"
VARIANT = f"torchtitan {TORCHTITAN_VERSION}"

def torchtitan_available() -> str | None:
    """None if torchtitan's Qwen3 model imports, else why not (one line)."""
    try:
        import importlib.metadata
        from torchtitan.models.qwen3 import Qwen3Model  # noqa: F401
        version = importlib.metadata.version("torchtitan")
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"torchtitan is not importable ({type(e).__name__}: {first}); scripts/gpu_peers.sh carries it as wheels"
    if version != TORCHTITAN_VERSION:
        return f"torchtitan {version} is installed; this peer is written against {TORCHTITAN_VERSION}"
    return None


def titan_args(cfg: BluesConfig, seq: int, grouped_mm: bool = True):
    """Qwen3ModelArgs (MoE) with Blues' sizes; the router settings of torchtitan's Qwen3-MoE flavours."""
    from torchtitan.models.moe import MoEArgs
    from torchtitan.models.qwen3 import Qwen3ModelArgs
    return Qwen3ModelArgs(
        vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=cfg.num_layers, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_dim=cfg.expert_hidden_size,
        norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, qk_norm=True, max_seq_len=seq,
        enable_weight_tying=True, moe_enabled=True, moe_inter_dim=cfg.expert_hidden_size,
        moe_args=MoEArgs(num_experts=cfg.tot_num_experts, num_shared_experts=0, top_k=cfg.chosen_num_experts,
                         score_func="softmax", route_norm=True, route_scale=1.0, score_before_experts=False,
                         use_grouped_mm=grouped_mm))


def job_config(seq: int, compile: bool, fused: bool):
    """torchtitan's JobConfig defaults, with the deviations of the module docstring."""
    from torchtitan.config import JobConfig
    jc = JobConfig()
    jc.training.seq_len = seq
    jc.training.max_norm = GRAD_CLIP
    jc.compile.enable = compile  # components: its default ["model", "loss"]
    jc.activation_checkpoint.mode = "none"
    jc.optimizer.lr = LR
    jc.optimizer.implementation = "fused" if fused else "foreach"  # fused AdamW is CUDA-only
    return jc


def single_device():
    """ParallelDims of one device: no data, tensor, context, pipeline or expert parallelism."""
    from torchtitan.distributed import ParallelDims
    return ParallelDims(dp_shard=-1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)


def build_titan(cfg: BluesConfig, seq: int, device, jc, dims):
    """train.py's model path: meta-device build, parallelize_fn, to_empty, init_weights."""
    import torch
    from torchtitan.models.qwen3 import Qwen3Model, parallelize_qwen3
    args = titan_args(cfg, seq, grouped_mm=device.type == "cuda")
    with torch.device("meta"):
        model = Qwen3Model(args)
    model = parallelize_qwen3(model, dims, jc)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return model


@contextlib.contextmanager
def cpu_int_histc(device):
    """On a CPU only: torch.histc of integer input counts a float32 copy (see the module docstring)."""
    import torch
    if device.type != "cpu":
        yield
        return
    original = torch.histc

    def histc(x, bins=100, min=0, max=0, **kwargs):
        if x.device.type == "cpu" and not x.is_floating_point():
            return original(x.float(), bins=bins, min=min, max=max, **kwargs).to(x.dtype)
        return original(x, bins=bins, min=min, max=max, **kwargs)

    torch.histc = histc
    try:
        yield
    finally:
        torch.histc = original


def describe(model, cfg: BluesConfig, compiled: bool) -> str:
    n = sum(p.numel() for p in model.parameters())
    tied = model.output.weight is model.tok_embeddings.weight
    return (f"qwen3-moe {n / 1e6:.1f}M params (Blues {cfg.num_parameters() / 1e6:.1f}M); "
            f"{'tied' if tied else 'UNTIED'} head; attn {model.model_args.attn_type}; "
            f"experts {'grouped_mm' if model.model_args.moe_args.use_grouped_mm else 'for-loop'}; "
            f"{'per-block compile' if compiled else 'eager'}")


def titan_train(wl: Workload, *, steps: int, warmup: int, compile: bool = True, seed: int = 0) -> Row:
    reason = torchtitan_available()
    variant = VARIANT + (" compile" if compile else " eager")
    if reason is not None:
        return Row(framework="peer", workload=wl.name, variant=variant, skipped=reason, config=wl.describe())
    import torch
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.distributed import utils as dist_utils

    device = torch_device()
    compile = compile and device.type == "cuda"  # on a CPU: eager (module docstring)
    variant = VARIANT + (" compile" if compile else " eager")
    torch.manual_seed(seed)
    fresh_torch_compile()  # no graphs of an earlier preset in this process
    mem = PeakMemory("torch", device)
    mem.reset()
    jc = job_config(wl.seq, compile, fused=device.type == "cuda")
    dims = single_device()
    model = build_titan(wl.config, wl.seq, device, jc, dims)
    desc = describe(model, wl.config, compile)
    log(f"  torchtitan: {desc}")
    loss_fn = build_cross_entropy_loss(jc)
    optimizers = build_optimizers([model], jc.optimizer, dims)
    amp = dist_utils.maybe_enable_amp(dims, jc.training.mixed_precision_param, device.type)
    ids_np, tgt_np = random_batch(wl.config, wl.batch, wl.seq, seed)
    inputs = torch.from_numpy(ids_np).long().to(device)  # [B, T]
    labels = torch.from_numpy(tgt_np).long().to(device)  # [B, T]
    valid_tokens = (labels != -100).sum().float()  # train.py's global_valid_tokens on one device
    params = list(model.parameters())
    losses = []

    def step():
        optimizers.zero_grad()
        with amp:
            pred = model(inputs)  # [B, T, V]
            loss = loss_fn(pred, labels) / valid_tokens
        del pred  # as train.py: free the logits before the backward
        loss.backward()
        dist_utils.clip_grad_norm_(params, jc.training.max_norm, foreach=True, pp_mesh=None, ep_enabled=False)
        optimizers.step()
        losses.append(loss.detach())
        return None

    with cpu_int_histc(device):
        times = time_steps(step, lambda _: torch_sync(device), warmup=warmup, steps=steps, reps=LOOP_REPS,
                           label=f"peer {wl.name} {variant}")
    reading = mem.read()
    # No initial-loss check as the Hugging Face peer's: its tied head is re-initialised at std
    # d^-1/2 over unit-std embeddings, so the first loss sits 0.5-1.5 above ln V depending on d.
    checks = [loss_check([float(x) for x in torch.stack(losses).float().cpu()])]
    del model, optimizers, losses
    notes = f"{device.type}; {desc}"
    if times.warmup_s:
        notes += f"; first step {times.warmup_s[0]:.1f} s"
    return _train_row("peer", wl, variant, times, reading, checks, "torch", notes)

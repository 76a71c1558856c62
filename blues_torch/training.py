"""The PyTorch training step: optimizer, gradient accumulation, clipping, the non-finite guard, compile
and the DeepSpeed engine. train_torch.py's loop (blues/loop.py) and the benchmark (bench/train_step.py)
run this same `TrainStep`, so a benchmark figure is what training runs.

Optimizer: AdamW (blues/adamw.py: betas, eps, decay on matrices only); the learning rate from
blues/schedule.py is set on the param groups before each update; gradients are clipped by global norm
(`grad_norm` is the norm before clipping); gradient accumulation averages the micro-batch losses. bf16:
autocast over float32 weights (plain, and DeepSpeed's torch_autocast, whose engine enters the autocast
in its own forward) or DeepSpeed's bf16 mode, a bf16 module with float32 master weights in the ZeRO
optimizer (`precision_mode`). A non-finite loss or gradient norm skips the update. DeepSpeed is
imported only when a run uses it.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default_cache_dir

from blues.adamw import BETAS, EPS, decays
from blues.data import default_cache_dir, eval_batches
from blues.train_args import TrainArgs
from blues.train_loop import EvalAccumulator
from blues_torch import deepspeed_skip
from blues_torch.distributed import Dist
from blues_torch.expert_parallel import ParallelLayout, clip_grad_norm_, optimizer_param_groups, reduce_gradients

def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (blues.adamw.decays); RMSNorm scales are not decayed."""
    params = list(model.parameters())
    return [{"params": [p for p in params if decays(p.ndim)], "weight_decay": weight_decay},
            {"params": [p for p in params if not decays(p.ndim)], "weight_decay": 0.0}]


def make_optimizer(model, *, lr: float, weight_decay: float, device) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=BETAS, eps=EPS,
                             fused=torch.device(device).type in ("cuda", "cpu"))


def make_engine(model, ds_config: dict, weight_decay: float, layout: ParallelLayout | None = None):
    """The DeepSpeed engine (and its optimizer) over train_torch.py's param groups; under expert
    parallelism the expert parameters get DeepSpeed's MoE groups (blues_torch/deepspeed_moe.py)."""
    import deepspeed

    from blues_torch import deepspeed_moe, deepspeed_norms

    deepspeed_norms.install()  # ZeRO's per-gradient norm/overflow loops cost ~60 ms of host time a step
    deepspeed_skip.install()  # ZeRO's step decides its skip on the device, not by reading the norm
    groups = param_groups(model, weight_decay)
    if layout is None or layout.expert_group is None:
        engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, model_parameters=groups)
    else:
        with deepspeed_moe.engine_sees_experts(model.config):
            engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                                           model_parameters=optimizer_param_groups(groups, layout))
    return engine, optimizer


def skips_on_device(optimizer) -> bool:
    """Whether a DeepSpeed engine's optimizer decides its skips on the device (deepspeed_skip.py)."""
    return deepspeed_skip.installed() and deepspeed_skip.decides_on_device(optimizer)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def to_device(batch, device):
    x, y = batch
    return (torch.from_numpy(x).to(device, non_blocking=True).long(),  # [B, T]
            torch.from_numpy(y).to(device, non_blocking=True).long())  # [B, T]


def compile_for_training(model) -> None:
    """--compile: torch.compile each transformer block of the training forward (BluesModel.compile_blocks:
    one graph that every block shares; DeepSpeed's engine runs the same module, so no engine.compile()).
    Evaluation and sampling stay eager. `fallback_random` makes compiled dropout draw the same numbers
    as eager from the same RNG state, so the run's random streams, checkpoints and exact resume mean
    what they mean in eager mode. Compiled graphs are kept on disk (use_compile_cache)."""
    torch._inductor.config.fallback_random = True
    model.compile_blocks()


def use_compile_cache() -> Path:
    """Keep torch.compile's on-disk caches (inductor's FX graph and AOTAutograd caches, the Triton
    kernels it generates) in BLUES_CACHE/inductor, beside JAX's BLUES_CACHE/xla, rather than in
    torch's /tmp/torchinductor_$USER, so a repeated or resumed run loads its compiled graphs instead
    of compiling them. A TORCHINDUCTOR_CACHE_DIR of the user's wins. Inductor reads the variable on
    every cache access; importing torch._dynamo writes torch's default into it, which counts as unset.
    Returns the directory."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, "", os.path.abspath(inductor_default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str((default_cache_dir() / "inductor").absolute())
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def compile_cache_hits() -> tuple[int, int]:
    """(hits, misses) of inductor's on-disk FX graph cache in this process so far."""
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


# precision_mode's answers: what the module's weights are and whether its forward runs under autocast
PRECISION_MODES = {
    "fp32": "float32",
    "autocast": "bf16 autocast over float32 weights",
    "torch_autocast": "torch_autocast (bf16 autocast over float32 weights)",
    "bf16_module": "bf16 module (float32 master weights in ZeRO)",
}


def precision_mode(precision: str, engine) -> str:
    """A key of PRECISION_MODES. Under DeepSpeed the engine's config decides (blues_torch/deepspeed_config.py
    wrote it from --precision and the file)."""
    if engine is None:
        return "autocast" if precision == "bf16" else "fp32"
    if engine.torch_autocast_enabled():
        return "torch_autocast"
    return "bf16_module" if engine.bfloat16_enabled() else "fp32"


def autocast_for(precision: str, device, engine) -> contextlib.AbstractContextManager:
    """The autocast a direct call of the module needs (the plain step, evaluation, samples): bf16 over
    float32 weights in the modes that train that way, none for fp32 or a bf16 module. The engine's own
    forward enters DeepSpeed's torch_autocast itself (deepspeed/runtime/torch_autocast.py,
    autocast_if_enabled), so TrainStep calls the engine without this."""
    if precision_mode(precision, engine) in ("autocast", "torch_autocast"):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StepValues:
    """A launched optimizer step's numbers, still on the device: `read()` waits for them and returns
    (values, applied), values = [loss, lm_loss, aux_loss, z_loss, *flags, grad_norm] as floats, each a
    mean over micro-batches and ranks; applied: whether the update happened. Reading is the step's one
    host synchronisation, so the training loop can queue the next step before it reads this one."""

    def __init__(self, values: torch.Tensor | list[float], applied: torch.Tensor | bool):
        self._values, self._applied = values, applied  # [4 + flags + 1] and [] bool, or host values

    def read(self) -> tuple[list[float], bool]:
        if isinstance(self._values, torch.Tensor):
            host = torch.cat([self._values, self._applied.float().reshape(1)]).tolist()
            self._values, self._applied = host[:-1], host[-1] > 0
        return self._values, self._applied


class TrainStep:
    """One optimizer step over `grad_accum` micro-batches: `step(batches, lr, inject_nan, flags)` ->
    StepValues (`flags`: per-rank numbers averaged with the losses in the same all-reduce, e.g. stop
    signals). Nothing in it waits for the device (`apply_update`; DeepSpeed's ZeRO step as
    blues_torch/deepspeed_skip.py runs it) unless `waits_on_host`: a DeepSpeed step that reads its
    gradient norm on the host (another optimizer or configuration)."""

    def __init__(self, model, optimizer, *, dist: Dist, grad_clip: float, precision: str, gen,
                 engine=None, compile: bool = False, layout: ParallelLayout | None = None):
        self.model, self.optimizer, self.engine, self.dist, self.gen = model, optimizer, engine, dist, gen
        self.precision = precision
        self.layout = layout  # several plain ranks (torchrun): gradients reduced by expert_parallel's rules
        self.forward = engine if engine is not None else model
        # the engine applies its torch_autocast in its forward; the module called directly needs ours
        self.autocast = (contextlib.nullcontext if engine is not None
                         else lambda: autocast_for(precision, dist.device, None))
        if compile:
            compile_for_training(model)
        self.max_norm = grad_clip if grad_clip > 0 else float("inf")
        self.params = list(model.parameters())
        self.waits_on_host = engine is not None and not skips_on_device(engine.optimizer)

    def __call__(self, batches, lr: float, inject_nan: bool = False, flags=()) -> StepValues:
        g = len(batches)
        set_lr(self.optimizer, lr)
        sums = torch.zeros(4 + len(flags), dtype=torch.float32, device=self.dist.device)  # losses, flags
        for x, y in batches:  # [B, T] each
            with self.autocast():
                out = self.forward(x, y, generator=self.gen)
            loss = out.loss * float("nan") if inject_nan else out.loss  # test hook: --inject_nan
            sums[:4] += torch.stack([loss.detach(), out.lm_loss.detach(), out.aux_loss.detach(),
                                     out.z_loss.detach()]).float()
            if self.engine is None:
                (loss / g).backward()
            else:
                self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
                self.engine.step()  # applies the update only at the accumulation boundary
        if isinstance(flags, torch.Tensor):  # [F] on the device (blues_torch/step_graph.py: read in the graph)
            sums[4:] = flags * g
        else:
            for i, flag in enumerate(flags):
                sums[4 + i] = float(flag) * g
        reduced = self.dist.mean(sums / g)
        if self.engine is not None and not self.waits_on_host:  # deepspeed_skip's step: flags on the device
            norm = self.engine.get_global_grad_norm()  # [] (+inf when skipped)
            skipped = self.engine.optimizer.skipped_on_device  # []
            return StepValues(torch.cat([reduced, norm.float().reshape(1).to(reduced.device)]),
                              ~skipped.to(reduced.device))
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            values = reduced.tolist() + [float("nan") if norm is None else float(norm)]
            return StepValues(values, self.engine.was_step_applied())
        if self.layout is not None and self.layout.world_size > 1:
            reduce_gradients(self.model, self.layout)
            grad_norm = clip_grad_norm_(self.model, self.layout, self.max_norm)  # norm before clipping
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        return apply_update(self.optimizer, torch.cat([reduced, grad_norm.float().reshape(1)]))


def apply_update(optimizer, values: torch.Tensor) -> StepValues:
    """The optimizer update after backward and clipping, skipped when the loss (values[0]) or the
    gradient norm (values[-1]) is not finite; then the gradients are cleared. make_optimizer's fused
    AdamW skips on the device (its `found_inf`, the flag GradScaler hands it: weights, moments and
    step count stay as they were), so nothing here waits for the device; any other optimizer is
    guarded on the host."""
    finite = values[0].isfinite() & values[-1].isfinite()  # []
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()  # 1: the fused kernel leaves everything as it is
        optimizer.step()
    else:
        host = values.tolist()
        if math.isfinite(host[0]) and math.isfinite(host[-1]):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepValues(values, finite)


def evaluate(model, val_tokens, args: TrainArgs, dist: Dist, autocast) -> EvalAccumulator:
    """Token-weighted validation loss and expert utilization over `--eval_batches` batches, one
    forward per batch: the loss is computed chunk by chunk, as in training (no [B, T, V] logits)."""
    cfg = args.model_config
    acc = EvalAccumulator()
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)  # loss * tokens, tokens
    counts = torch.zeros(cfg.num_layers, cfg.tot_num_experts, dtype=torch.float64, device=dist.device)
    dropped = torch.zeros(cfg.num_layers, dtype=torch.float64, device=dist.device)
    with torch.no_grad(), autocast():
        for batch in eval_batches(val_tokens, args.seq_len, args.batch_size, args.eval_batches, rank=dist.rank,
                                  world_size=dist.world_size, vocab_size=cfg.vocab_size):
            x, y = to_device(batch, dist.device)  # [B, T] each
            out = model(x, y, return_logits=False)
            n = y.numel()
            totals += torch.stack([out.lm_loss.double() * n, torch.tensor(n, dtype=torch.float64, device=dist.device)])
            counts += out.expert_counts.double()
            dropped += out.dropped.double()
    if dist.world_size > 1:
        for t in (totals, counts, dropped):
            torch.distributed.all_reduce(t)
    acc.update(totals[0].item() / max(totals[1].item(), 1.0), int(totals[1].item()),
               counts.cpu().numpy(), dropped.cpu().numpy())
    model.train(was_training)
    return acc


def make_next_logits(model, dist: Dist, autocast, window: int):
    """Next-token logits for the samples (blues.train_loop.sample_continuations): `next_logits(rows)`,
    one id array per continuation, -> [rows, V]. Every forward has the shape [rows, window] (ids
    left-aligned, zero-padded; blues.train_loop.sample_window), as blues_jax's NextLogits. Every
    rank runs the forward (its MoE layers exchange tokens) and takes rank 0's logits, so every rank
    samples the same tokens and stops at the same length."""
    def next_logits(rows: list[np.ndarray]) -> np.ndarray:
        buf = torch.zeros(len(rows), window, dtype=torch.long)  # [R, window]
        for i, ids in enumerate(rows):
            buf[i, :len(ids)] = torch.from_numpy(ids)
        last = torch.tensor([len(ids) - 1 for ids in rows], device=dist.device)  # [R]
        was_training = model.training
        model.eval()
        with torch.no_grad(), autocast():
            out = model(buf.to(dist.device))  # logits [R, window, V]
        model.train(was_training)
        logits = out.logits[torch.arange(len(rows), device=dist.device), last].float().contiguous()  # [R, V]
        if dist.world_size > 1:
            torch.distributed.broadcast(logits, src=0)
        return logits.cpu().numpy()

    return next_logits

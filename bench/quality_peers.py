"""The peers of time to quality (bench/time_to_quality.py) as trainers: the transformers Mixtral of
bench/peer.py and the torchtitan Qwen3-MoE of bench/peer_torchtitan.py, trained by Blues' own loop
(blues/loop.py) with `train_torch.py`'s flags, so everything but the model is Blues':

    python -m bench.quality_peers --peer hf --compile <train_torch.py flags>
    python -m bench.quality_peers --peer titan --compile <train_torch.py flags>

- data: `prepare_data` and `BatchIterator` with the run's seed, sequence length and batch: the same
  token stream, batch by batch, as `train_torch.py` and `train_jax.py` read with the same flags;
- optimizer: blues_torch/training.py's `make_optimizer` (AdamW with blues/adamw.py's betas and eps,
  weight decay on matrices only, fused), the learning rate of each step from blues/schedule.py (the
  loop sets it), gradients clipped to `--grad_clip` by global norm (torchtitan: its own
  `clip_grad_norm_`), float32 parameters under bf16 autocast (`--precision bf16`), a non-finite step
  skipped as Blues skips it;
- evaluation: every `--eval_every` steps and at the end, the token-weighted mean loss over the
  windows of `blues.data.eval_batches` (the validation windows the trainers score, in the same
  batches), written to DIR/metrics.jsonl in the trainers' record format (blues/metrics.py), so one
  reader serves every row. Each batch is one forward (Blues' trainers cut it into forwards of 1,024
  tokens to bound the logits' memory);
- `--max_minutes` and SIGTERM end the run as they end a trainer's (the loop's rules).

What is the peer's own: the model and its initialisation; transformers: its loss (`labels` with
`shift_labels` = the targets, so every one of the T positions is scored, as in Blues) plus its
router load-balancing loss at Blues' coefficient, `torch.compile(model)` with --compile;
torchtitan: its loss (sum reduction over the valid tokens), its per-block compile with --compile (on
a GPU; eager on a CPU), its clipping function. Deviations from the bench's peer rows (bench/peer.py,
bench/peer_torchtitan.py), each to match Blues' recipe: float32 master weights under autocast for the
transformers model (its bench row trains bf16 weights), Blues' optimizer groups and schedule for
torchtitan (its `build_optimizers` decays every parameter, the RMSNorm scales too, and warms up
from ~0). Neither architecture has Blues' residual dropout, so `--config '{"dropout": ...}'` changes
nothing in a peer. Nothing is checkpointed (`--save_every` is ignored); the run directory holds
metrics.jsonl and peer.json (the model's description).
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from bench.peer import build_peer, describe as describe_hf, transformers_available
from bench.peer_torchtitan import (build_titan, cpu_int_histc, describe as describe_titan, job_config, single_device,
                                   torchtitan_available)
from bench.train_step import torch_device
from blues import loop
from blues.cli import ArgumentParser, run_main
from blues.config import BluesConfig
from blues.data import BatchIterator, eval_batches, prepare_data
from blues.errors import UsageError
from blues.loop import StepResult
from blues.metrics import MetricsLogger
from blues.train_args import TrainArgs, parse_args
from blues.train_loop import BadStepGuard, GracefulStop, TimeBudget, log, reuse_freed_host_memory
from blues_torch.training import apply_update, autocast_for, make_optimizer, set_lr, to_device

PEERS = ("hf", "titan")
PROG = "python -m bench.quality_peers"


class HFPeer:
    """transformers' MixtralForCausalLM (bench/peer.py's build, float32 parameters)."""

    def __init__(self, cfg: BluesConfig, device, compile: bool):
        self.model = build_peer(cfg, device, dtype=torch.float32)
        self.forward = torch.compile(self.model) if compile else self.model
        self.aux_coef = cfg.router_aux_loss_coef
        self.params = list(self.model.parameters())
        self.description = describe_hf(self.model, cfg) + ("; torch.compile(model)" if compile else "; eager")

    def train_losses(self, x, y):
        """(loss, lm loss, router aux loss) of a batch; x, y [B, T]."""
        out = self.forward(input_ids=x, labels=y, shift_labels=y, output_router_logits=True)
        return out.loss, out.loss - self.aux_coef * out.aux_loss, out.aux_loss

    def loss_sum(self, x, y):
        """Summed next-token loss of a batch (no auxiliary term)."""
        return self.forward(input_ids=x, labels=y, shift_labels=y).loss.double() * y.numel()

    def clip(self, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm)


class TitanPeer:
    """torchtitan's Qwen3-MoE (bench/peer_torchtitan.py's build: its init, its per-block compile)."""

    def __init__(self, cfg: BluesConfig, seq: int, device, compile: bool):
        from torchtitan.components.loss import build_cross_entropy_loss
        from torchtitan.distributed import utils as dist_utils

        compile = compile and device.type == "cuda"  # on a CPU: eager (bench/peer_torchtitan.py)
        jc = job_config(seq, compile, fused=device.type == "cuda")
        self.model = build_titan(cfg, seq, device, jc, single_device())
        self.loss_fn = build_cross_entropy_loss(jc)  # summed over the tokens
        self.dist_utils = dist_utils
        self.params = list(self.model.parameters())
        self.description = describe_titan(self.model, cfg, compile)

    def train_losses(self, x, y):
        loss = self.loss_fn(self.model(x), y) / y.numel()  # as its train.py: the sum over the valid tokens
        return loss, loss, torch.zeros_like(loss)

    def loss_sum(self, x, y):
        return self.loss_fn(self.model(x), y).double()

    def clip(self, max_norm: float):
        return self.dist_utils.clip_grad_norm_(self.params, max_norm, foreach=True, pp_mesh=None, ep_enabled=False)


class PeerTrainer:
    """blues.loop's Trainer for a peer: the step, evaluation (logged) and no checkpoints."""

    def __init__(self, peer, optimizer, train_iter: BatchIterator, val_tokens, args: TrainArgs, device,
                 metrics: MetricsLogger, budget: TimeBudget):
        self.peer, self.optimizer, self.train_iter, self.val_tokens = peer, optimizer, train_iter, val_tokens
        self.args, self.device, self.metrics, self.budget = args, device, metrics, budget
        self.max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")
        self.run_ahead = True  # one process, as Blues' own rows (blues/loop.py)

    def autocast(self):
        return autocast_for(self.args.precision, self.device, None)

    def launch(self, lr: float, inject_nan: bool) -> Callable[[], StepResult]:
        g = self.args.grad_accum
        set_lr(self.optimizer, lr)
        sums = torch.zeros(3, dtype=torch.float32, device=self.device)  # loss, lm loss, aux loss
        for _ in range(g):
            x, y = to_device(next(self.train_iter), self.device)  # [B, T] each
            with self.autocast():
                loss, lm_loss, aux_loss = self.peer.train_losses(x, y)
            if inject_nan:
                loss = loss * float("nan")
            (loss / g).backward()
            sums += torch.stack([loss.detach(), lm_loss.detach(), aux_loss.detach()]).float()
        grad_norm = self.peer.clip(self.max_norm)  # the norm before clipping
        pending = apply_update(self.optimizer, torch.cat([sums / g, grad_norm.float().reshape(1)]))
        out_of_time = self.budget.expired()

        def wait() -> StepResult:
            values, applied = pending.read()
            return StepResult(values[:3] + [0.0], values[3], applied, out_of_time=out_of_time)
        return wait

    def evaluate(self, step: int) -> float:
        model = self.peer.model
        model.eval()
        total, tokens = torch.zeros((), dtype=torch.float64, device=self.device), 0
        with torch.no_grad(), self.autocast():
            for batch in eval_batches(self.val_tokens, self.args.seq_len, self.args.batch_size,
                                      self.args.eval_batches, vocab_size=self.args.model_config.vocab_size):
                x, y = to_device(batch, self.device)  # [B, T] each
                total += self.peer.loss_sum(x, y)
                tokens += y.numel()
        model.train()
        val_loss = total.item() / tokens
        self.metrics.log_eval(step=step, val_loss=val_loss, experts=[])
        self.metrics.flush()
        log(f"step {step}: val loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 700)):.1f})")
        return val_loss

    def save(self, step: int) -> None:
        pass  # a timing run: nothing to resume

    def after_step(self) -> None:
        pass


def unsupported(args: TrainArgs) -> str | None:
    """The first train_torch.py flag given that a peer run cannot honour, or None."""
    for flag, given in (("--deepspeed", args.deepspeed is not None), ("--expert_parallel", args.expert_parallel != 1),
                        ("--resume", args.resume is not None), ("--init_from", args.init_from is not None),
                        ("--save_best", args.save_best)):
        if given:
            return flag
    return None


def main(argv) -> int:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], add_help=False)
    p.add_argument("--peer", required=True, choices=PEERS)
    ours, rest = p.parse_known_args(argv)
    args = parse_args(rest, "torch")
    flag = unsupported(args)
    if flag:
        raise UsageError(f"{flag} is not available for a peer run")
    reason = transformers_available() if ours.peer == "hf" else torchtitan_available()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if reason is not None:  # the caller reads this file and reports the row as skipped
        (out_dir / "skipped.txt").write_text(reason + "\n", encoding="utf-8")
        print(f"skipped: {reason}", flush=True)
        return 0
    budget = TimeBudget(args.max_minutes)
    reuse_freed_host_memory()
    device = torch_device()
    cfg = args.model_config
    splits = prepare_data(args.data, seq_len=args.seq_len, show_progress=False, text_column=args.text_column,
                          workers=args.workers, val_fraction=args.val_fraction)
    train_iter = BatchIterator(splits.train, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                               vocab_size=cfg.vocab_size)
    torch.manual_seed(args.seed)
    peer = (HFPeer(cfg, device, args.compile) if ours.peer == "hf"
            else TitanPeer(cfg, args.seq_len, device, args.compile))
    optimizer = make_optimizer(peer.model, lr=args.lr, weight_decay=args.weight_decay, device=device)
    peer.model.train()
    (out_dir / "peer.json").write_text(json.dumps({"peer": ours.peer, "description": peer.description}, indent=1))
    log(f"starting: {ours.peer} peer, {peer.description}; data {splits.source}, device {device}; batch "
        f"{args.batch_size} x {args.seq_len} x {args.grad_accum} accumulation, lr {args.lr:g} -> {args.min_lr:g} "
        f"(warmup {args.warmup_steps}, {args.max_steps} steps), weight decay {args.weight_decay:g}, clip "
        f"{args.grad_clip:g}, {args.precision}; writing to {out_dir}")
    with MetricsLogger(out_dir, tensorboard=False) as metrics, GracefulStop() as stop, cpu_int_histc(device):
        trainer = PeerTrainer(peer, optimizer, train_iter, splits.val, args, device, metrics, budget)
        guard = BadStepGuard(args.max_bad_steps)
        result = loop.train(trainer, args, 0, guard=guard, metrics=metrics, stop=stop, budget=budget, is_main=True,
                            tokens_per_step=args.batch_size * args.seq_len * args.grad_accum)
    ended = {"done": "done", "stopped": f"stopped by {stop.requested}", "bad": "stopped by non-finite steps"}
    print(f"{ended[result['status']]}: {result['step']} steps", flush=True)
    return 1 if result["status"] == "bad" else 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog=PROG))

"""The trainers' own throughput: a short `train_torch.py` / `train_jax.py` run at a training preset's
shape, its tokens/s read back from the run's metrics.jsonl (the median after the warm-up steps), so
the table shows the bench's step (bench/train_step.py) and the trainer running that same step side by
side; the difference is what the trainer adds (data loading, the host-side loop, metrics).

    python -m bench --what trainer --preset bench --framework both

Each run is a subprocess, as a user would start it, with bf16, the bench's batch and sequence, no
evaluation or checkpoint before the last step and the embedded corpus (--quick: a toy model and the
first documents of the embedded corpus, on CPU), in the results directory's trainer/; its command is
in the row's notes.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.mfu import train_flops_per_token
from bench.report import Row
from bench.timing import log
from bench.train_step import GRAD_CLIP, LR, WEIGHT_DECAY, Workload
from blues.config import BluesConfig
from blues.data import load_documents

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"torch": "train_torch.py", "jax": "train_jax.py"}
# --quick: the bench's toy sizes with the real tokenizer's vocabulary (the trainers check it)
QUICK_CONFIG = dict(hidden_size=32, head_dim=16, num_attention_heads=2, num_key_value_heads=1, num_layers=1,
                    max_position_embeddings=32, tot_num_experts=4, embedding_multiplier_scale=2)
QUICK_DOCUMENTS = 40
QUICK_VAL_FRACTION = 0.25  # of so few documents, some must fall in validation


def quick_corpus(directory: Path) -> Path:
    """--quick's data: the first QUICK_DOCUMENTS documents of the embedded corpus as DIRECTORY/quick_corpus.jsonl
    (tokenizing the whole corpus on two cores takes minutes). Use it with --val_fraction QUICK_VAL_FRACTION."""
    data = directory / "quick_corpus.jsonl"
    data.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in load_documents()[:QUICK_DOCUMENTS]),
                    encoding="utf-8")
    return data


def quick_corpus(directory: Path) -> Path:
    """--quick's corpus: the first documents of the embedded corpus as DIRECTORY/quick_corpus.jsonl
    (a few real documents: tokenizing the whole corpus on two cores takes minutes)."""
    path = directory / "quick_corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in load_documents()[:QUICK_DOCUMENTS]),
                    encoding="utf-8")
    return path


def trainer_command(framework: str, wl: Workload, *, steps: int, out_dir: Path, data: Path | None,
                    compile: bool = False) -> list[str]:
    """The trainer's command line for a short run at the workload's shape (one device)."""
    cmd = [sys.executable, SCRIPTS[framework], "--preset", wl.preset, "--precision", "bf16",
           "--batch_size", str(wl.batch), "--max_steps", str(steps), "--warmup_steps", "0", "--lr", str(LR),
           "--min_lr", str(LR), "--weight_decay", str(WEIGHT_DECAY), "--grad_clip", str(GRAD_CLIP),
           "--eval_every", str(steps), "--eval_batches", "1", "--save_every", str(steps),
           "--keep_checkpoints", "1", "--out_dir", str(out_dir)]
    if wl.quick:
        cmd += ["--config", json.dumps(QUICK_CONFIG)]
    if data is not None:
        cmd += ["--data", str(data), "--val_fraction", str(QUICK_VAL_FRACTION)]
    if compile:
        cmd.append("--compile")
    return cmd


def measured_tokens_per_s(metrics_path: Path, warmup: int) -> tuple[float, float, int]:
    """(median tokens/s, relative spread (max - min) / median, steps) of the train records after `warmup`."""
    rates = [rec["tokens_per_s"] for rec in map(json.loads, metrics_path.read_text().splitlines())
             if rec.get("tokens_per_s") and rec["step"] > warmup]  # train records (evaluations have none)
    if not rates:
        raise RuntimeError(f"{metrics_path}: no training steps after the {warmup} warm-up steps")
    median = statistics.median(rates)
    return median, (max(rates) - min(rates)) / median, len(rates)


def trainer_train(framework: str, wl: Workload, *, steps: int, warmup: int, out: str, compile: bool = False,
                  timeout: float = 1800) -> Row:
    """One short run of the framework's trainer in OUT/trainer/<run>/ (replaced if there); a row with
    its measured tokens/s (no check: the trainer's own tests check its training)."""
    variant = ("compile" if compile else "eager") if framework == "torch" else "jit"
    config = dataclasses.replace(BluesConfig.preset(wl.preset), **QUICK_CONFIG) if wl.quick else wl.config
    tokens = wl.batch * config.max_position_embeddings
    root = Path(out) / "trainer"
    out_dir = root / f"{framework}-{wl.preset}-{variant}{'-quick' if wl.quick else ''}"
    shutil.rmtree(out_dir, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    data = quick_corpus(root) if wl.quick else None
    cmd = trainer_command(framework, wl, steps=warmup + steps, out_dir=out_dir.resolve(),
                          data=data.resolve() if data else None, compile=compile)
    shown = shlex.join(["python", *cmd[1:]])
    log(f"  {shown}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        raise RuntimeError(f"{SCRIPTS[framework]} exited {proc.returncode}: {last}")
    tokens_per_s, spread, n = measured_tokens_per_s(out_dir / "metrics.jsonl", warmup)
    return Row(framework=framework, workload=wl.name, variant=f"trainer {variant}", tokens_per_s=tokens_per_s,
               flops_per_token=train_flops_per_token(config, config.max_position_embeddings),
               dense_framework=framework, step_ms=tokens / tokens_per_s * 1e3, spread=spread,
               notes=f"{SCRIPTS[framework]} run, median of {n} steps after {warmup} warm-up (from the repository "
                     f"root): {shown}", config=wl.describe())

"""Issue 9: train_jax.py killed with SIGKILL at random moments (some during a checkpoint save),
resumed each time with --resume auto, ends with the very weights and per-step losses of a run
that was never interrupted (bit for bit, CPU, float32).

Each trial waits until the run has logged a randomly chosen step (or, for every third trial, until
a checkpoint save is in progress: Orbax's temporary directory exists, or a finished step directory
is not yet sealed with COMMITTED) and then kills it. Steps logged after the last checkpoint are redone
on resume; the metrics logger drops their stale records. All runs share a persistent XLA compilation
cache, so a restart costs the process start, not a compile.
"""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.metrics import read_metrics, train_records

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})
MAX_STEPS, TRIALS = 24, 10

pytestmark = pytest.mark.slow


def _args(corpus, out):
    return [sys.executable, "train_jax.py", "--data", str(corpus), "--config", CONFIG, "--batch_size", "2",
            "--eval_batches", "1", "--eval_every", "8", "--save_every", "2", "--keep_checkpoints", "2",
            "--lr", "1e-2", "--warmup_steps", "2", "--max_steps", str(MAX_STEPS), "--out_dir", str(out),
            "--resume", "auto"]


def _logged_step(out) -> int:
    recs = train_records(read_metrics(out / "metrics.jsonl"))
    return recs[-1]["step"] if recs else 0


def _saving(out) -> bool:
    root = out / "checkpoints"
    if not root.is_dir():
        return False
    return any("orbax-checkpoint-tmp" in p.name or (p.name.startswith("step_") and not (p / ckpt.MANIFEST).exists())
               for p in root.iterdir())


def _arrays(out):
    import jax
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
        tree = c.restore(out / "checkpoints" / ckpt.step_dirname(MAX_STEPS) / "arrays")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    rng = np.random.default_rng(0)
    words = "the of and to a in that is was he for it with as his on be at by this had not are but".split()
    corpus = tmp_path / "corpus.csv"
    with open(corpus, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(200):
            w.writerow([" ".join(rng.choice(words, size=40))])
    env = dict(os.environ, BLUES_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", XLA_FLAGS="--xla_force_host_platform_device_count=1")

    straight = tmp_path / "straight"
    subprocess.run(_args(corpus, straight), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)

    out, pick = tmp_path / "killed", random.Random(1)
    kills = during_save = 0
    for trial in range(TRIALS):
        start = _logged_step(out)
        proc = subprocess.Popen(_args(corpus, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        want_save = trial % 3 == 2
        target = start + pick.randint(1, 5)
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            if (_saving(out) if want_save else _logged_step(out) >= target):
                break
            time.sleep(0.005)
        if proc.poll() is None:
            during_save += _saving(out)
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if _logged_step(out) >= MAX_STEPS and proc.returncode == 0:
            break  # finished before the kill came: nothing left to interrupt
    assert kills >= 8 and during_save >= 1, (kills, during_save)

    latest = ckpt.latest_good(out / "checkpoints")
    if latest is None or latest.name != ckpt.step_dirname(MAX_STEPS):
        final = subprocess.run(_args(corpus, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert final.returncode == 0, final.stderr[-2000:]
    a, b = _arrays(straight), _arrays(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Every record (train and eval, in order) as the uninterrupted run logged it; floats compared exactly.
    strip = lambda recs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]  # noqa: E731
    assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(straight / "metrics.jsonl"))

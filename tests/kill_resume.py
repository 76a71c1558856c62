"""The SIGKILL-and-resume drill shared by both trainers' tests (issue 9).

A run of SCRIPT is killed with SIGKILL at random moments — after a randomly chosen logged step, or
(every third trial) while a checkpoint save is in progress — and resumed each time with
`--resume auto`. It must end with the very weights and metrics records of a run that was never
interrupted (bit for bit, CPU, float32). Steps logged after the last checkpoint are redone on
resume; the metrics logger drops their stale records.
"""
import contextlib
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil

from blues import checkpointing as ckpt
from blues.metrics import read_metrics, train_records

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})


def _logged_step(out: Path) -> int:
    recs = train_records(read_metrics(out / "metrics.jsonl"))
    return recs[-1]["step"] if recs else 0


def _kill_all(pid: int) -> None:
    """SIGKILL to `pid` and all its descendants."""
    root = psutil.Process(pid)
    children = root.children(recursive=True)
    for proc in [*children, root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(children, timeout=30)  # the caller reaps `pid` itself


def _corpus(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = "the of and to a in that is was he for it with as his on be at by this had not are but".split()
    corpus = tmp_path / "corpus.csv"
    with open(corpus, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(200):
            w.writerow([" ".join(rng.choice(words, size=40))])
    return corpus


def kill_and_resume_drill(tmp_path: Path, script: str, *, max_steps: int, trials: int, min_kills: int,
                          saving: Callable[[Path], bool], final_weights: Callable[[Path], dict],
                          env: dict | None = None, timeout: float = 300, launcher: tuple[str, ...] = (),
                          extra: tuple[str, ...] = ()) -> None:
    """`launcher` (e.g. torchrun's command line) runs SCRIPT instead of this Python; SIGKILL goes to
    the launcher and every process under it (torchrun's ranks run in sessions of their own), as when
    a machine dies."""
    corpus = _corpus(tmp_path)
    env = dict(os.environ, BLUES_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", **(env or {}))
    command = list(launcher or [sys.executable])
    args = lambda out: [*command, script, "--data", str(corpus), "--config", CONFIG,  # noqa: E731
                        "--batch_size", "2", "--eval_batches", "1", "--eval_every", "8", "--save_every", "2",
                        "--keep_checkpoints", "2", "--lr", "1e-2", "--warmup_steps", "2",
                        "--max_steps", str(max_steps), "--out_dir", str(out), "--resume", "auto", *extra]

    straight = tmp_path / "straight"
    subprocess.run(args(straight), cwd=REPO, env=env, check=True, capture_output=True, timeout=timeout)

    out, pick = tmp_path / "killed", random.Random(1)
    kills = during_save = 0
    for trial in range(trials):
        start = _logged_step(out)
        proc = subprocess.Popen(args(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        want_save = trial % 3 == 2
        target = start + pick.randint(1, 5)
        deadline = time.time() + timeout / 2
        while proc.poll() is None and time.time() < deadline:
            if (saving(out) if want_save else _logged_step(out) >= target):
                break
            time.sleep(0.005)
        if proc.poll() is None:
            during_save += saving(out)
            _kill_all(proc.pid)
            kills += 1
        proc.wait(timeout=60)
        if _logged_step(out) >= max_steps and proc.returncode == 0:
            break  # finished before the kill came: nothing left to interrupt
    assert kills >= min_kills and during_save >= 1, (kills, during_save)

    latest = ckpt.latest_good(out / "checkpoints")
    if latest is None or latest.name != ckpt.step_dirname(max_steps):
        final = subprocess.run(args(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert final.returncode == 0, final.stderr[-2000:]
    a, b = final_weights(straight), final_weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Every record (train and eval, in order) as the uninterrupted run logged it; floats compared exactly.
    strip = lambda recs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]  # noqa: E731
    assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(straight / "metrics.jsonl"))

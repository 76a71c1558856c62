"""train_torch.py with --expert_parallel on CPU ranks (gloo): the real torchrun and deepspeed launchers.

One process on a global batch of 8 sequences is the reference; torchrun 4 ranks x 2 sequences with
the experts split 2 ways, and DeepSpeed ZeRO-2 2 ranks x 4 split 2 ways, must give its 20 losses.
Plain checkpoints are layout-free, so every resume pair (1 process -> EP=4, EP=2 -> 1 process,
EP=2 -> EP=4, EP=4 -> 1 process) continues with the reference's next losses.

Tolerance 1e-6 relative: fp32, router noise and dropout 0; a layout changes only the order of
float32 sums (gradient all-reduces, the aux loss's mean over ranks), ~1e-7 on these losses.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer_checks import run_inproc, step_dir, trainer_env

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2, "router_noise_std": 0, "dropout": 0})
GLOBAL_BATCH, STEPS, RTOL = 8, 20, 1e-6
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(env, out, batch, *extra):
    return ["train_torch.py", "--data", env["corpus"], "--config", CONFIG, "--batch_size", str(batch),
            "--eval_batches", "2", "--eval_every", "10", "--save_every", "2", "--keep_checkpoints", "20",
            "--lr", "1e-3", "--min_lr", "1e-4", "--warmup_steps", "2", "--precision", "fp32",
            "--max_steps", str(STEPS), "--out_dir", str(out), *extra]


def launch(env, out, ranks, *extra, deepspeed=False):
    """train_torch.py on RANKS processes (one: plain python; else torchrun, or deepspeed)."""
    batch = GLOBAL_BATCH // ranks
    if deepspeed:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(_port()),
               *_args(env, out, batch, "--deepspeed", "ds_config.json", *extra)]
    elif ranks == 1:
        cmd = [sys.executable, *_args(env, out, batch, *extra)]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_port", str(_port()),
               *_args(env, out, batch, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env["env"], DS_ACCELERATOR="cpu"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return losses(out)


def losses(out) -> dict[int, float]:
    with open(Path(out) / "metrics.jsonl", encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def assert_same(got: dict, ref: dict):
    assert got, "no steps"
    for step, loss in got.items():
        assert abs(loss - ref[step]) <= RTOL * abs(ref[step]), (step, loss, ref[step])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with trainer_env(tmp_path_factory.mktemp("ep_trainer"), CONFIG, OMP_NUM_THREADS="1") as env:
        yield env


@pytest.fixture(scope="module")
def reference(env):
    """One process, the whole global batch, 20 steps, a checkpoint every 2 steps."""
    out = env["root"] / "one"
    return out, launch(env, out, 1)


@pytest.mark.slow
def test_torchrun_ep_matches_one_process_and_resumes_in_any_layout(env, reference):
    one, ref = reference
    assert len(ref) == STEPS
    root = env["root"]
    assert_same(launch(env, root / "ep2", 4, "--expert_parallel", "2"), ref)  # 20 steps, 4 ranks, EP=2
    # 1 process -> EP=4, EP=2 -> 1 process, EP=2 -> EP=4, then EP=4 -> 1 process: two steps each
    assert_same(launch(env, root / "ep4", 4, "--expert_parallel", "4", "--resume", str(step_dir(one, 4)),
                       "--stop_after", "6"), ref)
    assert_same(launch(env, root / "ep2_one", 1, "--resume", str(step_dir(root / "ep2", 8)), "--stop_after", "10"),
                ref)
    assert_same(launch(env, root / "ep2_ep4", 4, "--expert_parallel", "4", "--resume",
                       str(step_dir(root / "ep2", 12)), "--stop_after", "14"), ref)
    assert_same(launch(env, root / "ep4_one", 1, "--resume", str(step_dir(root / "ep4", 6)), "--stop_after", "8"),
                ref)


@pytest.mark.slow
def test_deepspeed_ep2_matches_one_process_and_resumes(env, reference):
    """ZeRO-2, 2 ranks, experts split 2 ways (DeepSpeed's MoE groups): the reference's losses, and a
    resume at step 16 in the same layout continues them (each rank gets its own experts back)."""
    _, ref = reference
    out = env["root"] / "ds_ep2"
    assert_same(launch(env, out, 2, "--expert_parallel", "2", "--stop_after", "16", deepspeed=True), ref)
    assert_same(launch(env, out, 2, "--expert_parallel", "2", "--resume", "auto", deepspeed=True), ref)
    assert sorted(losses(out)) == list(range(1, STEPS + 1))  # both halves, one metrics file


def test_expert_parallel_not_dividing_is_one_line_exit_2_nothing_written(env, tmp_path):
    for p, words in (("2", "does not divide the world size 1"), ("0", "must be a positive integer")):
        out = tmp_path / f"p{p}"
        rc, _, err = run_inproc("train_torch.py", _args(env, out, GLOBAL_BATCH, "--expert_parallel", p)[1:])
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()

"""train_torch.py with --expert_parallel on CPU ranks (gloo): the real torchrun and deepspeed launchers.

One process on a global batch of 8 sequences is the reference; torchrun 4 ranks x 2 sequences with
the experts split 2 ways, and DeepSpeed ZeRO-2 2 ranks x 4 split 2 ways, must give its 20 losses.
Checkpoints are layout-free, so every resume pair (1 process -> EP=4, EP=2 -> 1 process,
EP=2 -> EP=4, EP=4 -> 1 process; 1 process -> DeepSpeed EP=1 -> DeepSpeed EP=2 -> DeepSpeed EP=1
and -> 1 process) continues with the reference's next losses, and parity.convert_checkpoint reads
the EP checkpoints of both launchers.

Tolerance 1e-6 relative: fp32, router noise and dropout 0; a layout changes only the order of
float32 sums (gradient all-reduces, the aux loss's mean over ranks), ~1e-7 on these losses.
"""
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from blues.canonical import from_module_arrays
from blues.cli import run_main
from parity.checkpoint_read import read_source
from parity.optim_convert import from_deepspeed
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


@pytest.fixture(scope="module")
def torchrun_ep2(env):
    """torchrun 4 ranks, experts split 2 ways, 20 steps."""
    out = env["root"] / "ep2"
    return out, launch(env, out, 4, "--expert_parallel", "2")


@pytest.mark.slow
def test_torchrun_ep_matches_one_process_and_resumes_in_any_layout(env, reference, torchrun_ep2):
    one, ref = reference
    assert len(ref) == STEPS
    root = env["root"]
    assert_same(torchrun_ep2[1], ref)  # 20 steps, 4 ranks, EP=2
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


@pytest.fixture(scope="module")
def deepspeed_resumed(env, reference):
    """Resumes across layouts, two steps each (ZeRO-2, 2 ranks): one process -> DeepSpeed EP=1 (4 -> 6),
    DeepSpeed EP=1 -> EP=2 (6 -> 8), EP=2 -> EP=1 (8 -> 10) and DeepSpeed EP=2 -> one process (8 -> 10).
    Each loads the layout-free state (weights, both moments, step) the other side saved."""
    one, ref = reference
    root = env["root"]
    runs = {"ds1": (2, ("--expert_parallel", "1"), step_dir(one, 4), 6, True),
            "ds2": (2, ("--expert_parallel", "2"), step_dir(root / "ds1", 6), 8, True),
            "ds2_ds1": (2, ("--expert_parallel", "1"), step_dir(root / "ds2", 8), 10, True),
            "ds2_one": (1, (), step_dir(root / "ds2", 8), 10, False)}
    got = {name: launch(env, root / name, ranks, *extra, "--resume", str(src), "--stop_after", str(stop),
                        deepspeed=ds)
           for name, (ranks, extra, src, stop, ds) in runs.items()}
    return ref, got


@pytest.mark.slow
def test_deepspeed_resumes_in_any_layout_and_without_deepspeed(deepspeed_resumed):
    ref, got = deepspeed_resumed
    for name, run in got.items():
        assert sorted(run) == [s for s in range(1, STEPS + 1) if s in run] and len(run) == 2, (name, run)
        assert_same(run, ref)


def test_expert_parallel_not_dividing_is_one_line_exit_2_nothing_written(env, tmp_path):
    for p, words in (("2", "does not divide the world size 1"), ("0", "must be a positive integer")):
        out = tmp_path / f"p{p}"
        rc, _, err = run_inproc("train_torch.py", _args(env, out, GLOBAL_BATCH, "--expert_parallel", p)[1:])
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def _convert(*argv):
    """`python -m parity.convert_checkpoint ARGV` in this process."""
    from parity.convert_checkpoint import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = run_main(main, [str(a) for a in argv])
    assert rc == 0, err.getvalue()


@pytest.mark.slow
def test_convert_checkpoint_from_ep_checkpoints(env, reference, torchrun_ep2, deepspeed_resumed, tmp_path):
    """parity.convert_checkpoint from a DeepSpeed EP=2 and a torchrun EP=2 checkpoint (step 8) to torch and
    jax: the weights and moments of the source's canonical files, bit for bit; its experts are every
    rank's (the one-process run's step-8 weights to 1e-5: the layouts differ only in float32 sum order).
    A DeepSpeed EP=1 checkpoint's layout-free files hold what DeepSpeed's own zero_to_fp32 reassembly of
    its partitions gives, bit for bit."""
    one_step8 = read_source(step_dir(reference[0], 8))
    for name, src in (("deepspeed", step_dir(env["root"] / "ds2", 8)), ("torchrun", step_dir(torchrun_ep2[0], 8))):
        source = read_source(src)
        cfg = source.config
        canonical = from_module_arrays(load_file(str(src / "model.safetensors")), cfg)
        for to in ("torch", "jax"):
            _convert(src, tmp_path / f"{name}_{to}", "--to", to)
            got = read_source(tmp_path / f"{name}_{to}")
            assert got.optimizer.step == 8, (name, to)
            for key, want in canonical.items():
                np.testing.assert_array_equal(got.arrays[key], want, err_msg=f"{name} -> {to}: {key}")
                np.testing.assert_array_equal(got.optimizer.exp_avg[key], source.optimizer.exp_avg[key])
                np.testing.assert_array_equal(got.optimizer.exp_avg_sq[key], source.optimizer.exp_avg_sq[key])
                np.testing.assert_allclose(want, one_step8.arrays[key], rtol=0, atol=1e-5, err_msg=f"{name}: {key}")
    # Without expert parallelism DeepSpeed's zero_to_fp32 reassembles its partitions (with experts split
    # it cannot: they are partitioned over other groups): the layout-free files hold the same numbers.
    src = step_dir(env["root"] / "ds1", 6)
    source = read_source(src)
    ds_weights, ds_opt = from_deepspeed(src / "ds", source.config)
    for key in ds_weights:
        np.testing.assert_array_equal(source.arrays[key], ds_weights[key], err_msg=key)
        np.testing.assert_array_equal(source.optimizer.exp_avg[key], ds_opt.exp_avg[key], err_msg=key)
        np.testing.assert_array_equal(source.optimizer.exp_avg_sq[key], ds_opt.exp_avg_sq[key], err_msg=key)
    assert source.optimizer.step == ds_opt.step == 6

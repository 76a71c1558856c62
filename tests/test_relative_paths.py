"""The everyday flow with relative paths, from the project root and from another directory, in both
frameworks: train, stop, resume with the printed command, convert, resume the converted run in the
other framework, generate. Every path is relative to the working directory of the command that
takes it (one is `~/...`), and every command Blues prints is run as printed.

One chain of small runs (tiny model, 2-5 steps): torch trains and stops in another directory, resumes
with its `to resume:` line there; the run converts to JAX from the project root, where train_jax.py
resumes it (the issue-27 Orbax bug: relative paths) and stops; JAX's own `to resume:` line finishes it;
that converts back to torch, which resumes as `~/...`; generate.py reads both from either directory.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from trainer_checks import REPO, trainer_env

CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})


def run(cmd, cwd, env, status=0):
    """CMD (a list, or a printed command line whose `python` is this interpreter) in CWD."""
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    if cmd[0] == "python":
        cmd = [sys.executable, *cmd[1:]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "WARNING:absl" not in proc.stderr, proc.stderr[-3000:]
    return proc


def printed(pattern, text):
    m = re.search(pattern, text, re.M)
    assert m, (pattern, text[-2000:])
    return m.group(1)


def test_train_stop_resume_convert_resume_generate_with_relative_paths(tmp_path):
    elsewhere = home = tmp_path / "elsewhere"  # ~ is the other directory
    elsewhere.mkdir()
    with trainer_env(tmp_path, CONFIG, OMP_NUM_THREADS="1", HOME=str(home),
                     XLA_FLAGS="--xla_force_host_platform_device_count=1",
                     JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla")) as env:
        environ = env["env"]

        def flags(cwd):  # the corpus and the script, relative to the command's working directory
            return ["--data", os.path.relpath(env["corpus"], cwd), "--config", CONFIG, "--batch_size", "2",
                    "--eval_batches", "1", "--eval_every", "100", "--warmup_steps", "1"]

        torch_script = os.path.relpath(REPO / "train_torch.py", elsewhere)

        # torch, in another directory: train, stop at step 2, resume with the printed command
        proc = run(["python", torch_script, *flags(elsewhere), "--max_steps", "3", "--stop_after", "2",
                    "--out_dir", "runs/t"], elsewhere, environ)
        assert "starting: " in proc.stderr and "  batch: 2 sequences per micro-batch per rank (flag) x 1 rank x 1 " \
            "micro-batches accumulated (default) = a global batch of 2 sequences = 32 tokens" in proc.stderr
        assert "precision fp32 (default)" in proc.stderr
        resume = printed(r"^to resume: (.*)$", proc.stdout)
        assert resume.startswith(f"python {torch_script} ") and "--out_dir runs/t --resume auto" in resume
        proc = run(resume, elsewhere, environ)
        assert "done: trained 1 steps this run (steps 2->3)" in proc.stdout
        assert "checkpoint runs/t/checkpoints/step_00000003" in proc.stdout  # printed as typed, relative

        # convert to JAX from the project root; resume there with relative paths; stop; printed command
        run_t = os.path.relpath(elsewhere / "runs/t", REPO)
        run_j = os.path.relpath(elsewhere / "runs/j", REPO)
        proc = run(["python", "-m", "parity.convert_checkpoint", run_t, run_j, "--to", "jax"], REPO, environ)
        assert f"--out_dir {run_j} --resume auto" in proc.stdout
        proc = run(["python", "train_jax.py", *flags(REPO), "--max_steps", "5", "--stop_after", "4", "--out_dir", run_j,
                    "--resume", "auto"], REPO, environ)
        assert f"resuming from {run_j}/checkpoints/step_00000003 at step 3" in proc.stderr
        assert "the cosine schedule now reaches --min_lr at step 5 instead of 3" in proc.stderr
        assert "data-parallel shard" in proc.stderr
        proc = run(printed(r"^to resume: (.*)$", proc.stdout), REPO, environ)
        assert "done: trained 1 steps this run (steps 4->5)" in proc.stdout
        assert f"checkpoint {run_j}/checkpoints/step_00000005" in proc.stdout  # relative, like torch's

        # back to torch from the other directory, resumed under ~ (quoted: no shell expands it)
        proc = run(["python", "-m", "parity.convert_checkpoint", "runs/j", "runs/t2", "--to", "torch"],
                   elsewhere, dict(environ, PYTHONPATH=str(REPO)))
        proc = run(["python", torch_script, *flags(elsewhere), "--max_steps", "6", "--out_dir", "~/runs/t2",
                    "--resume", "auto"], elsewhere, environ)
        assert "done: trained 1 steps this run (steps 5->6)" in proc.stdout
        assert (home / "runs/t2" / "checkpoints" / "step_00000006" / "COMMITTED").is_file()

        # generate from either directory, relative paths, both frameworks' checkpoints
        for cwd, checkpoint in ((elsewhere, "runs/j"), (REPO, os.path.relpath(home / "runs/t2", REPO))):
            proc = run(["python", os.path.relpath(REPO / "generate.py", cwd), "--checkpoint", checkpoint,
                        "--prompt", "The", "--max_length", "3", "--temperature", "0"], cwd, environ)
            assert proc.stdout.strip()

"""train_jax.py end to end on CPU: metrics, plots, checkpoints, exact resume, a damaged checkpoint,
a restore onto another mesh, bad input, SIGTERM and NaN steps.

Every run trains a small model (d 32, 2 layers, T 16; the vocabulary stays o200k's 200,019) on a
small generated corpus. Training runs are subprocesses on ONE host device (XLA_FLAGS overrides the
8 the test suite forces; that is faster on a 2-core machine), except the mesh-restore test, which
needs 8. They share a persistent XLA compilation cache, so only the first run of each program
pays the compile time. The bad-input table calls `train_jax.main` in this process: every case is
refused before anything compiles.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.metrics import read_metrics, train_records
from trainer_checks import (bad_flag_exit_status_from_the_real_process, bad_input_one_line_exit_status_nothing_written,
                            base_args, common_bad_cases, damaged_latest_checkpoint_falls_back_to_previous,
                            exact_resume_is_bitwise, graceful_sigterm_checkpoints_and_exits_0,
                            max_minutes_ends_the_run_like_max_steps, metrics_plots_tensorboard_summary,
                            nonfinite_steps_are_skipped_then_stop_the_run, resume_refusals, same_arrays,
                            save_best_exports_the_best_evaluation, step_dir, straight_run, train_process,
                            trainer_env)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "train_jax.py"
# Router noise (the default 0.05) and dropout on: exact resume must restore both RNG streams.
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2, "dropout": 0.1})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small corpus and a token cache for every run of this module; the XLA compilation cache is
    shared by the whole session (the mesh and parity tests compile some of the same programs)."""
    xla_cache = tmp_path_factory.getbasetemp() / "xla-cache"
    with trainer_env(tmp_path_factory.mktemp("train_jax"), CONFIG, JAX_COMPILATION_CACHE_DIR=str(xla_cache),
                     JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                     XLA_FLAGS="--xla_force_host_platform_device_count=1") as env:
        yield env


def train(env, out_dir, *extra, status=0, devices=1, timeout=300):
    """train_jax.py as a subprocess on DEVICES host devices (XLA_FLAGS overrides the suite's 8)."""
    environ = dict(env["env"], XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return train_process(SCRIPT, env, out_dir, *extra, status=status, timeout=timeout, environ=environ)


def arrays(step_path):
    """Every array of a checkpoint (params, optimizer state, RNG key data) as flat {path: numpy}."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
        tree = c.restore(Path(step_path) / "arrays")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def straight(env):
    """The reference: 6 steps in one go, evaluating and saving at 3 and 6."""
    return straight_run(train, env)


def test_metrics_plots_tensorboard_summary(straight):
    train_recs, evals = metrics_plots_tensorboard_summary(straight)
    # It learns (lr 1e-2, a 120-word corpus): the last step's loss is below the first's (0.35 nats in
    # the run this was written against; one step's batch noise is ~0.1, with a rare 0.6 spike in
    # between). The validation loss (64 tokens of the hash-split documents) moves by less than its
    # own noise in 6 steps, so it is only required to be a finite, changed number.
    assert train_recs[-1]["lm_loss"] < train_recs[0]["lm_loss"]
    assert all(np.isfinite(e["val_loss"]) for e in evals) and evals[1]["val_loss"] != evals[0]["val_loss"]
    assert "sample (sampled, step 6)" in straight["stderr"]


def test_checkpoint_contents_and_reload(straight):
    from blues.config import BluesConfig

    assert [c.step for c in ckpt.list_checkpoints(straight["out"] / "checkpoints")] == [3, 6]
    path = step_dir(straight["out"], 6)
    manifest = ckpt.verify(path)  # every file's sha256, written once Orbax had finalized the save
    assert manifest["framework"] == "jax" and "trainer_state.json" in manifest["files"]
    assert any(f.startswith("arrays/") for f in manifest["files"])
    state = ckpt.read_trainer_state(path, framework="jax")
    assert state["step"] == 6 and state["data"]["step"] == 6 and state["bad_steps"] == {"skipped": 0, "consecutive": 0}
    cfg = BluesConfig.from_dict(state["model_config"])
    a = arrays(path)
    embed = a["['params']['embed']"]
    assert embed.shape == (cfg.padded_vocab_size, 32)
    assert np.all(embed[cfg.vocab_size:] == 0)  # padding rows stay exactly zero under AdamW
    mu = [k for k in a if "opt_state" in k and k.endswith("['embed']")]
    assert len(mu) == 2  # Adam's two moments of every parameter
    assert a["['opt_state']['hyperparams']['weight_decay']"] == np.float32(0.1)
    assert a["['opt_state']['inner_state'][0]['count']"] == 6  # Adam's bias-correction count: 6 updates
    assert any(k.startswith("['rng']") and "noise" in k for k in a)  # router-noise stream saved
    assert any(k.startswith("['rng']") and "dropout" in k for k in a)  # and every dropout stream
    assert not same_arrays(arrays(step_dir(straight["out"], 3)), a, "['params']")


def test_exact_resume_is_bitwise(env, straight, tmp_path):
    exact_resume_is_bitwise(SCRIPT, env, straight, tmp_path, stop=train, resume=train, read_arrays=arrays)


def biggest_array_file(step_path):
    return max((p for p in (step_path / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_damaged_latest_checkpoint_falls_back_to_previous(env, straight, tmp_path):
    damaged_latest_checkpoint_falls_back_to_previous(train, env, straight, tmp_path, file_to_damage=biggest_array_file,
                                                     read_arrays=arrays)


def test_scanned_layers_continue_an_unrolled_run(env, straight, tmp_path):
    """--scan_layers trains the same model with the same checkpoints: the unrolled reference run's
    step-3 checkpoint resumed with scanned blocks repeats steps 4-6 (router noise and dropout on).
    The scan's backward adds some gradients in another order, so 1e-5 relative, not bitwise."""
    out = tmp_path / "scanned"
    train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3",
          "--resume", str(step_dir(straight["out"], 3)), "--scan_layers")
    ref = {r["step"]: r for r in train_records(read_metrics(straight["out"] / "metrics.jsonl"))}
    got = {r["step"]: r for r in train_records(read_metrics(out / "metrics.jsonl")) if r["step"] > 3}
    assert sorted(got) == [4, 5, 6]
    for step, r in got.items():
        assert r["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        assert r["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step


def test_restore_onto_a_different_mesh(env, tmp_path):
    """Saved on mesh data=8, resumed on data=2,expert=4: the arrays are resharded on restore and the
    run continues. The losses agree to float32 summation order only (on the second mesh the expert
    layer runs expert-parallel with an all-to-all and the sharded sums add up in another order), so
    1e-5 relative; bit-identical is not expected. (--stop_after ends both runs before an evaluation:
    these 8-device runs only compile the train step.)"""
    first, second = tmp_path / "mesh8", tmp_path / "mesh2x4"
    one_layer = json.dumps({**json.loads(CONFIG), "num_layers": 1})  # half the program to compile, twice
    common = ("--batch_size", "1", "--max_steps", "6", "--eval_every", "100", "--save_every", "2",
              "--stop_after", "3", "--config", one_layer)
    train(env, first, *common, "--mesh", "data=8", devices=8)
    train(env, second, *common, "--mesh", "data=2,expert=4", "--resume", str(step_dir(first, 2)), devices=8)
    assert json.loads((second / "config.json").read_text())["mesh"] == {"data": 2, "expert": 4}
    ref = train_records(read_metrics(first / "metrics.jsonl"))
    got = train_records(read_metrics(second / "metrics.jsonl"))
    assert [r["step"] for r in ref] == [1, 2, 3] and [r["step"] for r in got] == [3]
    assert got[0]["loss"] == pytest.approx(ref[2]["loss"], rel=1e-5)
    assert got[0]["grad_norm"] == pytest.approx(ref[2]["grad_norm"], rel=1e-4)
    a, b = arrays(step_dir(first, 3)), arrays(step_dir(second, 3))
    assert a.keys() == b.keys()
    for k in a:  # after one more AdamW step from the same state; Adam normalises tiny gradient
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)  # differences up to ~lr


def test_graceful_sigterm_checkpoints_and_exits_0(env, tmp_path):
    graceful_sigterm_checkpoints_and_exits_0(SCRIPT, "jax", env, tmp_path, timeout=150)


def test_nonfinite_steps_are_skipped_then_stop_the_run(env, tmp_path):
    nonfinite_steps_are_skipped_then_stop_the_run(train, env, tmp_path, read_arrays=arrays, params="['params']",
                                                  adam_state="['opt_state']['inner_state']")


def test_save_best_exports_the_best_evaluation(env, tmp_path):
    save_best_exports_the_best_evaluation(train, env, tmp_path)


def test_max_minutes_ends_the_run_like_max_steps(env, tmp_path):
    max_minutes_ends_the_run_like_max_steps(train, env, tmp_path)

# ---- bad input: one line, the right exit status, nothing left behind ---------------------------------

def jax_bad_cases(tmp):
    """(argv, exit status, text) of train_jax.py's own, on top of trainer_checks.common_bad_cases."""
    (tmp / "blank.csv").write_text("Text\n\"  \"\n\" \"\n")
    (tmp / "latin1.csv").write_bytes("Text\ncaf\xe9\n".encode("latin-1"))
    return [
        (["--attn_impl", "sdpa"], 2, "--attn_impl"),  # torch's backend name
        (["--attn_impl", "cudnn"], 2, "needs an NVIDIA GPU"),  # known, but not on this CPU
        (["--deepspeed", "ds_config.json"], 2, "--deepspeed"),  # torch only
        (["--mesh", "data=3"], 2, "--mesh"),  # the suite forces 8 devices
        (["--mesh", "model=8"], 2, "unknown mesh axis 'model'"),
        (["--mesh", "data=1,expert=8"], 2, "must divide tot_num_experts"),
        (["--mesh", "data=two"], 2, "--mesh"),
        (["--coordinator", "10.0.0.1:1234"], 2, "--num_processes"),
        (["--coordinator", "nohost", "--num_processes", "2", "--process_id", "0"], 2, "--coordinator"),
        (["--config", '{"vocab_size": 512}'], 1, "'vocab_size'"),  # smaller than the tokenizer's
        (["--data", str(tmp / "blank.csv")], 1, "only blank texts"),
        (["--data", str(tmp / "latin1.csv")], 1, "not UTF-8"),
    ]


def test_bad_input_one_line_exit_status_nothing_written(env, tmp_path):
    cases = common_bad_cases(tmp_path) + jax_bad_cases(tmp_path)
    bad_input_one_line_exit_status_nothing_written(SCRIPT, env, tmp_path, cases)


def test_resume_refusals(env, straight, tmp_path):
    before = (straight["out"] / "metrics.jsonl").read_bytes()
    truncated = tmp_path / "truncated"
    shutil.copytree(step_dir(straight["out"], 6), truncated / "step_00000006")
    f = truncated / "step_00000006" / "trainer_state.json"
    f.write_bytes(f.read_bytes()[:50])
    resume_refusals(SCRIPT, "jax", env, straight, tmp_path, extra_cases=[
        # In this process JAX sees the suite's 8 devices: batch_size 2 is a global batch of 16.
        (base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto"), 1,
         "global_batch (checkpoint 2, this run 16)"),
        (base_args(env, tmp_path / "new", "--resume", str(truncated / "step_00000006")), 1,
         "does not match its checksum"),
    ])
    # One device, as the checkpoint was made: a resume past the end is refused too.
    proc = train(env, straight["out"], "--max_steps", "6", "--resume", "auto", status=2)
    assert "already at step 6" in proc.stderr
    assert proc.stderr.strip().endswith("pass a larger --max_steps to train further")
    assert (straight["out"] / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "new").exists()


def test_bad_flag_exit_status_from_the_real_process(env, tmp_path):
    bad_flag_exit_status_from_the_real_process(SCRIPT, env, tmp_path)


def test_blues_compilation_cache_keeps_every_program(tmp_path):
    """BLUES_CACHE/xla keeps programs that compile in well under JAX's default second (the optimizer's
    initialisation, conversions, gathers), so a repeated run loads them instead of compiling each."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    code = ("import jax; from blues_jax.distributed import enable_compilation_cache; enable_compilation_cache(); "
            "jax.jit(lambda x: x + 1)(1.0)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(environ, BLUES_CACHE=str(tmp_path)), check=True,
                   timeout=120)
    assert [p.name for p in (tmp_path / "xla").glob("jit__lambda-*")], list((tmp_path / "xla").iterdir())

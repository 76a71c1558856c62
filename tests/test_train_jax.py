"""train_jax.py end to end on CPU: metrics, plots, checkpoints, exact resume, a damaged checkpoint,
a restore onto another mesh, bad input, SIGTERM and NaN steps.

Every run trains a small model (d 32, 2 layers, T 16; the vocabulary stays o200k's 200,019) on a
small generated corpus. Training runs are subprocesses on ONE host device (XLA_FLAGS overrides the
8 the test suite forces; that is faster on a 2-core machine), except the mesh-restore test, which
needs 8. They share a persistent XLA compilation cache, so only the first run of each program
pays the compile time. The bad-input table calls `train_jax.main` in this process: every case is
refused before anything compiles.
"""
import contextlib
import csv
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.cli import run_main
from blues.metrics import TRAIN_KEYS, eval_records, read_metrics, train_records
from trainer_checks import max_minutes_ends_the_run_like_max_steps, save_best_exports_the_best_evaluation

REPO = Path(__file__).resolve().parent.parent
# Router noise (the default 0.05) and dropout on: exact resume must restore both RNG streams.
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2, "dropout": 0.1})
WORDS = ("the of and to a in that is was he for it with as his on be at by this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many before must").split()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small corpus and a token cache for every run of this module; the XLA compilation cache is
    shared by the whole session (the mesh and parity tests compile some of the same programs)."""
    root = tmp_path_factory.mktemp("train_jax")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.csv"
    with open(corpus, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(300):
            w.writerow([" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))).capitalize() + "."])
    environ = dict(os.environ, BLUES_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1",
                   JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "xla-cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
    saved = os.environ.get("BLUES_CACHE")
    os.environ["BLUES_CACHE"] = environ["BLUES_CACHE"]
    yield {"root": root, "corpus": str(corpus), "env": environ}
    if saved is None:
        os.environ.pop("BLUES_CACHE", None)
    else:
        os.environ["BLUES_CACHE"] = saved


def base_args(env, out_dir, *extra):
    return ["--data", env["corpus"], "--config", CONFIG, "--batch_size", "2", "--eval_batches", "2",
            "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "2", "--out_dir", str(out_dir), *extra]


def train(env, out_dir, *extra, status=0, devices=1, timeout=300):
    environ = dict(env["env"], XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "train_jax.py", *base_args(env, out_dir, *extra)], cwd=REPO,
                          env=environ, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == status, proc.stderr[-3000:]
    return proc


_TRAIN_JAX = None


def train_jax_module():
    global _TRAIN_JAX
    if _TRAIN_JAX is None:
        spec = importlib.util.spec_from_file_location("train_jax", REPO / "train_jax.py")
        _TRAIN_JAX = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_TRAIN_JAX)
    return _TRAIN_JAX


def run_inproc(argv):
    """train_jax.main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_main(train_jax_module().main, argv)
    return rc, out.getvalue(), err.getvalue()


def step_dir(out_dir, step):
    return Path(out_dir) / "checkpoints" / ckpt.step_dirname(step)


def arrays(step_path):
    """Every array of a checkpoint (params, optimizer state, RNG key data) as flat {path: numpy}."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
        tree = c.restore(Path(step_path) / "arrays")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def same_arrays(a, b, prefix="") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return keys and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in keys)


def strip_speed(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.fixture(scope="module")
def straight(env):
    """The reference: 6 steps in one go, evaluating and saving at 3 and 6."""
    out = env["root"] / "straight"
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3")
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr}


def test_metrics_plots_tensorboard_summary(straight):
    out = straight["out"]
    records = read_metrics(out / "metrics.jsonl")
    train_recs, evals = train_records(records), eval_records(records)
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    for r in train_recs:
        assert tuple(r) == TRAIN_KEYS
        assert all(isinstance(r[k], float) for k in TRAIN_KEYS[1:-1]) and r["skipped_steps"] == 0
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"], rel=1e-6)
    assert [r["lr"] for r in train_recs[:2]] == [5e-3, 1e-2]  # blues.schedule: warmup 2, step s uses lr(s - 1)
    assert [r["step"] for r in evals] == [3, 6]
    # It learns (lr 1e-2, a 120-word corpus). Each training step sees only 32 tokens, so the training
    # loss is noisy; the validation loss (64 tokens, fixed) falls from step 3 to step 6.
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    for r in evals:
        assert set(r) == {"step", "val_loss", "val_perplexity", "experts"}
        assert r["val_perplexity"] == pytest.approx(np.exp(r["val_loss"]))
        assert [layer["layer"] for layer in r["experts"]] == [0, 1]
        for layer in r["experts"]:
            assert len(layer["fractions"]) == 4 and sum(layer["fractions"]) == pytest.approx(1.0)
            assert 0 <= layer["entropy"] <= np.log(4) + 1e-9 and layer["drop_rate"] == 0.0
    for png in ("loss.png", "experts.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert "done: trained 6 steps" in straight["stdout"] and str(step_dir(out, 6)) in straight["stdout"]
    assert "sample (greedy, step 6)" in straight["stderr"] and "sample (sampled, step 6)" in straight["stderr"]


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
    out = tmp_path / "resumed"
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--stop_after", "3")
    assert "--stop_after 3" in proc.stderr and "to resume: python train_jax.py" in proc.stdout
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [3]
    train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--resume", "auto")
    ref, got = read_metrics(straight["out"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert strip_speed(train_records(got)) == strip_speed(train_records(ref))  # floats compared exactly
    assert eval_records(got) == eval_records(ref)
    assert same_arrays(arrays(step_dir(out, 6)), arrays(step_dir(straight["out"], 6)))


def test_damaged_latest_checkpoint_falls_back_to_previous(env, straight, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(straight["out"], out)
    biggest = max((p for p in (step_dir(out, 6) / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:-100])  # a truncated file: the checksum no longer matches
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--resume", "auto")
    assert "skipping" in proc.stderr and "does not match its checksum" in proc.stderr
    assert "resuming from" in proc.stderr and "step_00000003 at step 3" in proc.stderr
    ckpt.verify(step_dir(out, 6))
    assert same_arrays(arrays(step_dir(out, 6)), arrays(step_dir(straight["out"], 6)))
    ref = read_metrics(straight["out"] / "metrics.jsonl")
    assert strip_speed(read_metrics(out / "metrics.jsonl")) == strip_speed(ref)


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
    out = tmp_path / "sigterm"
    proc = subprocess.Popen([sys.executable, "train_jax.py", *base_args(env, out, "--max_steps", "100000",
                                                                      "--eval_every", "100000",
                                                                      "--save_every", "100000")],
                            cwd=REPO, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and not train_records(read_metrics(out / "metrics.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr and "to resume: python train_jax.py" in stdout
    last = train_records(read_metrics(out / "metrics.jsonl"))[-1]["step"]
    assert 1 <= last < 100000
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [last]
    assert ckpt.read_trainer_state(step_dir(out, last), framework="jax")["step"] == last


def test_nonfinite_steps_are_skipped_then_stop_the_run(env, tmp_path):
    out = tmp_path / "nan"
    proc = train(env, out, "--max_steps", "8", "--eval_every", "100", "--save_every", "1", "--keep_checkpoints", "10",
                 "--inject_nan", "2,4,5", "--max_bad_steps", "2", status=1)
    assert "stopped after 2 consecutive non-finite steps (step 5)" in proc.stderr
    recs = {r["step"]: r for r in train_records(read_metrics(out / "metrics.jsonl"))}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert recs[2]["loss"] is None and recs[2]["grad_norm"] is None and recs[3]["loss"] is not None
    w = {s: arrays(step_dir(out, s)) for s in range(1, 6)}
    # the skipped update left weights and Adam's state (moments, bias-correction count) alone; only the
    # injected hyperparameter learning_rate, set every step, differs
    assert same_arrays(w[1], w[2], "['params']") and same_arrays(w[1], w[2], "['opt_state']['inner_state']")
    assert not same_arrays(w[2], w[3], "['params']")
    assert same_arrays(w[3], w[5], "['params']")  # stopped with the last good state saved
    assert same_arrays(w[3], w[5], "['opt_state']['inner_state']")  # Adam's moments and count untouched too


def test_save_best_exports_the_best_evaluation(env, tmp_path):
    save_best_exports_the_best_evaluation(train, env, tmp_path)


def test_max_minutes_ends_the_run_like_max_steps(env, tmp_path):
    max_minutes_ends_the_run_like_max_steps(train, env, tmp_path)

# ---- bad input: one line, the right exit status, nothing left behind ---------------------------------

def _bad_cases(tmp):
    (tmp / "bad.json").write_text("{not json")
    (tmp / "notext.csv").write_text("Title,Body\na,b\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "blank.csv").write_text("Text\n\"  \"\n\" \"\n")
    (tmp / "binary.csv").write_bytes(b"\x00\xff\xfe\x00" * 64)
    (tmp / "latin1.csv").write_bytes("Text\ncaf\xe9\n".encode("latin-1"))
    (tmp / "afile").write_text("x")
    (tmp / "notackpt").mkdir()
    return [
        # (argv, exit status, text the one line must contain)
        (["--lr", "0"], 2, "--lr"),
        (["--lr", "abc"], 2, "--lr"),
        (["--max_steps", "0"], 2, "--max_steps"),
        (["--max_minutes", "0"], 2, "--max_minutes"),
        (["--max_minutes", "nan"], 2, "--max_minutes"),
        (["--batch_size", "-2"], 2, "--batch_size"),
        (["--grad_accum", "0"], 2, "--grad_accum"),
        (["--min_lr", "1", "--lr", "0.1"], 2, "--min_lr"),
        (["--precision", "fp16"], 2, "--precision"),
        (["--attn_impl", "sdpa"], 2, "--attn_impl"),  # torch's backend name
        (["--attn_impl", "cudnn"], 2, "needs an NVIDIA GPU"),  # known, but not on this CPU
        (["--preset", "huge"], 2, "known presets: tiny, small, bench"),
        (["--deepspeed", "ds_config.json"], 2, "--deepspeed"),  # torch only
        (["--mesh", "data=3"], 2, "--mesh"),  # the suite forces 8 devices
        (["--mesh", "model=8"], 2, "unknown mesh axis 'model'"),
        (["--mesh", "data=1,expert=8"], 2, "must divide tot_num_experts"),
        (["--mesh", "data=two"], 2, "--mesh"),
        (["--coordinator", "10.0.0.1:1234"], 2, "--num_processes"),
        (["--coordinator", "nohost", "--num_processes", "2", "--process_id", "0"], 2, "--coordinator"),
        (["--config", str(tmp / "bad.json")], 1, "not valid JSON"),
        (["--config", '{"hidden_size": -4}'], 1, "'hidden_size'"),
        (["--config", '{"hidden_sise": 32}'], 1, "hidden_sise"),
        (["--config", '{"vocab_size": 512}'], 1, "'vocab_size'"),  # smaller than the tokenizer's
        (["--data", str(tmp / "missing.csv")], 2, "missing.csv does not exist"),
        (["--data", str(tmp / "notext.csv")], 1, "columns found: 'Title', 'Body'"),
        (["--data", str(tmp / "empty.csv")], 1, "empty.csv"),
        (["--data", str(tmp / "blank.csv")], 1, "only blank texts"),
        (["--data", str(tmp / "binary.csv")], 1, "binary.csv"),
        (["--data", str(tmp / "latin1.csv")], 1, "not UTF-8"),
        (["--out_dir", str(tmp / "afile")], 2, "not a directory"),
        (["--resume", str(tmp / "nowhere")], 2, "--resume"),
        (["--resume", str(tmp / "notackpt")], 1, "holds no Blues checkpoint"),
        (["--init_from", str(tmp / "nowhere")], 2, "--init_from"),
        (["--init_from", str(tmp / "afile")], 1, "afile"),
    ]


def test_bad_input_one_line_exit_status_nothing_written(env, tmp_path):
    for argv, status, text in _bad_cases(tmp_path):
        out = tmp_path / "run_out"
        full = ["--data", env["corpus"], "--config", CONFIG, "--out_dir", str(out), *argv] \
            if "--out_dir" not in argv else argv
        rc, _, err = run_inproc(full)
        err = err.strip()
        assert rc == status, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert ": error: " in err and text in err, (argv, err)
        assert not out.exists(), argv


def test_resume_refusals(env, straight, tmp_path):
    before = (straight["out"] / "metrics.jsonl").read_bytes()
    torch_like = tmp_path / "torchrun"
    shutil.copytree(straight["out"], torch_like)
    manifest_path = step_dir(torch_like, 6) / "COMMITTED"
    manifest_path.write_text(manifest_path.read_text().replace('"framework": "jax"', '"framework": "torch"'))
    truncated = tmp_path / "truncated"
    shutil.copytree(step_dir(straight["out"], 6), truncated / "step_00000006")
    f = truncated / "step_00000006" / "trainer_state.json"
    f.write_bytes(f.read_bytes()[:50])
    other = json.dumps({**json.loads(CONFIG), "hidden_size": 48})
    cases = [
        (base_args(env, straight["out"], "--max_steps", "8"), 2, "already holds checkpoints"),
        ([*base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto"), "--config", other], 1,
         "hidden_size (checkpoint 32, this run 48)"),
        # In this process JAX sees the suite's 8 devices: batch_size 2 is a global batch of 16.
        (base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto"), 1,
         "global_batch (checkpoint 2, this run 16)"),
        (base_args(env, torch_like, "--max_steps", "8", "--resume", "auto"), 1, "is a torch checkpoint"),
        (base_args(env, tmp_path / "new", "--resume", str(truncated / "step_00000006")), 1,
         "does not match its checksum"),
    ]
    for argv, status, text in cases:
        rc, _, err = run_inproc(argv)
        err = err.strip()
        assert rc == status and text in err and "Traceback" not in err, (argv, err)
    # One device, as the checkpoint was made: a resume past the end is refused too.
    proc = train(env, straight["out"], "--max_steps", "6", "--resume", "auto", status=2)
    assert "already at step 6" in proc.stderr
    assert proc.stderr.strip().endswith("pass a larger --max_steps to train further")
    assert (straight["out"] / "metrics.jsonl").read_bytes() == before
    assert not (tmp_path / "new").exists()


def test_bad_flag_exit_status_from_the_real_process(env, tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "train_jax.py", "--lr", "0", "--out_dir", str(out)], cwd=REPO,
                          env=env["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train_jax.py: error: --lr: must be a positive number, got 0.0"
    assert not out.exists()

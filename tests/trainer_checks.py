"""End-to-end checks that read the same for both trainers, called from thin `test_...` wrappers in
tests/test_train_torch.py and tests/test_train_jax.py (the SIGKILL drill is tests/kill_resume.py).

Each test module keeps its own `env` fixture (built with `trainer_env`) and its own `train`; what
differs between the trainers is passed in explicitly:

- `script` ("train_torch.py" / "train_jax.py") and `framework` ("torch" / "jax");
- `train(env, out_dir, *flags, status=0)`: runs the trainer on `base_args` plus FLAGS, asserts its
  exit status and returns a `subprocess.CompletedProcess` (stdout, stderr). train_torch.py's tests
  may pass one that runs in this process; train_jax.py's train in a subprocess (in this process JAX
  sees the suite's 8 devices);
- `read_arrays(step_dir)`: every array of a checkpoint as flat {name: numpy array}.
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

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the of and to a in that is was he for it with as his on be at by this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many before must").split()


# ---- what every run of a test module shares -------------------------------------------------------

def write_corpus(path: Path, documents: int = 300) -> Path:
    """A CSV of DOCUMENTS generated sentences of common English words (seeded: the same every time)."""
    rng = np.random.default_rng(0)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(documents):
            w.writerow([" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))).capitalize() + "."])
    return path


@contextlib.contextmanager
def trainer_env(root: Path, config: str, **environ: str):
    """A small generated corpus under ROOT, the model CONFIG (JSON) and the subprocesses' environment:
    a token cache under ROOT, unbuffered output, plus ENVIRON. Runs in this process see the same token
    cache through os.environ while the context lasts."""
    corpus = write_corpus(root / "corpus.csv")
    subprocess_env = dict(os.environ, BLUES_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", **environ)
    saved = os.environ.get("BLUES_CACHE")
    os.environ["BLUES_CACHE"] = subprocess_env["BLUES_CACHE"]
    try:
        yield {"root": root, "corpus": str(corpus), "config": config, "env": subprocess_env}
    finally:
        if saved is None:
            os.environ.pop("BLUES_CACHE", None)
        else:
            os.environ["BLUES_CACHE"] = saved


def base_args(env, out_dir, *extra):
    return ["--data", env["corpus"], "--config", env["config"], "--batch_size", "2", "--eval_batches", "2",
            "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "2", "--out_dir", str(out_dir), *extra]


def train_process(script, env, out_dir, *extra, status=0, timeout=300, environ=None):
    """SCRIPT on `base_args` as a real process (environment ENVIRON, default env["env"])."""
    proc = subprocess.run([sys.executable, script, *base_args(env, out_dir, *extra)], cwd=REPO,
                          env=env["env"] if environ is None else environ, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == status, proc.stderr[-3000:]
    return proc


_MODULES = {}


def trainer_module(script):
    """SCRIPT imported once per test session (its imports of torch or JAX are slow)."""
    if script not in _MODULES:
        name = Path(script).stem
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


def run_inproc(script, argv):
    """SCRIPT's main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_main(trainer_module(script).main, argv)
    return rc, out.getvalue(), err.getvalue()


def step_dir(out_dir, step):
    return Path(out_dir) / "checkpoints" / ckpt.step_dirname(step)


def same_arrays(a, b, prefix="") -> bool:
    """A and B name the same arrays, and those whose name starts with PREFIX (there must be some) are equal."""
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in keys)


def strip_speed(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def straight_run(train, env) -> dict:
    """The reference run of a module: 6 steps in one go, evaluating and saving at 3 and 6."""
    out = env["root"] / "straight"
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3")
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr}


# ---- the checks ---------------------------------------------------------------------------------

def metrics_plots_tensorboard_summary(straight) -> tuple[list[dict], list[dict]]:
    """What the reference run left behind; returns its train and eval records for the trainer's own checks."""
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
    assert "sample (greedy, step 6)" in straight["stderr"]
    return train_recs, evals


def exact_resume_is_bitwise(script, env, straight, tmp_path, *, stop, resume, read_arrays) -> None:
    """The reference run stopped after step 3 (by STOP) and resumed (by RESUME, a real process: a fresh
    start) ends with the very records (floats compared exactly) and weights of the reference."""
    out = tmp_path / "resumed"
    proc = stop(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--stop_after", "3")
    assert "--stop_after 3" in proc.stderr and f"to resume: python {script}" in proc.stdout
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [3]
    resume(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--resume", "auto")
    ref, got = read_metrics(straight["out"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert strip_speed(train_records(got)) == strip_speed(train_records(ref))  # floats compared exactly
    assert eval_records(got) == eval_records(ref)
    assert same_arrays(read_arrays(step_dir(out, 6)), read_arrays(step_dir(straight["out"], 6)))


def damaged_latest_checkpoint_falls_back_to_previous(train, env, straight, tmp_path, *, file_to_damage,
                                                     read_arrays) -> None:
    """One file of the latest checkpoint (FILE_TO_DAMAGE picks it) is cut short: `--resume auto` skips
    that checkpoint, resumes from step 3 and ends where the reference run did."""
    out = tmp_path / "damaged"
    shutil.copytree(straight["out"], out)
    f = file_to_damage(step_dir(out, 6))
    f.write_bytes(f.read_bytes()[:-100])  # a truncated file: the checksum no longer matches
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--resume", "auto")
    assert "skipping" in proc.stderr and "does not match its checksum" in proc.stderr
    assert "resuming from" in proc.stderr and "step_00000003 at step 3" in proc.stderr
    ckpt.verify(step_dir(out, 6))  # saved again, whole
    assert same_arrays(read_arrays(step_dir(out, 6)), read_arrays(step_dir(straight["out"], 6)))
    ref, got = read_metrics(straight["out"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert strip_speed(got) == strip_speed(ref)
    assert got[-1] == ref[-1]  # step 6's evaluation, exactly


def graceful_sigterm_checkpoints_and_exits_0(script, framework, env, tmp_path, *, timeout) -> None:
    """SIGTERM after the first logged step: the run saves a checkpoint at the step it reached and exits 0.
    TIMEOUT bounds the wait for the first step and again the wait for the exit (JAX compiles first)."""
    out = tmp_path / "sigterm"
    proc = subprocess.Popen([sys.executable, script, *base_args(env, out, "--max_steps", "100000",
                                                                "--eval_every", "100000",
                                                                "--save_every", "100000")],
                            cwd=REPO, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not train_records(read_metrics(out / "metrics.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr and f"to resume: python {script}" in stdout
    last = train_records(read_metrics(out / "metrics.jsonl"))[-1]["step"]
    assert 1 <= last < 100000
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [last]
    ckpt.verify(step_dir(out, last))
    assert ckpt.read_trainer_state(step_dir(out, last), framework=framework)["step"] == last


def nonfinite_steps_are_skipped_then_stop_the_run(train, env, tmp_path, *, read_arrays, params="",
                                                  adam_state=None) -> None:
    """NaN injected at steps 2, 4 and 5: each update is skipped, and the second in a row ends the run
    (exit 1). In READ_ARRAYS' names, PARAMS starts the weights' and ADAM_STATE Adam's moments and
    bias-correction count (None: READ_ARRAYS does not read the optimizer state)."""
    out = tmp_path / "nan"
    proc = train(env, out, "--max_steps", "8", "--eval_every", "100", "--save_every", "1", "--keep_checkpoints", "10",
                 "--inject_nan", "2,4,5", "--max_bad_steps", "2", status=1)
    assert "stopped after 2 consecutive non-finite steps (step 5)" in proc.stderr
    recs = {r["step"]: r for r in train_records(read_metrics(out / "metrics.jsonl"))}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert recs[2]["loss"] is None and recs[2]["grad_norm"] is None and recs[3]["loss"] is not None
    w = {s: read_arrays(step_dir(out, s)) for s in range(1, 6)}
    assert same_arrays(w[1], w[2], params)  # the skipped update left the weights alone
    assert not same_arrays(w[2], w[3], params)
    assert same_arrays(w[3], w[5], params)  # stopped with the last good state saved
    if adam_state is not None:
        # Adam's moments and count are untouched too (in JAX's optimizer state only the injected
        # hyperparameter learning_rate, set every step, differs: it is not under ADAM_STATE)
        assert same_arrays(w[1], w[2], adam_state)
        assert same_arrays(w[3], w[5], adam_state)


# ---- bad input: one line, the right exit status, nothing left behind ---------------------------------

def common_bad_cases(tmp):
    """(argv, exit status, text the one line must contain): refused alike by both trainers."""
    (tmp / "bad.json").write_text("{not json")
    (tmp / "notext.csv").write_text("Title,Body\na,b\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "binary.csv").write_bytes(b"\x00\xff\xfe\x00" * 64)
    (tmp / "afile").write_text("x")
    (tmp / "notackpt").mkdir()
    return [
        (["--lr", "0"], 2, "--lr"),
        (["--lr", "abc"], 2, "--lr"),
        (["--max_steps", "0"], 2, "--max_steps"),
        (["--max_minutes", "0"], 2, "--max_minutes"),
        (["--max_minutes", "nan"], 2, "--max_minutes"),
        (["--batch_size", "-2"], 2, "--batch_size"),
        (["--grad_accum", "0"], 2, "--grad_accum"),
        (["--min_lr", "1", "--lr", "0.1"], 2, "--min_lr"),
        (["--precision", "fp16"], 2, "--precision"),
        (["--preset", "huge"], 2, "known presets: tiny, small, bench"),
        (["--config", str(tmp / "bad.json")], 1, "not valid JSON"),
        (["--config", '{"hidden_size": -4}'], 1, "'hidden_size'"),
        (["--config", '{"hidden_sise": 32}'], 1, "hidden_sise"),
        (["--data", str(tmp / "missing.csv")], 2, "missing.csv does not exist"),
        (["--data", str(tmp / "notext.csv")], 1, "columns found: 'Title', 'Body'"),
        (["--data", str(tmp / "empty.csv")], 1, "empty.csv"),
        (["--data", str(tmp / "binary.csv")], 1, "binary.csv"),
        (["--out_dir", str(tmp / "afile")], 2, "not a directory"),
        (["--resume", str(tmp / "nowhere")], 2, "--resume"),
        (["--resume", str(tmp / "notackpt")], 2, "holds no Blues checkpoint"),
        (["--init_from", str(tmp / "nowhere")], 2, "--init_from"),
        (["--init_from", str(tmp / "afile")], 1, "afile"),
    ]


def bad_input_one_line_exit_status_nothing_written(script, env, tmp_path, cases) -> None:
    """Every case of CASES (argv, exit status, text), run in this process on the module's corpus and
    config unless it names its own --out_dir: exactly that status, one line of error, no out_dir."""
    for argv, status, text in cases:
        out = tmp_path / "run_out"
        full = ["--data", env["corpus"], "--config", env["config"], "--out_dir", str(out), *argv] \
            if "--out_dir" not in argv else argv
        rc, _, err = run_inproc(script, full)
        err = err.strip()
        assert rc == status, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert ": error: " in err and text in err, (argv, err)
        assert not out.exists(), argv


def resume_refusals(script, framework, env, straight, tmp_path, *, extra_cases=()) -> None:
    """Resumes of the reference run that are refused (in this process) and leave its metrics as they
    were: no --resume over a run with checkpoints, another model config, the other framework's
    checkpoint, and EXTRA_CASES (argv, exit status, text)."""
    before = (straight["out"] / "metrics.jsonl").read_bytes()
    other = "torch" if framework == "jax" else "jax"
    other_run = tmp_path / f"{other}run"
    shutil.copytree(straight["out"], other_run)
    manifest_path = step_dir(other_run, 6) / "COMMITTED"
    manifest_path.write_text(manifest_path.read_text().replace(f'"framework": "{framework}"',
                                                               f'"framework": "{other}"'))
    other_config = json.dumps({**json.loads(env["config"]), "hidden_size": 48})
    cases = [
        (base_args(env, straight["out"], "--max_steps", "8"), 2, "already holds checkpoints"),
        ([*base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto"), "--config", other_config], 1,
         "hidden_size (checkpoint 32, this run 48)"),
        (base_args(env, other_run, "--max_steps", "8", "--resume", "auto"), 1, f"is a {other} checkpoint"),
        *extra_cases,
    ]
    for argv, status, text in cases:
        rc, _, err = run_inproc(script, argv)
        err = err.strip()
        assert rc == status and text in err and "Traceback" not in err, (argv, err)
    assert (straight["out"] / "metrics.jsonl").read_bytes() == before


def bad_flag_exit_status_from_the_real_process(script, env, tmp_path) -> None:
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, script, "--lr", "0", "--out_dir", str(out)], cwd=REPO,
                          env=env["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{script}: error: --lr: must be a positive number, got 0.0"
    assert not out.exists()


# ---- checks run through the module's `train` ---------------------------------------------------------

def max_minutes_ends_the_run_like_max_steps(train, env, tmp_path: Path) -> None:
    """A time budget that is over after the first step: the run still evaluates, checkpoints, plots
    and prints its summary at that step, and exits 0 (not as an interrupted run)."""
    out = tmp_path / "timed"
    proc = train(env, out, "--max_steps", "100000", "--max_minutes", "0.0001", "--eval_every", "100000",
                 "--save_every", "100000")
    assert "--max_minutes 0.0001 reached after step 1" in proc.stderr
    assert "to resume" not in proc.stdout and "done: trained 1 steps" in proc.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in train_records(records)] == [1]
    assert [r["step"] for r in eval_records(records)] == [1]
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [1]
    assert (out / "loss.png").is_file() and (out / "experts.png").is_file()


def save_best_exports_the_best_evaluation(train, env, tmp_path: Path) -> None:
    """--save_best: DIR/best holds exactly the weights of the checkpoint at the best evaluation."""
    from parity.checkpoint_read import read_source

    out = tmp_path / "best"
    proc = train(env, out, "--max_steps", "4", "--eval_every", "1", "--save_every", "1", "--keep_checkpoints", "4",
                 "--save_best")
    best = min(eval_records(read_metrics(out / "metrics.jsonl")), key=lambda r: r["val_loss"])
    exported = read_source(out / "best", with_optimizer=False)
    assert exported.kind == "export"
    assert f"at step {best['step']} in {out / 'best'}" in proc.stdout
    at_step = read_source(out / "checkpoints" / ckpt.step_dirname(best["step"]), with_optimizer=False)
    assert exported.arrays.keys() == at_step.arrays.keys()
    assert all(np.array_equal(exported.arrays[k], at_step.arrays[k]) for k in at_step.arrays)

"""train_torch.py end to end on CPU: metrics, plots, checkpoints, exact resume, bad input, SIGTERM, NaN.

Every run trains a small model (d 32, 2 layers, T 16; the vocabulary stays o200k's 200,019) on a
small generated corpus. Runs that must be real processes (the resumed half of the exact-resume
test, SIGTERM, the exit status) are subprocesses; the others call
`train_torch.main` in this process to save torch's import time. Every run uses one CPU thread
(OMP_NUM_THREADS=1 / torch.set_num_threads(1)): the bitwise comparisons need the same kernels in
every run, and on a loaded 2-core machine two-thread barriers cost more than they gain here.
"""
import contextlib
import io
import csv
import importlib.util
import json
import os
import re
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.hashing import sha256_file
from blues.cli import run_main
from blues.metrics import TRAIN_KEYS, eval_records, read_metrics, train_records
from trainer_checks import max_minutes_ends_the_run_like_max_steps, save_best_exports_the_best_evaluation

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})
WORDS = ("the of and to a in that is was he for it with as his on be at by this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may then "
         "do first any my now such like our over man me even most made after also did many before must").split()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small corpus and a shared token cache for every run of this module."""
    root = tmp_path_factory.mktemp("train_torch")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.csv"
    with open(corpus, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(300):
            w.writerow([" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))).capitalize() + "."])
    environ = dict(os.environ, BLUES_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    import torch

    threads, cache = torch.get_num_threads(), os.environ.get("BLUES_CACHE")
    torch.set_num_threads(1)
    os.environ["BLUES_CACHE"] = environ["BLUES_CACHE"]
    yield {"root": root, "corpus": str(corpus), "env": environ}
    torch.set_num_threads(threads)
    if cache is None:
        os.environ.pop("BLUES_CACHE", None)
    else:
        os.environ["BLUES_CACHE"] = cache


def base_args(env, out_dir, *extra):
    return ["--data", env["corpus"], "--config", CONFIG, "--batch_size", "2", "--eval_batches", "2",
            "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "2", "--out_dir", str(out_dir), *extra]


def train(env, out_dir, *extra, check=True, timeout=120):
    proc = subprocess.run([sys.executable, "train_torch.py", *base_args(env, out_dir, *extra)], cwd=REPO,
                          env=env["env"], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


_TRAIN_TORCH = None


def train_torch_module():
    global _TRAIN_TORCH
    if _TRAIN_TORCH is None:
        spec = importlib.util.spec_from_file_location("train_torch", REPO / "train_torch.py")
        _TRAIN_TORCH = importlib.util.module_from_spec(spec)
        sys.modules["train_torch"] = _TRAIN_TORCH  # dataclasses look their module up there
        spec.loader.exec_module(_TRAIN_TORCH)
    return _TRAIN_TORCH


def run_inproc(argv):
    """train_torch.main(argv) in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_main(train_torch_module().main, argv)
    return rc, out.getvalue(), err.getvalue()


def train_inproc(env, out_dir, *extra, status=0):
    rc, stdout, stderr = run_inproc(base_args(env, out_dir, *extra))
    assert rc == status, stderr[-3000:]
    return stdout, stderr


def weights(step_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(step_dir) / "model.safetensors"))


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def step_dir(out_dir, step):
    return Path(out_dir) / "checkpoints" / ckpt.step_dirname(step)


@pytest.fixture(scope="module")
def straight(env):
    """The reference: 6 steps in one go, evaluating and saving at 3 and 6."""
    out = env["root"] / "straight"
    stdout, stderr = train_inproc(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3")
    return {"out": out, "stdout": stdout, "stderr": stderr}


def test_metrics_plots_tensorboard_summary(straight):
    out = straight["out"]
    records = read_metrics(out / "metrics.jsonl")
    train_recs, evals = train_records(records), eval_records(records)
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    for r in train_recs:
        assert tuple(r) == TRAIN_KEYS
        assert all(isinstance(r[k], float) for k in TRAIN_KEYS[1:-1]) and r["skipped_steps"] == 0
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"], rel=1e-6)
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]  # lr 1e-2 on a tiny corpus: it learns at once
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


def test_checkpoint_contents_and_reload(straight):
    import torch

    from blues.config import BluesConfig
    from blues_torch import BluesModel

    path = step_dir(straight["out"], 6)
    manifest = ckpt.verify(path)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"}
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["step"] == 6 and state["bad_steps"] == {"skipped": 0, "consecutive": 0}
    cfg = BluesConfig.from_dict(state["model_config"])
    model = BluesModel(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights(path).items()}, strict=True)
    assert torch.all(model.embed[cfg.vocab_size:] == 0)  # padding rows stay exactly zero under AdamW
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.1, 0.0]  # matrices decayed, norm scales not
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert {"torch_cpu", "router"} <= set(rng)
    assert not same_weights(weights(step_dir(straight["out"], 3)), weights(path))


def test_exact_resume_is_bitwise(env, straight, tmp_path):
    out = tmp_path / "resumed"
    stdout, stderr = train_inproc(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3",
                                  "--stop_after", "3")
    assert "--stop_after 3" in stderr and "to resume: python train_torch.py" in stdout
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [3]
    train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--resume", "auto")
    ref, got = read_metrics(straight["out"] / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    strip = lambda recs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in recs]  # noqa: E731
    assert strip(train_records(got)) == strip(train_records(ref))  # floats compared exactly
    assert eval_records(got) == eval_records(ref)
    assert same_weights(weights(step_dir(out, 6)), weights(step_dir(straight["out"], 6)))


def test_damaged_latest_checkpoint_falls_back_to_previous(env, straight, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(straight["out"], out)
    f = step_dir(out, 6) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # a truncated file: the checksum no longer matches
    _, stderr = train_inproc(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--resume", "auto")
    assert "skipping" in stderr and "does not match its checksum" in stderr
    assert "resuming from" in stderr and "step_00000003 at step 3" in stderr
    assert same_weights(weights(step_dir(out, 6)), weights(step_dir(straight["out"], 6)))
    assert read_metrics(out / "metrics.jsonl")[-1] == read_metrics(straight["out"] / "metrics.jsonl")[-1]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_in_checkpoint_is_refused_not_run(env, straight, tmp_path):
    out = tmp_path / "evil"
    shutil.copytree(straight["out"], out)
    marker = tmp_path / "pwned"
    path = step_dir(out, 6)
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _Payload(marker)}))
    # The attacker also rewrites the manifest, so the checksums pass and only weights_only stands guard.
    manifest = json.loads((path / "COMMITTED").read_text())
    manifest["files"]["optimizer.pt"] = sha256_file(path / "optimizer.pt")
    (path / "COMMITTED").write_text(json.dumps(manifest))
    _, stderr = train_inproc(env, out, "--max_steps", "8", "--resume", "auto", status=1)
    assert "cannot be loaded safely (refused, nothing executed)" in stderr and "Traceback" not in stderr
    assert not marker.exists()


def test_graceful_sigterm_checkpoints_and_exits_0(env, tmp_path):
    out = tmp_path / "sigterm"
    proc = subprocess.Popen([sys.executable, "train_torch.py", *base_args(env, out, "--max_steps", "100000",
                                                                        "--eval_every", "100000",
                                                                        "--save_every", "100000")],
                            cwd=REPO, env=env["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while time.time() < deadline and not train_records(read_metrics(out / "metrics.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 0, stderr[-2000:]
    assert "SIGTERM received" in stderr and "to resume: python train_torch.py" in stdout
    last = train_records(read_metrics(out / "metrics.jsonl"))[-1]["step"]
    assert 1 <= last < 100000
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [last]
    ckpt.verify(step_dir(out, last))


def test_nonfinite_steps_are_skipped_then_stop_the_run(env, tmp_path):
    out = tmp_path / "nan"
    _, stderr = train_inproc(env, out, "--max_steps", "8", "--eval_every", "100", "--save_every", "1",
                             "--keep_checkpoints", "10", "--inject_nan", "2,4,5", "--max_bad_steps", "2", status=1)
    assert "stopped after 2 consecutive non-finite steps (step 5)" in stderr
    recs = {r["step"]: r for r in train_records(read_metrics(out / "metrics.jsonl"))}
    assert sorted(recs) == [1, 2, 3, 4, 5]
    assert [recs[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert recs[2]["loss"] is None and recs[3]["loss"] is not None
    w = {s: weights(step_dir(out, s)) for s in range(1, 6)}
    assert same_weights(w[1], w[2])  # the skipped update left the weights alone
    assert not same_weights(w[2], w[3])
    assert same_weights(w[3], w[5])  # stopped with the last good state saved


def test_grad_accumulation_averages_micro_batches(env, tmp_path):
    # Router noise off, so both runs route every token the same way. The lm and z losses are means
    # over tokens, so one batch of 2 and two micro-batches of 1 (the same two windows: the data
    # order does not depend on the batch size) give the same value up to float32 summation order;
    # the load-balancing loss is not a per-token mean and legitimately differs.
    quiet = json.dumps({**json.loads(CONFIG), "router_noise_std": 0.0})
    first = {}
    for name, batch, accum in (("whole", "2", "1"), ("accum", "1", "2")):
        out = tmp_path / name
        train_inproc(env, out, "--config", quiet, "--batch_size", batch, "--grad_accum", accum, "--max_steps", "1")
        first[name] = train_records(read_metrics(out / "metrics.jsonl"))[0]
    for key in ("lm_loss", "z_loss"):
        assert first["accum"][key] == pytest.approx(first["whole"][key], rel=1e-6)
    # Only the aux-loss gradient (weight 0.01) differs: measured 1.4e-5 relative; a missing 1/G would be 2x.
    assert first["accum"]["grad_norm"] == pytest.approx(first["whole"]["grad_norm"], rel=1e-3)


def test_init_from_an_export_starts_from_its_weights(env, tmp_path):
    import torch

    from blues.train_args import load_model_config
    from blues_torch import BluesModel
    from parity.convert import to_canonical, to_module_arrays
    from parity.safetensors_io import save_export

    cfg = load_model_config("tiny", CONFIG)
    torch.manual_seed(123)  # not the run's seed: the run must not re-initialise
    arrays = to_canonical(BluesModel(cfg))
    save_export(tmp_path / "export", arrays, cfg)
    out = tmp_path / "init"
    # Step 1's update is skipped (NaN injected), so the saved weights are exactly the starting ones.
    train_inproc(env, out, "--init_from", str(tmp_path / "export"), "--max_steps", "1", "--inject_nan", "1")
    saved = weights(step_dir(out, 1))
    expected = to_module_arrays(arrays, cfg)
    assert saved.keys() == expected.keys() and all(np.array_equal(saved[k], expected[k]) for k in saved)


def test_compile_matches_eager_losses(env, straight, tmp_path):
    """--compile runs the same training: the reference run's six steps again under torch.compile,
    router noise and dropout on (inductor's fallback_random draws eager's numbers). Tolerance: fused
    kernels reorder float32 sums; measured ~1e-7 relative, 1e-5 allowed."""
    out = tmp_path / "compiled"
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--compile")
    # it did compile (on CPU the per-expert loop's data-dependent shapes break the model into ~20
    # graphs, and an expert's token count changing can add one later; the GPU's grouped GEMM makes 2)
    graphs = re.search(r"torch.compile: (\d+) graph\(s\) compiled for the training step", proc.stderr)
    assert graphs and int(graphs.group(1)) >= 1, proc.stderr[-2000:]
    eager = train_records(read_metrics(straight["out"] / "metrics.jsonl"))
    compiled = train_records(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, 7))
    for a, b in zip(compiled, eager):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)

def test_save_best_exports_the_best_evaluation(env, tmp_path):
    save_best_exports_the_best_evaluation(train, env, tmp_path)


def test_max_minutes_ends_the_run_like_max_steps(env, tmp_path):
    max_minutes_ends_the_run_like_max_steps(train, env, tmp_path)

# ---- bad input: one line, the right exit status, nothing left behind ---------------------------------

def _bad_cases(tmp):
    (tmp / "bad.json").write_text("{not json")
    (tmp / "notext.csv").write_text("Title,Body\na,b\n")
    (tmp / "empty.csv").write_text("")
    (tmp / "binary.csv").write_bytes(b"\x00\xff\xfe\x00" * 64)
    (tmp / "afile").write_text("x")
    (tmp / "notackpt").mkdir()
    return [
        # (argv, exit status, text the one line must contain)
        (["--lr", "0"], 2, "--lr"),
        (["--lr", "-1e-3"], 2, "--lr"),
        (["--lr", "abc"], 2, "--lr"),
        (["--max_steps", "0"], 2, "--max_steps"),
        (["--max_minutes", "0"], 2, "--max_minutes"),
        (["--max_minutes", "nan"], 2, "--max_minutes"),
        (["--batch_size", "-2"], 2, "--batch_size"),
        (["--grad_accum", "0"], 2, "--grad_accum"),
        (["--min_lr", "1", "--lr", "0.1"], 2, "--min_lr"),
        (["--warmup_steps", "-1"], 2, "--warmup_steps"),
        (["--weight_decay", "-0.1"], 2, "--weight_decay"),
        (["--grad_clip", "-1"], 2, "--grad_clip"),
        (["--eval_every", "0"], 2, "--eval_every"),
        (["--max_bad_steps", "0"], 2, "--max_bad_steps"),
        (["--precision", "fp16"], 2, "--precision"),
        (["--attn_impl", "magic"], 2, "--attn_impl"),
        (["--preset", "huge"], 2, "known presets: tiny, small, bench"),
        (["--bogus_flag"], 2, "--bogus_flag"),
        (["--config", str(tmp / "bad.json")], 1, "not valid JSON"),
        (["--config", '{"hidden_size": -4}'], 1, "'hidden_size'"),
        (["--config", '{"hidden_sise": 32}'], 1, "hidden_sise"),
        (["--config", str(tmp / "missing.json")], 2, "--config"),
        (["--data", str(tmp / "missing.csv")], 2, "missing.csv does not exist"),
        (["--data", str(tmp / "notext.csv")], 1, "columns found: 'Title', 'Body'"),
        (["--data", str(tmp / "empty.csv")], 1, "empty.csv"),
        (["--data", str(tmp / "binary.csv")], 1, "binary.csv"),
        (["--deepspeed", str(tmp / "missing_ds.json")], 2, "--deepspeed"),
        (["--out_dir", str(tmp / "afile")], 2, "not a directory"),
        (["--resume", str(tmp / "nowhere")], 2, "--resume"),
        (["--resume", str(tmp / "notackpt")], 1, "holds no Blues checkpoint"),
        (["--init_from", str(tmp / "nowhere")], 2, "--init_from"),
        (["--init_from", str(tmp / "afile")], 1, "afile"),
    ]


def test_bad_input_one_line_exit_status_nothing_written(env, tmp_path):
    for argv, status, text in _bad_cases(tmp_path):
        out = tmp_path / "run_out"
        full = ["--config", CONFIG, "--out_dir", str(out), *argv] if "--out_dir" not in argv else argv
        rc, _, err = run_inproc(full)
        err = err.strip()
        assert rc == status, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
        assert text in err, (argv, err)
        assert not out.exists(), argv


def test_resume_refusals(env, straight, tmp_path):
    before = (straight["out"] / "metrics.jsonl").read_bytes()
    jax_like = tmp_path / "jaxrun"
    shutil.copytree(straight["out"], jax_like)
    manifest_path = step_dir(jax_like, 6) / "COMMITTED"
    manifest_path.write_text(manifest_path.read_text().replace('"framework": "torch"', '"framework": "jax"'))
    other = json.dumps({**json.loads(CONFIG), "hidden_size": 48})
    cases = [
        (base_args(env, straight["out"], "--max_steps", "8"), 2, "already holds checkpoints"),
        (base_args(env, straight["out"], "--max_steps", "6", "--resume", "auto"), 2, "already at step 6"),
        ([*base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto"), "--config", other], 1,
         "hidden_size (checkpoint 32, this run 48)"),
        (base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto", "--seed", "3"), 1, "seed"),
        (base_args(env, jax_like, "--max_steps", "8", "--resume", "auto"), 1, "is a jax checkpoint"),
    ]
    for argv, status, text in cases:
        rc, _, err = run_inproc(argv)
        err = err.strip()
        assert rc == status and text in err and "Traceback" not in err, (argv, err)
    assert (straight["out"] / "metrics.jsonl").read_bytes() == before


def test_bad_flag_exit_status_from_the_real_process(env, tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, "train_torch.py", "--lr", "0", "--out_dir", str(out)], cwd=REPO,
                          env=env["env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train_torch.py: error: --lr: must be a positive number, got 0.0"
    assert not out.exists()

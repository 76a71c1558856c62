"""`python -m parity.convert_checkpoint` on real checkpoints written by both trainers (issue 5, item 2).

Both trainers run a small model (d 32, 2 layers, T 16; o200k's 200,019-token vocabulary, since the
tokenizer is involved) for 4 of 6 scheduled steps on a generated corpus, checkpointing at steps 2
and 4, float32 on CPU (one JAX device). Router noise is off: its random streams are
framework-specific and restart from the seed in the other framework (the script says so), so with
noise on the converted run would differ by design.

- A run converted at step 2 continues in the other framework with the same losses at steps 3 and 4
  (within 1e-5 relative): step 3 tests the weights and data position, step 4 also the converted
  AdamW moments and step count (the update of step 3).
- Round trips through the other framework and through safetensors give back every tensor (weights,
  moments) bit for bit, and the training state.
- A converted run keeps the source run's metrics history up to its step (so its logs and plots
  continue); a safetensors export holds the weights alone unless `--with_optimizer`; every file
  written has the permissions the umask gives new files (no private 0600 temporaries).
- Bad inputs (not a checkpoint, truncated, wrong config, missing tensor, a pickle that would run
  code, a failure while writing) cost one line and a non-zero exit, and leave nothing behind.

DeepSpeed ZeRO checkpoints are converted in test_deepspeed_zero_run_continues_plain (two CPU ranks).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.cli import run_main
from blues.metrics import read_metrics, train_records
from trainer_checks import write_corpus

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4, "chosen_num_experts": 2,
                     "embedding_multiplier_scale": 2, "router_noise_std": 0.0})
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Corpus, token cache and a persistent XLA compilation cache shared by every run of this module."""
    root = tmp_path_factory.mktemp("convert")
    corpus = write_corpus(root / "corpus.csv", documents=200)
    environ = dict(os.environ, BLUES_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   JAX_COMPILATION_CACHE_DIR=str(root / "xla"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                   XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return {"root": root, "corpus": str(corpus), "env": environ}


def flags(env, out_dir, *extra, config=CONFIG):
    """The run's flags: the converted run is resumed with the same ones (the global batch included)."""
    return ["--data", env["corpus"], "--config", config, "--batch_size", "2", "--eval_every", "100",
            "--eval_batches", "1", "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "2", "--max_steps", "6",
            "--stop_after", "4", "--save_every", "2", "--out_dir", str(out_dir), *extra]


def train(env, framework, out_dir, *extra, config=CONFIG):
    proc = subprocess.run([sys.executable, f"train_{framework}.py", *flags(env, out_dir, *extra, config=config)], cwd=REPO,
                          env=env["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["step"]: r for r in train_records(read_metrics(Path(out_dir) / "metrics.jsonl"))}


def convert(*argv) -> tuple[int, str, str]:
    """`python -m parity.convert_checkpoint ARGV` in this process: (exit status, stdout, stderr)."""
    from parity.convert_checkpoint import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_main(main, [str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def step_dir(run, step):
    return Path(run) / "checkpoints" / ckpt.step_dirname(step)


@pytest.fixture(scope="module")
def runs(env):
    """A torch run and a JAX run, each 4 steps with checkpoints at 2 and 4."""
    root = env["root"]
    return {"torch": root / "torch", "jax": root / "jax",
            "torch_losses": train(env, "torch", root / "torch"), "jax_losses": train(env, "jax", root / "jax")}


def assert_same_losses(continued: dict, original: dict, steps=(3, 4), keys=("loss", "lm_loss", "aux_loss", "z_loss")):
    for step in steps:
        for key in keys:
            a, b = original[step][key], continued[step][key]
            assert abs(a - b) <= LOSS_RTOL * abs(a), (step, key, a, b)


# ---- a run converted mid-training continues in the other framework --------------------------------

def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def assert_plain_modes(root: Path):
    """Every file and directory under root has the mode a plain open()/mkdir() gives under the umask."""
    for path in [root, *root.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask()
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))


@pytest.mark.parametrize("source,target", [("torch", "jax"), ("jax", "torch")])
def test_converted_run_continues_in_the_other_framework(env, runs, source, target, tmp_path):
    dst = tmp_path / f"{source}_to_{target}"
    rc, out, err = convert(step_dir(runs[source], 2), dst, "--to", target)
    assert rc == 0, err
    assert "step 2" in out and "optimizer: AdamW step 2" in out
    assert_plain_modes(dst)
    # the history up to the converted step comes along, record for record, with its TensorBoard scalars
    history = read_metrics(runs[source] / "metrics.jsonl")
    assert read_metrics(dst / "metrics.jsonl") == [r for r in history if r["step"] <= 2]
    assert any((dst / "tb").glob("events.out.tfevents.*"))
    continued = train(env, target, dst, "--resume", "auto")
    assert sorted(continued) == [1, 2, 3, 4]  # the loss plot and summary see the whole run
    assert_same_losses(continued, runs[f"{source}_losses"], steps=(1, 2, 3, 4))


# ---- round trips, optimizer state included --------------------------------------------------------

def torch_files(step_path: Path):
    """(weights by name, AdamW state dict, trainer state) of a plain train_torch.py checkpoint."""
    import torch
    from safetensors.numpy import load_file

    return (load_file(step_path / "model.safetensors"),
            torch.load(step_path / "optimizer.pt", weights_only=True),
            json.loads((step_path / ckpt.TRAINER_STATE).read_text()))


def jax_arrays(step_path: Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(step_path.resolve() / "arrays").item_metadata.tree
        tree = c.restore(step_path.resolve() / "arrays", args=ocp.args.PyTreeRestore(
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def same_training_state(a: dict, b: dict):
    for key in ("step", "model_config", "data", "bad_steps", "world_size"):
        assert a[key] == b[key], key
    drop = lambda d: {k: v for k, v in d.items() if k not in ("framework", "deepspeed")}  # noqa: E731
    assert drop(a["train_args"]) == drop(b["train_args"])


def test_torch_round_trips_are_bit_exact(runs, tmp_path):
    original = step_dir(runs["torch"], 2)
    w0, opt0, st0 = torch_files(original)
    for via in ("jax", "safetensors"):
        extra = ["--with_optimizer"] if via == "safetensors" else []
        assert convert(original, tmp_path / via, "--to", via, *extra)[0] == 0
        assert convert(tmp_path / via, tmp_path / f"{via}_back", "--to", "torch")[0] == 0
        w1, opt1, st1 = torch_files(step_dir(tmp_path / f"{via}_back", 2))
        assert w0.keys() == w1.keys() and all(np.array_equal(w0[k], w1[k]) for k in w0), via
        assert opt0["state"].keys() == opt1["state"].keys()
        for i, entry in opt0["state"].items():
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert entry[key].equal(opt1["state"][i][key]), (via, i, key)
        for g0, g1 in zip(opt0["param_groups"], opt1["param_groups"]):
            assert g0 == g1, via  # hyperparameters, group membership and implementation flags
        same_training_state(st0, st1)


def test_jax_round_trip_is_bit_exact(runs, tmp_path):
    original = step_dir(runs["jax"], 2)
    assert convert(original, tmp_path / "t", "--to", "torch")[0] == 0
    assert convert(tmp_path / "t", tmp_path / "s", "--to", "safetensors", "--with_optimizer")[0] == 0
    assert convert(tmp_path / "s", tmp_path / "j", "--to", "jax")[0] == 0
    a, b = jax_arrays(original), jax_arrays(step_dir(tmp_path / "j", 2))
    assert a.keys() == b.keys()
    kept = [k for k in a if not k.startswith("['rng']")]  # the random streams restart (framework-specific)
    assert any("mu" in k for k in kept) and any("nu" in k for k in kept)
    for k in kept:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    same_training_state(json.loads((original / ckpt.TRAINER_STATE).read_text()),
                        json.loads((step_dir(tmp_path / "j", 2) / ckpt.TRAINER_STATE).read_text()))


def test_run_directory_means_its_latest_checkpoint(runs, tmp_path):
    rc, out, _ = convert(runs["jax"], tmp_path / "latest", "--to", "safetensors", "--with_optimizer")
    assert rc == 0 and "step 4" in out
    # the history travels in the export (no TensorBoard there), so export -> run keeps it too
    history = read_metrics(runs["jax"] / "metrics.jsonl")
    assert read_metrics(tmp_path / "latest" / "metrics.jsonl") == history and not (tmp_path / "latest" / "tb").exists()
    assert convert(tmp_path / "latest", tmp_path / "run", "--to", "torch")[0] == 0
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == history
    from parity.convert_checkpoint import read_source

    export = read_source(tmp_path / "latest")
    direct = read_source(step_dir(runs["jax"], 4))
    assert all(np.array_equal(export.arrays[k], direct.arrays[k]) for k in direct.arrays)
    assert export.optimizer.step == direct.optimizer.step == 4
    assert all(np.array_equal(export.optimizer.exp_avg_sq[k], direct.optimizer.exp_avg_sq[k])
               for k in direct.arrays)


def test_weights_only_reads_and_other_sources(runs, tmp_path):
    """`with_optimizer=False` (generate.py, parity.check) gives the same weights and no training state;
    the seed's `model_iter_N.pt` name means step N of a run; a `.pt` state dict converts, weights only."""
    import torch

    from blues.canonical import to_module_arrays
    from parity.convert_checkpoint import read_source

    for framework in ("torch", "jax"):
        full = read_source(step_dir(runs[framework], 2))
        light = read_source(step_dir(runs[framework], 2), with_optimizer=False)
        assert full.optimizer is not None and full.trainer_state is not None
        assert light.optimizer is None and light.trainer_state is None and light.rng is None
        assert light.kind == full.kind == framework and light.config == full.config
        assert all(np.array_equal(full.arrays[k], light.arrays[k]) for k in full.arrays)
    alias = read_source(runs["jax"] / "model_iter_4.pt", with_optimizer=False)
    assert alias.path == step_dir(runs["jax"], 4) and alias.framework == "jax"
    module = {k: torch.from_numpy(v) for k, v in to_module_arrays(full.arrays, full.config).items()}
    torch.save({"model": module, "config": full.config.to_dict()}, tmp_path / "weights.pt")
    rc, out, err = convert(tmp_path / "weights.pt", tmp_path / "export", "--to", "safetensors")
    assert rc == 0 and "optimizer: none" in out, err
    export = read_source(tmp_path / "export")
    assert all(np.array_equal(full.arrays[k], export.arrays[k]) for k in full.arrays)


def test_the_module_runs_as_a_script(runs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "parity.convert_checkpoint", str(step_dir(runs["torch"], 4)),
                           str(tmp_path / "export"), "--to", "safetensors", "--dtype", "bfloat16"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # weights and config only unless --with_optimizer; the step stays in the summary
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    assert "step 4" in proc.stdout and "bfloat16" in proc.stdout and "optimizer: not exported" in proc.stdout
    assert_plain_modes(tmp_path / "export")
    proc = subprocess.run([sys.executable, "-m", "parity.convert_checkpoint", str(tmp_path / "nowhere"),
                           str(tmp_path / "out"), "--to", "jax"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and one_error_line(proc.stderr, "does not exist")
    assert not (tmp_path / "out").exists()


# ---- bad inputs: one line, non-zero exit, nothing written -----------------------------------------

def _copy_step(runs, tmp, name) -> Path:
    dst = tmp / name / "checkpoints" / ckpt.step_dirname(2)
    shutil.copytree(step_dir(runs["torch"], 2), dst)
    return dst


class _Payload:
    """Unpickling this runs os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_cases(runs, tmp: Path):
    import torch

    from blues.safetensors_io import save_export, write_safetensors
    from parity.convert_checkpoint import read_source

    (tmp / "notes.txt").write_text("hello\n")
    (tmp / "empty").mkdir()
    truncated = _copy_step(runs, tmp, "truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    loaded = read_source(step_dir(runs["torch"], 2))
    save_export(tmp / "export", loaded.arrays, loaded.config)
    shutil.copytree(tmp / "export", tmp / "short_export")
    data = (tmp / "short_export" / "model.safetensors").read_bytes()
    (tmp / "short_export" / "model.safetensors").write_bytes(data[:len(data) // 2])
    shutil.copytree(tmp / "export", tmp / "wrong_config")
    other = json.loads((tmp / "export" / "config.json").read_text()) | {"hidden_size": 48}
    (tmp / "wrong_config" / "config.json").write_text(json.dumps(other))
    # A trainer checkpoint whose (consistently sealed) trainer state names another model config.
    resized = _copy_step(runs, tmp, "resized")
    state = json.loads((resized / ckpt.TRAINER_STATE).read_text())
    state["model_config"]["num_layers"] = 3
    (resized / ckpt.TRAINER_STATE).write_text(json.dumps(state))
    (resized / ckpt.MANIFEST).unlink()
    ckpt.seal(resized, 2, framework="torch")
    (tmp / "missing").mkdir()
    write_safetensors(tmp / "missing" / "model.safetensors",
                      {k: v for k, v in loaded.arrays.items() if k != "layers.1.attn.q"})
    (tmp / "missing" / "config.json").write_text(loaded.config.to_json())
    hostile = _copy_step(runs, tmp, "hostile")
    torch.save({"state": _Payload(tmp / "PWNED"), "param_groups": []}, hostile / "optimizer.pt")
    (hostile / ckpt.MANIFEST).unlink()
    ckpt.seal(hostile, 2, framework="torch")
    (tmp / "taken").mkdir()
    (tmp / "taken" / "file").write_text("x")
    for name, text in (("malformed", "{\"hidden_size\": 32,"), ("invalid", json.dumps(loaded.config.to_dict() | {"head_dim": 7}))):
        shutil.copytree(tmp / "export", tmp / name)
        (tmp / name / "config.json").write_text(text)
    (tmp / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    shutil.copytree(tmp / "export", tmp / "linked")
    (tmp / "linked" / "config.json").unlink()
    (tmp / "linked" / "config.json").symlink_to(tmp / "export" / "config.json")
    ok = step_dir(runs["torch"], 2)
    return [  # (argv, exit status, what the one line must say)
        ([tmp / "nowhere", tmp / "o1", "--to", "jax"], 2, "does not exist"),
        ([tmp / "model_iter_9.pt", tmp / "o16", "--to", "jax"], 2, "neither does step 9"),
        ([tmp / "notes.txt", tmp / "o2", "--to", "jax"], 2, "not a Blues checkpoint"),
        ([tmp / "empty", tmp / "o3", "--to", "torch"], 2, "holds no Blues checkpoint"),
        ([truncated, tmp / "o4", "--to", "jax"], 1, "does not match its checksum"),
        ([tmp / "short_export", tmp / "o5", "--to", "torch"], 1, "truncated?"),
        ([tmp / "wrong_config", tmp / "o6", "--to", "jax"], 1, "does not match the config stored in"),
        ([resized, tmp / "o7", "--to", "jax"], 1, "missing tensor 'layers.2."),
        ([tmp / "missing", tmp / "o8", "--to", "torch"], 1, "missing tensor 'layers.1.attn.q'"),
        ([hostile, tmp / "o9", "--to", "jax"], 1, "was refused"),
        ([tmp / "malformed", tmp / "o12", "--to", "jax"], 1, "not valid JSON"),
        ([tmp / "invalid", tmp / "o13", "--to", "jax"], 1, "'head_dim' must be even"),
        ([tmp / "noise.safetensors", tmp / "o14", "--to", "torch"], 1, "not a valid safetensors file"),
        ([tmp / "linked", tmp / "o15", "--to", "torch"], 1, "is a symbolic link"),
        ([ok, tmp / "taken", "--to", "jax"], 2, "already exists"),
        ([ok, tmp / "o10", "--to", "tensorflow"], 2, "invalid choice"),
        ([ok, tmp / "o11", "--to", "torch", "--dtype", "bfloat16"], 2, "--dtype bfloat16 applies to --to safetensors"),
        ([ok, tmp / "o17", "--to", "jax", "--with_optimizer"], 2, "--with_optimizer applies to --to safetensors"),
        ([tmp / "export", tmp / "o18", "--to", "safetensors", "--with_optimizer"], 2, "no optimizer state to export"),
    ]


def one_error_line(err: str, message: str) -> bool:
    """stderr ends with exactly one error line saying `message` (progress lines may precede it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    return "Traceback" not in err and errors == lines[-1:] and message in lines[-1]


def test_bad_inputs_one_line_and_nothing_written(runs, tmp_path):
    for argv, status, message in bad_cases(runs, tmp_path):
        before = set(os.listdir(tmp_path))
        rc, out, err = convert(*argv)
        assert rc == status, (argv, rc, err)
        assert one_error_line(err, message), (argv, err)
        dst = Path(argv[1])
        if dst.name != "taken":
            assert not dst.exists(), argv
        assert set(os.listdir(tmp_path)) == before, argv  # no temporary directory left behind
    assert not (tmp_path / "PWNED").exists(), "the pickle payload ran"


def test_failure_while_writing_leaves_nothing(runs, tmp_path, monkeypatch):
    from parity import convert_checkpoint

    real = convert_checkpoint.write_jax

    def full_disk(src, staging):
        real(src, staging)  # everything written into the staging directory ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(convert_checkpoint, "write_jax", full_disk)
    dst = tmp_path / "deep" / "er" / "out"
    rc, _, err = convert(step_dir(runs["torch"], 2), dst, "--to", "jax")
    assert rc == 1 and one_error_line(err, "No space left on device")
    assert os.listdir(tmp_path) == []  # neither DST, nor its staging directory, nor the parents made for it


# ---- DeepSpeed ZeRO -----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_deepspeed_zero_run_continues_plain(env, tmp_path):
    """ZeRO-2 over two CPU ranks (global batch 4), converted at step 2 through DeepSpeed's own
    zero_to_fp32 reassembly (master weights and, partitioned alike, the Adam moments): a plain
    single-process run with --batch_size 4 continues with the same losses, and the JAX conversion
    holds the same tensors.

    Data parallelism computes the load-balancing loss per rank (over each rank's tokens) and averages
    it, which is not the loss of the whole batch in one process, so this run turns it off
    (router_aux_loss_coef 0): then the loss, its gradients and the update are the global batch's in
    both, and every reported loss but aux_loss must match."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    launcher = Path(sys.executable).parent / "deepspeed"
    config = json.dumps(json.loads(CONFIG) | {"router_aux_loss_coef": 0.0})
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), "train_torch.py",
           "--deepspeed", "ds_config.json", "--precision", "fp32", *flags(env, out, config=config)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(env["env"], DS_ACCELERATOR="cpu"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds_losses = {r["step"]: r for r in train_records(read_metrics(out / "metrics.jsonl"))}
    # The DeepSpeed run's flags (its lr comes from ds_config.json unless given: it was given).
    rc, summary, err = convert(step_dir(out, 2), tmp_path / "plain", "--to", "torch")
    assert rc == 0, err
    assert "--batch_size 4 on one device" in summary
    continued = train(env, "torch", tmp_path / "plain", "--resume", "auto", "--batch_size", "4", config=config)
    assert_same_losses(continued, ds_losses, keys=("loss", "lm_loss", "z_loss"))
    assert convert(step_dir(out, 2), tmp_path / "jax", "--to", "jax")[0] == 0
    from parity.convert_checkpoint import read_source

    a, b = read_source(step_dir(tmp_path / "plain", 2)), read_source(step_dir(tmp_path / "jax", 2))
    for k in a.arrays:
        assert np.array_equal(a.arrays[k], b.arrays[k]) and np.array_equal(a.optimizer.exp_avg[k], b.optimizer.exp_avg[k])


# ---- python -m parity.check on the same checkpoints ------------------------------------------------

def check(*argv) -> tuple[int, str, str]:
    from parity.check import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = run_main(main, [str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


TEXT = "It was a bright cold day in April, and the clocks were striking thirteen. The old man said that it was late."


def test_check_passes_in_float32_and_reports_bfloat16(runs):
    rc, out, err = check("--checkpoint", runs["jax"], "--text", TEXT)
    assert rc == 0, out + err
    assert "float32" in out and out.strip().endswith("PASS")
    for row in ("max per-token KL", "mean per-token KL", "max |logit difference|", "routing agreement",
                "lm_loss relative difference"):
        assert row in out
    assert len([line for line in out.splitlines() if line[:5].strip().isdigit()]) == 2  # one row per layer
    # bfloat16: judged by the KL divergence only; the verdict and the exit status agree.
    rc, out, err = check("--checkpoint", step_dir(runs["torch"], 2), "--text", TEXT, "--dtype", "bfloat16")
    assert "bfloat16" in out and "reported" in out
    assert (rc == 0) == out.strip().splitlines()[-1].startswith("PASS"), out


def test_check_fails_when_the_frameworks_disagree(runs, monkeypatch):
    from parity import check as check_module

    real = check_module.build_models

    def one_weight_off(arrays, config, dtype):
        return real(arrays, config, dtype)[0], real(arrays | {"final_norm": arrays["final_norm"] * 1.001}, config, dtype)[1]

    monkeypatch.setattr(check_module, "build_models", one_weight_off)
    rc, out, _ = check("--checkpoint", runs["torch"], "--text", TEXT)
    assert rc == 1 and out.strip().splitlines()[-1].startswith("FAIL")
    assert "FAIL" in next(line for line in out.splitlines() if line.startswith("max |logit difference|"))


def test_check_bad_inputs(runs, tmp_path):
    from blues.safetensors_io import save_export
    from oracle import random_canonical
    from blues.config import BluesConfig

    small = BluesConfig(vocab_size=512, hidden_size=16, head_dim=8, num_attention_heads=2, num_key_value_heads=1,
                        num_layers=1, max_position_embeddings=16, tot_num_experts=2)
    save_export(tmp_path / "small", random_canonical(small), small)
    (tmp_path / "no_text.csv").write_text("Title,Body\na,b\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "latin1.csv").write_bytes("Text\ncaf\u00e9 cr\u00e8me\n".encode("latin-1") + bytes([0xff, 0xfe, 0x00]))
    ok = runs["torch"]
    cases = [
        (["--checkpoint", tmp_path / "nowhere"], 2, "does not exist"),
        (["--checkpoint", tmp_path / "small", "--text", TEXT], 2, "smaller than the tokenizer's"),
        (["--checkpoint", ok, "--text", "   "], 2, "blank"),
        (["--checkpoint", ok, "--data", tmp_path / "no_text.csv"], 1, "Text"),
        (["--checkpoint", ok, "--data", tmp_path / "empty.csv"], 1, "is empty"),
        (["--checkpoint", ok, "--data", tmp_path / "latin1.csv"], 1, "latin1.csv"),
        (["--checkpoint", ok, "--rows", "0"], 2, "--rows"),
        (["--checkpoint", ok, "--dtype", "float16"], 2, "invalid choice"),
        (["--checkpoint", ok, "--text", TEXT, "--data", tmp_path / "no_text.csv"], 2, "not allowed with"),
    ]
    for argv, status, message in cases:
        rc, out, err = check(*argv)
        assert rc == status and one_error_line(err, message), (argv, rc, err)

"""The framework-free training infrastructure: flags, schedule, metrics, utilization, checkpoint
directories, and the loop helpers (no torch, no jax: the test checks that too)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.hashing import sha256_file
from blues.errors import CheckpointError, ConfigError, UsageError
from blues.metrics import MetricsLogger, TRAIN_KEYS, read_metrics
from blues.schedule import learning_rate, learning_rate_table
from blues.train_args import DEFAULTS, parse_args, parse_mesh
from blues.train_loop import BadStepGuard, SpikeDetector, resume_command, sample_continuations, sample_next
from blues.utilization import ExpertStats, expert_utilization


def test_infrastructure_imports_neither_torch_nor_jax():
    code = ("import sys, blues.train_args, blues.schedule, blues.metrics, blues.utilization, blues.plots, "
            "blues.checkpointing, blues.train_loop; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- flags --------------------------------------------------------------------------------------------

def test_defaults_and_explicit_flags(tmp_path):
    args = parse_args(["--out_dir", str(tmp_path / "o")], "jax")
    assert (args.preset, args.max_steps, args.batch_size, args.lr) == ("tiny", DEFAULTS["max_steps"],
                                                                       DEFAULTS["batch_size"], DEFAULTS["lr"])
    assert args.explicit == {"out_dir"} and args.seq_len == 256 and args.data is None
    assert parse_args([], "torch").out_dir.startswith("runs" + os.sep)
    args = parse_args(["--lr", "1e-3", "--config", '{"num_layers": 2}', "--preset", "small"], "torch")
    assert args.explicit == {"lr", "config", "preset"}
    assert args.model_config.num_layers == 2 and args.model_config.hidden_size == 512  # small + override
    json.dumps(args.to_dict())  # checkpoints store it


@pytest.mark.parametrize("argv, error, text", [
    (["--lr", "0"], UsageError, "--lr"),
    (["--lr", "nan"], UsageError, "--lr"),
    (["--min_lr", "0.1", "--lr", "0.01"], UsageError, "--min_lr"),
    (["--batch_size", "0"], UsageError, "--batch_size"),
    (["--keep_checkpoints", "0"], UsageError, "--keep_checkpoints"),
    (["--preset", "x"], UsageError, "tiny, small, bench"),
    (["--config", '{"tot_num_experts": 2, "chosen_num_experts": 3}'], ConfigError, "chosen_num_experts"),
    (["--config", "[1, 2]"], UsageError, "--config"),  # not an object and not a file
    (["--inject_nan", "0"], UsageError, "--inject_nan"),
    (["--stop_after", "-1"], UsageError, "--stop_after"),
    (["--mesh", "data=2"], UsageError, "unrecognized"),  # a jax-only flag
])
def test_bad_flags(argv, error, text):
    with pytest.raises(error, match=text.replace("[", r"\[")):
        parse_args(argv, "torch")


def test_mesh_spec():
    assert parse_mesh("data=2,expert=4") == {"data": 2, "expert": 4}
    for bad, text in (("data=0", "positive"), ("model=2", "unknown mesh axis 'model'"), ("data", "AXIS=SIZE"),
                      ("data=2,data=2", "twice")):
        with pytest.raises(UsageError, match=text):
            parse_mesh(bad)


def test_out_dir_with_checkpoints_needs_resume(tmp_path):
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    with pytest.raises(UsageError, match="--resume auto"):
        parse_args(["--out_dir", str(tmp_path)], "torch")
    parse_args(["--out_dir", str(tmp_path), "--resume", "auto"], "torch")


# ---- schedule -----------------------------------------------------------------------------------------

def test_schedule_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    lrs = [learning_rate(s, **kw) for s in range(16)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # the first update (step index 0) already moves
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:14], lrs[5:14]))
    assert lrs[9] == pytest.approx(0.55)  # halfway through the decay: (lr + min_lr) / 2
    assert lrs[13] > 0.1 and lrs[14] == lrs[15] == 0.1
    table = learning_rate_table(**kw)
    assert table.dtype == np.float32 and table.shape == (15,)
    np.testing.assert_allclose(table, lrs[:15], rtol=1e-7)
    assert learning_rate(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=10) == 1.0


# ---- metrics and utilization ----------------------------------------------------------------------------

def test_metrics_records_resume_truncation_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path) as m:
        for step in (1, 2, 3):
            m.log_train(step=step, loss=np.float32(2.5) / step, lm_loss=1.0, aux_loss=1.0, z_loss=0.5, lr=1e-3,
                        grad_norm=float("nan") if step == 2 else 1.0, tokens_per_s=10.0, skipped_steps=int(step >= 2))
        m.log_eval(step=3, val_loss=2.0, experts=expert_utilization([[1, 3]]))
        m.text("sample/greedy", "hello", 3)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [tuple(r) for r in recs[:3]] == [TRAIN_KEYS] * 3
    assert recs[0]["loss"] == float(np.float32(2.5)) and recs[1]["grad_norm"] is None
    assert recs[3]["val_perplexity"] == pytest.approx(math.exp(2.0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.')  # a run killed mid-line
    MetricsLogger(tmp_path, resume_step=2).close()  # resuming from a step-2 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_expert_utilization():
    stats = ExpertStats()
    stats.update(np.array([[2, 2, 0, 0], [1, 1, 1, 1]]), np.array([1, 0]))
    stats.update(np.array([[2, 2, 0, 0], [1, 1, 1, 1]]), np.array([1, 0]))
    layers = stats.summary()
    assert layers[0]["fractions"] == [0.5, 0.5, 0.0, 0.0] and layers[0]["drop_rate"] == 0.25
    assert layers[0]["entropy"] == pytest.approx(math.log(2)) and layers[1]["entropy"] == pytest.approx(math.log(4))


def test_plots_are_written(tmp_path):
    from blues.plots import plot_experts, plot_losses

    with MetricsLogger(tmp_path, tensorboard=False) as m:
        m.log_train(step=1, loss=3.0, lm_loss=3.0, aux_loss=1.0, z_loss=0.0, lr=1e-3, grad_norm=1.0,
                    tokens_per_s=1.0, skipped_steps=0)
        m.log_eval(step=1, val_loss=3.1, experts=expert_utilization([[1, 2, 3, 4], [4, 3, 2, 1]]))
    plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    plot_experts(tmp_path / "metrics.jsonl", tmp_path / "experts.png")
    for name in ("loss.png", "experts.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.tmp.png"))


# ---- checkpoint directories --------------------------------------------------------------------------

def _save(root, step, payload=b"weights"):
    def write(tmp):
        (tmp / "model.bin").write_bytes(payload + bytes([step]))
        (tmp / "sub").mkdir()
        ckpt.write_json(tmp / "sub" / "state.json", {"step": step})
    return ckpt.save(root, step, write, framework="torch")


def test_save_verify_latest_good_prune(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    paths = [_save(root, s) for s in (1, 2, 3)]
    assert [c.step for c in ckpt.list_checkpoints(root)] == [1, 2, 3]
    assert ckpt.verify(paths[2])["files"].keys() == {"model.bin", "sub/state.json"}
    assert not list(root.glob(".tmp-*"))
    (paths[2] / "model.bin").write_bytes(b"flipped")
    assert ckpt.latest_good(root) == paths[1]
    assert "does not match its checksum" in capsys.readouterr().err
    (paths[1] / ckpt.MANIFEST).unlink()  # an uncommitted directory is never used
    assert ckpt.latest_good(root) == paths[0]
    assert ckpt.resolve_resume("auto", tmp_path) == paths[0]
    assert ckpt.resolve_resume(str(tmp_path), "elsewhere") == paths[0]
    with pytest.raises(CheckpointError, match="not a committed"):
        ckpt.resolve_resume(str(paths[1]), tmp_path)
    _save(root, 4)
    (root / ".tmp-step_00000005-999999999").mkdir()  # left by a killed save (no such process)
    removed = ckpt.prune(root, keep=2)
    assert paths[0] in removed and [c.step for c in ckpt.list_checkpoints(root)] == [2, 3, 4]  # 2: uncommitted
    assert not (root / ".tmp-step_00000005-999999999").exists()


def test_resave_replaces_a_step_atomically(tmp_path):
    root = tmp_path / "c"
    _save(root, 1, b"old")
    path = _save(root, 1, b"new")
    assert (path / "model.bin").read_bytes().startswith(b"new") and ckpt.verify(path)
    assert [p.name for p in root.iterdir()] == ["step_00000001"]


def test_manifest_cannot_point_outside_the_checkpoint(tmp_path):
    path = _save(tmp_path, 1)
    (tmp_path / "secret").write_text("x")
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["files"]["../secret"] = sha256_file(tmp_path / "secret")
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        ckpt.verify(path)
    os.symlink(tmp_path / "secret", path / "link")
    manifest["files"] = {"link": manifest["files"]["../secret"]}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="link"):
        ckpt.verify(path)


def test_resume_compatibility_names_fields(tmp_path):
    args = parse_args(["--out_dir", str(tmp_path)], "torch").to_dict()
    state = {"step": 5, "model_config": dict(args["model_config"], hidden_size=64), "train_args": dict(args)}
    with pytest.raises(CheckpointError, match=r"hidden_size \(checkpoint 64, this run 192\)"):
        ckpt.check_resume(state, args, world_size=1, checkpoint="c")
    state = {"step": 5, "model_config": args["model_config"], "train_args": dict(args, lr=1.0), "world_size": 2}
    with pytest.raises(CheckpointError, match="global_batch"):
        ckpt.check_resume(state, args, world_size=1, checkpoint="c")
    # the same global batch over a different number of ranks is fine; a changed lr is only noted
    notes = ckpt.check_resume(state, dict(args, batch_size=args["batch_size"] // 2), world_size=4, checkpoint="c")
    assert len(notes) == 1 and "--lr changed" in notes[0]


# ---- loop helpers --------------------------------------------------------------------------------------

def test_bad_step_guard():
    guard = BadStepGuard(max_bad_steps=2)
    assert guard.check(1.0, 1.0) and not guard.check(float("nan"), 1.0) and not guard.should_stop
    assert guard.check(1.0, 1.0) and guard.consecutive == 0 and guard.skipped == 1
    assert not guard.check(1.0, float("inf")) and not guard.check(float("nan"), float("nan"))
    assert guard.should_stop and guard.skipped == 3
    again = BadStepGuard(2)
    again.load_state_dict(guard.state_dict())
    assert again.should_stop


def test_spike_detector(capsys):
    spikes = SpikeDetector(factor=1.5, warmup=3)
    for step, loss in enumerate([5.0, 4.9, 4.8, 4.7, 9.0, 4.6], start=1):
        spikes.update(step, loss)
    assert spikes.spikes == [5] and "loss spike at step 5" in capsys.readouterr().err


def test_sampling():
    rng = np.random.default_rng(0)
    assert sample_next(np.array([1.0, 3.0, 3.0]), temperature=0.0, top_k=None, rng=rng) == 1  # ties: lower id
    logits = np.array([0.0, 5.0, 4.9, -1.0, 4.8])
    draws = {sample_next(logits, temperature=1.0, top_k=2, rng=rng) for _ in range(200)}
    assert draws == {1, 2}
    calls = []

    def next_logits(rows):  # [rows, 50]: a function of each row's last id; records the batch
        calls.append([len(r) for r in rows])
        assert all(len(r) <= 4 for r in rows)  # the context
        return np.stack([np.sin(np.arange(50) * (r[-1] + 1.0)) for r in rows])

    seq = lambda temps, seed: sample_continuations(next_logits, [3], temps, context=4, top_k=10,  # noqa: E731
                                                   seed=seed, max_new_tokens=12)
    greedy, sampled = seq([0.0, 0.8], 1)
    assert [greedy, sampled] == seq([0.0, 0.8], 1) and len(greedy) == len(sampled) == 12
    # a row's tokens do not depend on the rows beside it: each alone gives the same continuation
    assert seq([0.0], 1) == [greedy] and seq([0.8], 1) == [sampled] and sampled != seq([0.8], 2)[0]
    calls.clear()
    # a row that stops rides along (every forward has all rows) and stays stopped
    stop_first = lambda rows: np.stack([np.eye(5)[2] if i == 0 else np.eye(5)[(r[-1] + 1) % 2] for i, r in enumerate(rows)])  # noqa: E731
    out = sample_continuations(lambda rows: (calls.append(len(rows)), stop_first(rows))[1], [0], [0.0, 0.0],
                               context=4, stop_id=2, max_new_tokens=5)
    assert out == [[], [1, 0, 1, 0, 1]] and calls == [2] * 5


def test_resume_command():
    cmd = resume_command("train_torch.py", ["--lr", "1e-3", "--out_dir", "old", "--resume=x", "--local_rank=0"],
                         "runs/a b")
    assert cmd == "python train_torch.py --lr 1e-3 --out_dir 'runs/a b' --resume auto"


def test_best_export_keeps_the_best_evaluation_and_survives_a_resume(tmp_path):
    from oracle import random_canonical
    from blues.safetensors_io import read_safetensors
    from blues.config import BluesConfig
    from blues.train_loop import BestExport

    cfg = BluesConfig(vocab_size=512, hidden_size=16, head_dim=8, num_attention_heads=2, num_key_value_heads=1,
                      num_layers=1, max_position_embeddings=8)
    calls = []

    def arrays_of(step):
        def get():
            calls.append(step)
            return random_canonical(cfg, seed=step)
        return get

    best = BestExport(tmp_path, cfg, enabled=True)
    for step, loss in ((1, 3.0), (2, 2.0), (3, 2.5), (4, float("nan")), (5, 1.5), (6, 1.5)):
        best.update(step, loss, arrays_of(step))
    assert calls == [1, 2, 5]  # only improvements fetch (and, multi-host, gather) the weights
    arrays, meta = read_safetensors(tmp_path / "best" / "model.safetensors")
    assert meta["blues.step"] == "5" and float(meta["blues.val_loss"]) == 1.5
    assert all(np.array_equal(arrays[k], v) for k, v in random_canonical(cfg, seed=5).items())

    resumed = BestExport(tmp_path, cfg, enabled=True, resuming=True)
    assert (resumed.step, resumed.val_loss) == (5, 1.5)
    assert not resumed.update(7, 1.6, arrays_of(7)) and resumed.update(8, 1.4, arrays_of(8))
    fresh = BestExport(tmp_path, cfg, enabled=True)  # a new run in the same directory starts over
    assert fresh.step is None and fresh.update(1, 9.0, arrays_of(1))
    off = BestExport(tmp_path / "off", cfg, enabled=False)
    assert not off.update(1, 1.0, arrays_of(99)) and not (tmp_path / "off").exists()

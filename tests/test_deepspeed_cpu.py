"""train_torch.py under DeepSpeed on CPU: the real `deepspeed` launcher, 2 ranks, gloo, ZeRO-2.

The CPU accelerator (DS_ACCELERATOR=cpu) reports one device per NUMA node; `--num_gpus 2` asks
the launcher for two local ranks anyway. The first launch on a machine JIT-compiles DeepSpeed's
small shared-memory comm op (about a minute, cached under ~/.cache/torch_extensions).

Also checks, without launching, how flags and ds_config.json merge (one source of truth).
"""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.errors import ConfigError
from blues.metrics import read_metrics, train_records
from blues.schedule import learning_rate
from blues.train_args import parse_args

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})
DS_JSON = json.loads((REPO / "ds_config.json").read_text())
# ds_config.json with numbers where the project's file says "auto"
NUMERIC = {**DS_JSON, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
           "optimizer": {"type": "AdamW", "params": {**DS_JSON["optimizer"]["params"], "lr": 2e-3, "weight_decay": 0.2}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, out, *extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", BLUES_CACHE=str(tmp_path / "cache"), BLUES_WRITE_PARAM_HASH="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    port = _free_port()
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), "train_torch.py",
           "--deepspeed", "ds_config.json", "--precision", "fp32", "--data", str(tmp_path / "corpus.csv"),
           "--config", CONFIG, "--batch_size", "2", "--eval_batches", "2", "--eval_every", "100",
           "--save_every", "2", "--warmup_steps", "2", "--out_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # DeepSpeed's CPU all-reduce segments (66 MB of /dev/shm a rank) are released by the trainer
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, left
    return proc


def _hash(out, rank, tag):
    return (Path(out) / f"param_sha256_rank{rank}_{tag}.txt").read_text().strip()


def test_two_cpu_ranks_train_identically_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    words = "the of and to a in that is was he for it with as his on be at by this had not are but".split()
    with open(tmp_path / "corpus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(200):
            w.writerow([" ".join(rng.choice(words, size=40))])
    out = tmp_path / "run"

    proc = _launch(tmp_path, out, "--max_steps", "4")
    final = _hash(out, 0, "final")
    assert _hash(out, 1, "final") == final  # ZeRO-2 kept both ranks' weights identical
    path = out / "checkpoints" / ckpt.step_dirname(4)
    files = set(ckpt.verify(path)["files"])
    assert {"ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank00000.pt", "rng_rank00001.pt",
            "trainer_state.json"} <= files
    # One source of truth: --batch_size given -> written into the DeepSpeed config; lr "auto" in the
    # JSON -> the trainer's default, and the schedule runs from it; the starting lines say so.
    used = json.loads((out / "config.json").read_text())
    assert used["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 2
    assert used["deepspeed_config"]["train_batch_size"] == 4
    assert used["train_args"]["lr"] == used["deepspeed_config"]["optimizer"]["params"]["lr"] == 3e-3
    first = train_records(read_metrics(out / "metrics.jsonl"))[0]
    assert first["lr"] == learning_rate(0, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=4)
    assert ("batch: 2 sequences per micro-batch per rank (flag) x 2 ranks x 1 micro-batches accumulated (default) "
            "= a global batch of 4 sequences") in proc.stderr
    assert "lr 0.003 (default)" in proc.stderr and "precision fp32 (flag)" in proc.stderr

    _launch(tmp_path, out, "--max_steps", "6", "--resume", "auto")
    assert _hash(out, 0, "loaded") == _hash(out, 1, "loaded") == final  # the checkpoint reloads exactly
    assert _hash(out, 0, "final") == _hash(out, 1, "final") != final
    assert [r["step"] for r in train_records(read_metrics(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


# ---- flags and ds_config.json (no launch) ----------------------------------------------------------

def _resolve(tmp_path, ds: dict, *argv, world_size=2):
    sys.path.insert(0, str(REPO))
    try:
        import train_torch
    finally:
        sys.path.pop(0)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    args = parse_args(["--deepspeed", str(path), "--out_dir", str(tmp_path / "o"), *argv], "torch")
    return train_torch.resolve_deepspeed_config(args, world_size)


def test_flags_override_json_and_json_fills_the_rest(tmp_path):
    cfg, args, sources = _resolve(tmp_path, NUMERIC, "--lr", "5e-4", "--grad_accum", "3", "--precision", "fp32")
    assert cfg["optimizer"]["params"]["lr"] == args.lr == 5e-4
    assert cfg["gradient_accumulation_steps"] == args.grad_accum == 3
    assert cfg["train_micro_batch_size_per_gpu"] == args.batch_size == NUMERIC["train_micro_batch_size_per_gpu"]
    assert cfg["train_batch_size"] == args.batch_size * 3 * 2
    assert cfg["gradient_clipping"] == args.grad_clip == NUMERIC["gradient_clipping"]
    assert cfg["bf16"]["enabled"] is False and args.precision == "fp32"
    assert sources == {"batch_size": "ds.json", "weight_decay": "ds.json", "grad_clip": "ds.json"}
    cfg, args, sources = _resolve(tmp_path, NUMERIC)
    assert args.precision == "bf16" and cfg["bf16"]["check_grad_overflow"] is True and sources["precision"] == "ds.json"
    assert args.weight_decay == NUMERIC["optimizer"]["params"]["weight_decay"]


def test_auto_fields_take_the_trainers_values(tmp_path):
    """The project's ds_config.json says "auto" for what the plain trainer also sets: the same defaults."""
    cfg, args, sources = _resolve(tmp_path, DS_JSON, "--precision", "fp32")
    plain = parse_args(["--out_dir", str(tmp_path / "o")], "torch")
    for flag in ("batch_size", "grad_accum", "lr", "weight_decay", "grad_clip"):
        assert getattr(args, flag) == getattr(plain, flag), flag
    assert cfg["train_micro_batch_size_per_gpu"] == plain.batch_size and cfg["optimizer"]["params"]["lr"] == plain.lr
    assert cfg["gradient_clipping"] == plain.grad_clip and sources == {}
    assert "auto" not in json.dumps(cfg)  # DeepSpeed never sees "auto"


@pytest.mark.parametrize("change, field", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer.type"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"train_micro_batch_size_per_gpu": "8"}, "train_micro_batch_size_per_gpu"),
    ({"gradient_clipping": "max"}, "gradient_clipping"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1.0}}}, "--lr"),
])
def test_bad_deepspeed_config_is_refused_naming_the_field(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _resolve(tmp_path, {**DS_JSON, **change})

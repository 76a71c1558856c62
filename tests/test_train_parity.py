"""Cross-framework training parity: train_torch.py (plain) and train_jax.py take the same 20 steps.

Both trainers start from the same canonical weights (`--init_from`, an export written through
parity.convert), read the same batches (blues.data.BatchIterator, same seed and global batch), run
in float32 with router noise and dropout off, and apply the same update: AdamW (0.9, 0.95, 1e-8,
decoupled weight decay on matrices), the blues.schedule learning rate, clip_grad_norm_'s clipping
(clipping is active here: the gradient norm is above 1 at every step). What remains is float32
rounding: different kernels sum in different orders (attention, the expert GEMMs, the vocabulary
softmax, the gradient reductions), ~1e-7 relative per operation, and AdamW's normalised update
carries a small weight difference from step to step. The issue's bound is 1e-4 relative on the
loss at every step; the gradient norm (a more sensitive quantity) gets 1e-3.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blues.config import BluesConfig
from blues.metrics import eval_records, read_metrics, train_records

REPO = Path(__file__).resolve().parent.parent
FIELDS = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1, "num_layers": 2,
          "max_position_embeddings": 16, "tot_num_experts": 4, "embedding_multiplier_scale": 2,
          "router_noise_std": 0.0, "dropout": 0.0}
STEPS = 20
WORDS = ("the of and to a in that is was he for it with as his on be at by this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will more no if "
         "out so said what up its about into than them can only other new some could time these two may then").split()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    from parity.convert import new_model, to_canonical
    from blues.safetensors_io import save_export

    root = tmp_path_factory.mktemp("train_parity")
    rng = np.random.default_rng(2)
    corpus = root / "corpus.csv"
    corpus.write_text("Text\n" + "\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) + "."
                                           for _ in range(300)) + "\n")
    config = BluesConfig(**FIELDS)
    torch.manual_seed(0)
    init = save_export(root / "init", to_canonical(new_model(config, "torch")), config)

    env = dict(os.environ, BLUES_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "xla-cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = ["--data", str(corpus), "--config", json.dumps(FIELDS), "--init_from", str(init),
            "--max_steps", str(STEPS), "--batch_size", "2", "--lr", "1e-2", "--min_lr", "1e-3", "--warmup_steps", "3",
            "--eval_every", str(STEPS), "--save_every", str(STEPS), "--eval_batches", "2", "--precision", "fp32"]
    procs = {fw: subprocess.Popen([sys.executable, f"train_{fw}.py", *args, "--out_dir", str(root / fw)], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fw in ("torch", "jax")}
    out = {}
    for fw, proc in procs.items():
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"train_{fw}.py: {stderr[-3000:]}"
        out[fw] = read_metrics(root / fw / "metrics.jsonl")
    return out


def test_same_loss_curve_at_every_step(runs):
    ref, got = train_records(runs["torch"]), train_records(runs["jax"])
    assert [r["step"] for r in ref] == [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(ref, got):
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)  # the same schedule, step-indexed the same way
        for key in ("loss", "lm_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key, a[key], b[key])
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-4), a["step"]
        assert b["z_loss"] == pytest.approx(a["z_loss"], rel=1e-4), a["step"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), a["step"]
        assert a["grad_norm"] > 1.0  # clipping (max_norm 1) acted at this step, in both
    assert ref[-1]["loss"] < ref[0]["loss"] - 1.0  # and it is a real training run, not a flat line


def test_same_validation_loss_and_routing(runs):
    (a,), (b,) = eval_records(runs["torch"]), eval_records(runs["jax"])
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    for la, lb in zip(a["experts"], b["experts"]):
        assert lb["fractions"] == pytest.approx(la["fractions"], abs=1e-9)  # the same tokens to the same experts

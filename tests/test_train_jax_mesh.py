"""train_jax.py on a device mesh: 8 forced host devices, mesh data=2,expert=4, against one device.

The same seed, data and global batch (1 device x batch 8 vs 8 devices x batch 1) must give the same
run: the weights are initialised identically (threefry keys are sharding-invariant), the batches are
the same windows, and router noise is drawn the same whatever the sharding. On the mesh, tokens are
split over all 8 devices, experts 4 ways (each device holds one expert and exchanges tokens by
all-to-all), and every mean/sum over tokens or gradient all-reduce adds the same float32 numbers in
another order. So the losses agree to float32 summation error, not bit for bit (measured: 1 ulp,
~1e-7 relative, at every step). We allow 1e-5 relative: AdamW's normalised update can turn a
last-bit gradient difference into a slightly larger weight difference, and the margin keeps the
test about sharding bugs (a wrong all-to-all or a dropped shard moves the loss by far more). The
routing statistics (integer counts) match exactly.

The same holds across processes: two processes of 4 devices each, joined by
jax.distributed.initialize (--coordinator/--num_processes/--process_id, gloo between CPU processes),
form the same data=2,expert=4 mesh; each process feeds its half of every global batch.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blues.metrics import eval_records, read_metrics, train_records

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4, "chosen_num_experts": 2,
                     "embedding_multiplier_scale": 2})
WORDS = ("the of and to a in that is was he for it with as his on be at by this had not are but from or have "
         "an they which one you were her all she there would their we him been has when who will").split()
STEPS = 4


def _env(root, devices):
    return dict(os.environ, BLUES_CACHE=str(root / "mesh-blues-cache"),
                JAX_COMPILATION_CACHE_DIR=str(root / "xla-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _argv(root, out, *extra):
    corpus = root / "mesh_corpus.csv"
    if not corpus.exists():
        import numpy as np

        rng = np.random.default_rng(1)
        corpus.write_text("Text\n" + "\n".join(" ".join(rng.choice(WORDS, size=40)) + "." for _ in range(200)) + "\n")
    return [sys.executable, "train_jax.py", "--data", str(corpus), "--config", CONFIG, "--max_steps", str(STEPS),
            "--eval_every", str(STEPS), "--save_every", str(STEPS), "--eval_batches", "1", "--lr", "1e-2",
            "--warmup_steps", "1", "--out_dir", str(out), *extra]


def run(tmp_path_factory, out, devices, *extra):
    root = tmp_path_factory.getbasetemp()
    proc = subprocess.run(_argv(root, out, *extra), cwd=REPO, env=_env(root, devices), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return run(tmp_path_factory, tmp_path_factory.mktemp("mesh") / "one", 1, "--batch_size", "8")


def assert_same_run(ref, got):
    ref_train, got_train = train_records(ref), train_records(got)
    assert [r["step"] for r in got_train] == [r["step"] for r in ref_train] == list(range(1, STEPS + 1))
    for a, b in zip(ref_train, got_train):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
        assert b["lr"] == a["lr"]
    assert ref_train[-1]["loss"] < ref_train[0]["loss"]  # it trains (a 40-word vocabulary, lr 1e-2)
    (ev_ref,), (ev_got,) = eval_records(ref), eval_records(got)
    assert ev_got["val_loss"] == pytest.approx(ev_ref["val_loss"], rel=1e-5)
    # Every token went to the same experts (fractions are integer counts / total assignments).
    assert ev_got["experts"] == ev_ref["experts"]


def test_mesh_data2_expert4_matches_one_device(tmp_path_factory, one_device):
    out = tmp_path_factory.mktemp("mesh") / "mesh"
    mesh = run(tmp_path_factory, out, 8, "--batch_size", "1", "--mesh", "data=2,expert=4")
    assert json.loads((out / "config.json").read_text())["mesh"] == {"data": 2, "expert": 4}
    assert_same_run(one_device, mesh)


def test_two_processes_match_one_device(tmp_path_factory, one_device):
    root, out = tmp_path_factory.getbasetemp(), tmp_path_factory.mktemp("mesh") / "two_processes"
    with socket.socket() as sock:  # a free port for the coordinator
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(_argv(root, out, "--batch_size", "1", "--mesh", "data=2,expert=4",
                                    "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                                    "--process_id", str(i)),
                              cwd=REPO, env=_env(root, 4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert "done: trained" in outputs[0][0] and "done: trained" not in outputs[1][0]  # process 0 reports
    config = json.loads((out / "config.json").read_text())
    assert config["processes"] == 2 and config["mesh"] == {"data": 2, "expert": 4}
    assert_same_run(one_device, read_metrics(out / "metrics.jsonl"))

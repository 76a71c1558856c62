"""scripts/profile_gpu.py's reading of a compiled XLA module: the names a GPU profile shows for XLA's
fusions mean nothing until they are traced back to an instruction and the code that made it."""
from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import profile_gpu  # noqa: E402


def _scaled_tanh(x, y):
    return jnp.tanh(x * 3.0 + y).sum(axis=-1)  # one fusion: multiply, add, tanh and the reduction


def test_fusions_are_named_with_their_source_and_ops(capsys):
    hlo = jax.jit(_scaled_tanh).lower(jnp.ones((64, 128)), jnp.ones((64, 128))).compile().as_text()
    fusions = re.findall(r"%([\w.\-]+) = \S+ fusion\(", hlo)
    assert fusions, "the CPU compiler made no fusion of the test function"
    kernel = fusions[0].replace(".", "_")  # a GPU profile's kernel name for the instruction
    profile_gpu._print_fusions(hlo, [kernel, "some_library_kernel"], collections.Counter({kernel: 2_000_000}), 2)
    out = capsys.readouterr().out
    assert f"1.00 ms  {fusions[0]} = f32[64]" in out  # per step: 2 ms over 2 steps
    assert "tests/test_profile_tools.py:" in out and "_scaled_tanh" in out  # the line that made it
    assert "tanh" in out.split("fuses:")[1]  # the fused ops
    assert "some_library_kernel" not in out  # not a fusion: left out


def test_startup_profile_lists_the_trainers_phases_up_to_its_first_step(tmp_path):
    """scripts/startup_profile.py: the trainer runs to the end of its first step (and the evaluations
    asked for), the listing names Blues' entry points, and nothing after it runs (no checkpoint)."""
    import json
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    config = {"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
              "num_layers": 1, "max_position_embeddings": 16, "tot_num_experts": 2}
    out_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(repo / "scripts" / "startup_profile.py"), "--evaluations", "1",
                           "train_torch.py", "--config", json.dumps(config), "--eval_batches", "1",
                           "--out_dir", str(out_dir)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"^evaluation 1: [0-9.]+ s$", out, re.M), out
    assert "first step done" in out and "Blues' calls and package imports" in out
    assert re.search(r"^ +[0-9.]+ s  main \(blues_torch/train\.py:\d+\)$", out, re.M), out  # the trainer's entry
    assert re.search(r"^ +[0-9.]+ s  <module> \(torch/__init__\.py:\d+\)$", out, re.M), out  # a package import
    assert not (out_dir / "checkpoints").exists()  # it stopped after the profile

"""scripts/time_to_first_step.py on CPU: `--quick` for JAX only (train_torch.py --compile's C++ build
takes minutes on two cores; torch's side of the table is the same code reading the same two lines),
and its bad input."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/time_to_first_step.py"


def run_script(*argv, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_quick_jax_cold_then_repeated(tmp_path):
    """Both runs of the real trainer finish and report their first step and evaluation; the repeated
    run loads compiled programs from the persistent cache the cold run filled, the cold run from none
    (its cache directories start empty); the logs carry each line's time. ~45 s on the 2-core box."""
    proc = run_script("--quick", "--frameworks", "jax", "--steps", "1", "--warmup", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cold, repeated = json.loads((tmp_path / "time_to_first_step.json").read_text())
    assert (cold["run"], repeated["run"]) == ("cold", "repeated")
    for r in (cold, repeated):
        assert r["error"] is None
        # seconds from process start; the script's own clock starts before the process does
        assert 0 < r["first_step_s"] < r["first_eval_s"] < r["process_s"], r
        assert 0 < r["eval_s"] < r["first_eval_s"] and r["tokens_per_s"] > 0, r
    hits = [int(re.search(r"(\d+) from the cache", r["notes"])[1]) for r in (cold, repeated)]
    assert hits[0] == 0 and hits[1] >= 1, (cold["notes"], repeated["notes"])
    table = (tmp_path / "time_to_first_step.md").read_text()
    assert table in proc.stdout + "\n"
    assert "| JAX | cold |" in table and "| JAX | repeated |" in table
    assert not (tmp_path / "run" / "jax").exists()
    with open(tmp_path / "logs" / "jax-repeated.log", encoding="utf-8", newline="") as f:  # keep a "\r" in its line
        log = f.read()  # stderr lines timed from the process start
    step_at = float(re.search(r"^\[ *([0-9.]+)\] .*first step after [0-9.]+ s", log, re.M)[1])
    assert repeated["first_step_s"] - 0.05 <= step_at < repeated["process_s"], (step_at, repeated)  # .1f rounding
    assert re.search(r"^\[ *[0-9.]+\] .*Persistent compilation cache hit", log, re.M)


def test_bad_frameworks_is_one_line(tmp_path):
    proc = run_script("--frameworks", "torch,tf", "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "time_to_first_step.py: error: --frameworks: tf: choose from torch, jax, jax-scan"
    assert not any(tmp_path.iterdir())

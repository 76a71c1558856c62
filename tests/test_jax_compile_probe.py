"""scripts/jax_compile_probe.py on a CPU (--quick): each variant is a child process compiling and running the
bench's JAX step, and the shared block trace (the default) computes the step that tracing every block
inline computes: the same first loss to the bit."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_shared_and_inline_block_traces_run_the_same_step():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "jax_compile_probe.py"), "--quick",
                          "--variants", "default", "inline-blocks", "--layers", "2", "--steps", "1", "--warmup", "0"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["default", "inline-blocks"], out.stdout
    assert all(r[1] == "2" and len(r) == 6 for r in rows), out.stdout  # no "failed" row
    assert rows[0][5] == rows[1][5], out.stdout  # first loss (5 decimals) equal

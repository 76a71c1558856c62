"""Issue 9: train_jax.py killed with SIGKILL at random moments (some during a checkpoint save),
resumed each time, ends bit for bit where an uninterrupted run ends (tests/kill_resume.py).

A save in progress is Orbax's temporary directory, or a finished step directory not yet sealed
with COMMITTED. All runs share a persistent XLA compilation cache, so a restart costs the process
start, not a compile.
"""
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from kill_resume import kill_and_resume_drill

MAX_STEPS = 24

pytestmark = pytest.mark.slow


def _saving(out: Path) -> bool:
    root = out / "checkpoints"
    if not root.is_dir():
        return False
    return any("orbax-checkpoint-tmp" in p.name or (p.name.startswith("step_") and not (p / ckpt.MANIFEST).exists())
               for p in root.iterdir())


def _arrays(out: Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as c:
        tree = c.restore(out / "checkpoints" / ckpt.step_dirname(MAX_STEPS) / "arrays")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    # 10 trials (issue 9); a trial whose run finishes before its kill lands counts as a trial, not a kill.
    kill_and_resume_drill(
        tmp_path, "train_jax.py", max_steps=MAX_STEPS, trials=10, min_kills=8, saving=_saving,
        final_weights=_arrays, timeout=600,
        env={"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})

"""Issue 9: train_torch.py killed with SIGKILL at random moments (some during a checkpoint save),
resumed each time, ends bit for bit where an uninterrupted run ends (tests/kill_resume.py); once more
under torchrun, 2 ranks with the experts split 2 ways (every rank killed at once).
A save in progress is a `.tmp-` directory under checkpoints/ (blues/checkpointing.py)."""
import sys
from pathlib import Path

import pytest

from blues import checkpointing as ckpt
from kill_resume import kill_and_resume_drill

MAX_STEPS = 30


def _saving(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())


def _weights(out: Path, max_steps: int = MAX_STEPS) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "checkpoints" / ckpt.step_dirname(max_steps) / "model.safetensors"))


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    kill_and_resume_drill(tmp_path, "train_torch.py", max_steps=MAX_STEPS, trials=11, min_kills=10,
                          saving=_saving, final_weights=_weights, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigkill_under_expert_parallel_then_resume_gives_identical_weights(tmp_path):
    """torchrun 2 ranks --expert_parallel 2: the gathered weights and every metrics record as uninterrupted."""
    steps = 12
    torchrun = (str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2")
    kill_and_resume_drill(tmp_path, "train_torch.py", max_steps=steps, trials=4, min_kills=3, saving=_saving,
                          final_weights=lambda out: _weights(out, steps), env={"OMP_NUM_THREADS": "1"},
                          launcher=torchrun, extra=("--expert_parallel", "2"), timeout=600)

"""Issue 9: train_torch.py killed with SIGKILL at random moments (some during a checkpoint save),
resumed each time, ends bit for bit where an uninterrupted run ends (tests/kill_resume.py).
A save in progress is a `.tmp-` directory under checkpoints/ (blues/checkpointing.py)."""
from pathlib import Path

from blues import checkpointing as ckpt
from kill_resume import kill_and_resume_drill

MAX_STEPS = 30


def _saving(out: Path) -> bool:
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir())


def _weights(out: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "checkpoints" / ckpt.step_dirname(MAX_STEPS) / "model.safetensors"))


def test_sigkill_at_random_moments_then_resume_gives_identical_weights(tmp_path):
    kill_and_resume_drill(tmp_path, "train_torch.py", max_steps=MAX_STEPS, trials=11, min_kills=10,
                          saving=_saving, final_weights=_weights, env={"OMP_NUM_THREADS": "1"})

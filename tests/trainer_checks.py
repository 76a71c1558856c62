"""End-to-end checks that read the same for both trainers, run through each test module's own `train`.

`train(env, out_dir, *flags)` runs the trainer to completion (exit 0) and returns the finished
process; these functions add the flags under test and assert on what the run left behind.
"""
from pathlib import Path

import numpy as np

from blues import checkpointing as ckpt
from blues.metrics import eval_records, read_metrics, train_records


def max_minutes_ends_the_run_like_max_steps(train, env, tmp_path: Path) -> None:
    """A time budget that is over after the first step: the run still evaluates, checkpoints, plots
    and prints its summary at that step, and exits 0 (not as an interrupted run)."""
    out = tmp_path / "timed"
    proc = train(env, out, "--max_steps", "100000", "--max_minutes", "0.0001", "--eval_every", "100000",
                 "--save_every", "100000")
    assert "--max_minutes 0.0001 reached after step 1" in proc.stderr
    assert "to resume" not in proc.stdout and "done: trained 1 steps" in proc.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in train_records(records)] == [1]
    assert [r["step"] for r in eval_records(records)] == [1]
    assert [c.step for c in ckpt.list_checkpoints(out / "checkpoints")] == [1]
    assert (out / "loss.png").is_file() and (out / "experts.png").is_file()


def save_best_exports_the_best_evaluation(train, env, tmp_path: Path) -> None:
    """--save_best: DIR/best holds exactly the weights of the checkpoint at the best evaluation."""
    from parity.checkpoint_read import read_source

    out = tmp_path / "best"
    proc = train(env, out, "--max_steps", "4", "--eval_every", "1", "--save_every", "1", "--keep_checkpoints", "4",
                 "--save_best")
    best = min(eval_records(read_metrics(out / "metrics.jsonl")), key=lambda r: r["val_loss"])
    exported = read_source(out / "best", with_optimizer=False)
    assert exported.kind == "export"
    assert f"at step {best['step']} in {out / 'best'}" in proc.stdout
    at_step = read_source(out / "checkpoints" / ckpt.step_dirname(best["step"]), with_optimizer=False)
    assert exported.arrays.keys() == at_step.arrays.keys()
    assert all(np.array_equal(exported.arrays[k], at_step.arrays[k]) for k in at_step.arrays)

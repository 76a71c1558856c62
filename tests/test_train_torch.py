"""train_torch.py end to end on CPU: metrics, plots, checkpoints, exact resume, bad input, SIGTERM, NaN.

Every run trains a small model (d 32, 2 layers, T 16; the vocabulary stays o200k's 200,019) on a
small generated corpus. Runs that must be real processes (the resumed half of the exact-resume
test, SIGTERM, the exit status) are subprocesses; the others call
`train_torch.main` in this process to save torch's import time. Every run uses one CPU thread
(OMP_NUM_THREADS=1 / torch.set_num_threads(1)): the bitwise comparisons need the same kernels in
every run, and on a loaded 2-core machine two-thread barriers cost more than they gain here.
"""
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from blues import checkpointing as ckpt
from blues.hashing import sha256_file
from blues.metrics import read_metrics, train_records
from trainer_checks import (bad_flag_exit_status_from_the_real_process, bad_input_one_line_exit_status_nothing_written,
                            base_args, common_bad_cases, damaged_latest_checkpoint_falls_back_to_previous,
                            exact_resume_is_bitwise, graceful_sigterm_checkpoints_and_exits_0,
                            max_minutes_ends_the_run_like_max_steps, metrics_plots_tensorboard_summary,
                            nonfinite_steps_are_skipped_then_stop_the_run, resume_refusals, run_inproc, same_arrays,
                            save_best_exports_the_best_evaluation, step_dir, straight_run, train_process,
                            trainer_env)

SCRIPT = "train_torch.py"
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A small corpus and a shared token cache for every run of this module, on one CPU thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with trainer_env(tmp_path_factory.mktemp("train_torch"), CONFIG, OMP_NUM_THREADS="1") as env:
        yield env
    torch.set_num_threads(threads)


def train(env, out_dir, *extra, status=0, timeout=120):
    """train_torch.py as a subprocess."""
    return train_process(SCRIPT, env, out_dir, *extra, status=status, timeout=timeout)


def train_inproc(env, out_dir, *extra, status=0):
    """`train` in this process, without a subprocess's torch import: the same CompletedProcess."""
    argv = base_args(env, out_dir, *extra)
    rc, stdout, stderr = run_inproc(SCRIPT, argv)
    assert rc == status, stderr[-3000:]
    return subprocess.CompletedProcess(argv, rc, stdout, stderr)


def weights(step_dir):
    from safetensors.numpy import load_file

    return load_file(str(Path(step_dir) / "model.safetensors"))


@pytest.fixture(scope="module")
def straight(env):
    """The reference: 6 steps in one go, evaluating and saving at 3 and 6."""
    return straight_run(train_inproc, env)


def test_metrics_plots_tensorboard_summary(straight):
    train_recs, _ = metrics_plots_tensorboard_summary(straight)
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]  # lr 1e-2 on a tiny corpus: it learns at once


def test_checkpoint_contents_and_reload(straight):
    import torch

    from blues.config import BluesConfig
    from blues_torch import BluesModel

    path = step_dir(straight["out"], 6)
    manifest = ckpt.verify(path)
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"}
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data"]["step"] == 6 and state["bad_steps"] == {"skipped": 0, "consecutive": 0}
    cfg = BluesConfig.from_dict(state["model_config"])
    model = BluesModel(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights(path).items()}, strict=True)
    assert torch.all(model.embed[cfg.vocab_size:] == 0)  # padding rows stay exactly zero under AdamW
    opt = torch.load(path / "optimizer.pt", weights_only=True)
    assert len(opt["state"]) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in opt["param_groups"]] == [0.1, 0.0]  # matrices decayed, norm scales not
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert {"torch_cpu", "router"} <= set(rng)
    assert not same_arrays(weights(step_dir(straight["out"], 3)), weights(path))


def test_exact_resume_is_bitwise(env, straight, tmp_path):
    # stopped in this process, resumed by a real process: a fresh start
    exact_resume_is_bitwise(SCRIPT, env, straight, tmp_path, stop=train_inproc, resume=train, read_arrays=weights)


def test_damaged_latest_checkpoint_falls_back_to_previous(env, straight, tmp_path):
    damaged_latest_checkpoint_falls_back_to_previous(train_inproc, env, straight, tmp_path,
                                                     file_to_damage=lambda path: path / "model.safetensors",
                                                     read_arrays=weights)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_in_checkpoint_is_refused_not_run(env, straight, tmp_path):
    out = tmp_path / "evil"
    shutil.copytree(straight["out"], out)
    marker = tmp_path / "pwned"
    path = step_dir(out, 6)
    (path / "optimizer.pt").write_bytes(pickle.dumps({"state": _Payload(marker)}))
    # The attacker also rewrites the manifest, so the checksums pass and only weights_only stands guard.
    manifest = json.loads((path / "COMMITTED").read_text())
    manifest["files"]["optimizer.pt"] = sha256_file(path / "optimizer.pt")
    (path / "COMMITTED").write_text(json.dumps(manifest))
    stderr = train_inproc(env, out, "--max_steps", "8", "--resume", "auto", status=1).stderr
    assert "cannot be loaded safely (refused, nothing executed)" in stderr and "Traceback" not in stderr
    assert not marker.exists()


def test_graceful_sigterm_checkpoints_and_exits_0(env, tmp_path):
    graceful_sigterm_checkpoints_and_exits_0(SCRIPT, "torch", env, tmp_path, timeout=90)


def test_nonfinite_steps_are_skipped_then_stop_the_run(env, tmp_path):
    # model.safetensors holds the weights only (Adam's state is in optimizer.pt)
    nonfinite_steps_are_skipped_then_stop_the_run(train_inproc, env, tmp_path, read_arrays=weights)


def test_grad_accumulation_averages_micro_batches(env, tmp_path):
    # Router noise off, so both runs route every token the same way. The lm and z losses are means
    # over tokens, so one batch of 2 and two micro-batches of 1 (the same two windows: the data
    # order does not depend on the batch size) give the same value up to float32 summation order;
    # the load-balancing loss is not a per-token mean and legitimately differs.
    quiet = json.dumps({**json.loads(CONFIG), "router_noise_std": 0.0})
    first = {}
    for name, batch, accum in (("whole", "2", "1"), ("accum", "1", "2")):
        out = tmp_path / name
        train_inproc(env, out, "--config", quiet, "--batch_size", batch, "--grad_accum", accum, "--max_steps", "1")
        first[name] = train_records(read_metrics(out / "metrics.jsonl"))[0]
    for key in ("lm_loss", "z_loss"):
        assert first["accum"][key] == pytest.approx(first["whole"][key], rel=1e-6)
    # Only the aux-loss gradient (weight 0.01) differs: measured 1.4e-5 relative; a missing 1/G would be 2x.
    assert first["accum"]["grad_norm"] == pytest.approx(first["whole"]["grad_norm"], rel=1e-3)


def test_init_from_an_export_starts_from_its_weights(env, tmp_path):
    import torch

    from blues.train_args import load_model_config
    from blues_torch import BluesModel
    from blues.canonical import to_module_arrays
    from blues_torch.state_dict_adapter import to_canonical
    from blues.safetensors_io import save_export

    cfg = load_model_config("tiny", CONFIG)
    torch.manual_seed(123)  # not the run's seed: the run must not re-initialise
    arrays = to_canonical(BluesModel(cfg))
    save_export(tmp_path / "export", arrays, cfg)
    out = tmp_path / "init"
    # Step 1's update is skipped (NaN injected), so the saved weights are exactly the starting ones.
    train_inproc(env, out, "--init_from", str(tmp_path / "export"), "--max_steps", "1", "--inject_nan", "1")
    saved = weights(step_dir(out, 1))
    expected = to_module_arrays(arrays, cfg)
    assert saved.keys() == expected.keys() and all(np.array_equal(saved[k], expected[k]) for k in saved)


def test_compile_matches_eager_losses(env, straight, tmp_path):
    """--compile runs the same training: the reference run's six steps again under torch.compile,
    router noise and dropout on (inductor's fallback_random draws eager's numbers). Tolerance: fused
    kernels reorder float32 sums; measured ~1e-7 relative, 1e-5 allowed."""
    out = tmp_path / "compiled"
    proc = train(env, out, "--max_steps", "6", "--eval_every", "3", "--save_every", "3", "--compile")
    # it did compile (the blocks share one compiled function; on CPU the per-expert loop runs eagerly
    # between a block's graphs; with the GPU's grouped GEMM a block is one graph)
    graphs = re.search(r"torch.compile: (\d+) graph\(s\) compiled for the training step, (\d+) of them by the end "
                       r"of its first step", proc.stderr)
    assert graphs and int(graphs.group(1)) >= 1, proc.stderr[-2000:]
    # and never again: not after the evaluation at step 3, not for new expert counts
    assert graphs.group(1) == graphs.group(2), graphs.group(0)
    eager = train_records(read_metrics(straight["out"] / "metrics.jsonl"))
    compiled = train_records(read_metrics(out / "metrics.jsonl"))
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == list(range(1, 7))
    for a, b in zip(compiled, eager):
        for key in ("loss", "lm_loss", "aux_loss", "z_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_save_best_exports_the_best_evaluation(env, tmp_path):
    save_best_exports_the_best_evaluation(train, env, tmp_path)


def test_max_minutes_ends_the_run_like_max_steps(env, tmp_path):
    max_minutes_ends_the_run_like_max_steps(train, env, tmp_path)

# ---- bad input: one line, the right exit status, nothing left behind ---------------------------------

def torch_bad_cases(tmp):
    """(argv, exit status, text) of train_torch.py's own, on top of trainer_checks.common_bad_cases."""
    return [
        (["--lr", "-1e-3"], 2, "--lr"),
        (["--warmup_steps", "-1"], 2, "--warmup_steps"),
        (["--weight_decay", "-0.1"], 2, "--weight_decay"),
        (["--grad_clip", "-1"], 2, "--grad_clip"),
        (["--eval_every", "0"], 2, "--eval_every"),
        (["--max_bad_steps", "0"], 2, "--max_bad_steps"),
        (["--attn_impl", "magic"], 2, "--attn_impl"),
        (["--bogus_flag"], 2, "--bogus_flag"),
        (["--config", str(tmp / "missing.json")], 2, "--config"),
        (["--deepspeed", str(tmp / "missing_ds.json")], 2, "--deepspeed"),
        (["--cuda_graph"], 2, "--cuda_graph needs a CUDA GPU"),  # the suite runs on a CPU
    ]


def test_bad_input_one_line_exit_status_nothing_written(env, tmp_path):
    cases = common_bad_cases(tmp_path) + torch_bad_cases(tmp_path)
    bad_input_one_line_exit_status_nothing_written(SCRIPT, env, tmp_path, cases)


def test_resume_refusals(env, straight, tmp_path):
    resume_refusals(SCRIPT, "torch", env, straight, tmp_path, extra_cases=[
        (base_args(env, straight["out"], "--max_steps", "6", "--resume", "auto"), 2, "already at step 6"),
        (base_args(env, straight["out"], "--max_steps", "8", "--resume", "auto", "--seed", "3"), 1, "seed"),
    ])


def test_bad_flag_exit_status_from_the_real_process(env, tmp_path):
    bad_flag_exit_status_from_the_real_process(SCRIPT, env, tmp_path)


# ---- several ranks -----------------------------------------------------------------------------

def _broadcast_rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as tdist

    from blues_torch.distributed import Dist

    # torchrun's environment: Dist joins the gloo group from it
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist = Dist(deepspeed_enabled=False)
    try:
        tensors = [torch.full((3,), 10.0 + rank), torch.full((2, 2), 20.0 + rank)]  # different on each rank
        dist.broadcast_tensors(tensors)
        torch.save([t.tolist() for t in tensors], f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_broadcast_tensors_gives_every_rank_rank_0s_values(tmp_path):
    """The trainer draws its weights on each rank's device and then takes rank 0's (train.py): a
    missing or wrong-source broadcast leaves rank 1's own values."""
    import torch
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_broadcast_rank, args=(port, str(tmp_path / "out")), nprocs=2)
    got = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    assert got[0] == got[1] == [[10.0] * 3, [[20.0, 20.0], [20.0, 20.0]]]

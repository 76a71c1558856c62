"""train_torch.py under DeepSpeed on CPU: the real `deepspeed` launcher, 2 ranks, gloo, ZeRO-2.

The CPU accelerator (DS_ACCELERATOR=cpu) reports one device per NUMA node; `--num_gpus 2` asks
the launcher for two local ranks anyway. The first launch on a machine JIT-compiles DeepSpeed's
small shared-memory comm op (about a minute, cached under ~/.cache/torch_extensions).

DeepSpeed's torch_autocast mode (a float32 module whose forward runs under bf16 autocast) trains,
resumes bit for bit in its own mode and into DeepSpeed's bf16 mode (a bf16 module). One engine per
mode is also built in this process to see which autocast its forwards run under.

Also checks, without launching, how flags and ds_config.json merge (one source of truth).
"""
import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from blues import checkpointing as ckpt
from blues.errors import ConfigError
from blues.metrics import read_metrics, train_records
from blues.schedule import learning_rate
from blues.train_args import parse_args

REPO = Path(__file__).resolve().parent.parent
CONFIG = json.dumps({"hidden_size": 32, "head_dim": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "num_layers": 2, "max_position_embeddings": 16, "tot_num_experts": 4,
                     "embedding_multiplier_scale": 2})
DS_JSON = json.loads((REPO / "ds_config.json").read_text())
# ds_config.json with numbers where the project's file says "auto"
NUMERIC = {**DS_JSON, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
           "optimizer": {"type": "AdamW", "params": {**DS_JSON["optimizer"]["params"], "lr": 2e-3, "weight_decay": 0.2}}}
# ds_config.json in DeepSpeed's torch_autocast mode
AUTOCAST = {**DS_JSON, "bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
AUTOCAST_LINE = "DeepSpeed ZeRO-2, torch_autocast (bf16 autocast over float32 weights)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_corpus(root: Path) -> None:
    rng = np.random.default_rng(0)
    words = "the of and to a in that is was he for it with as his on be at by this had not are but".split()
    with open(root / "corpus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Text"])
        for _ in range(200):
            w.writerow([" ".join(rng.choice(words, size=40))])


def _launch(tmp_path, out, *extra, ds="ds_config.json", precision=("--precision", "fp32")):
    """train_torch.py on 2 CPU ranks with the DeepSpeed config DS; PRECISION: its flags (none: the file's)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", BLUES_CACHE=str(tmp_path / "cache"), BLUES_WRITE_PARAM_HASH="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    launcher = Path(sys.executable).parent / "deepspeed"
    port = _free_port()
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(port), "train_torch.py",
           "--deepspeed", str(ds), *precision, "--data", str(tmp_path / "corpus.csv"),
           "--config", CONFIG, "--batch_size", "2", "--eval_batches", "2", "--eval_every", "100",
           "--save_every", "2", "--warmup_steps", "2", "--out_dir", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # DeepSpeed's CPU all-reduce segments (66 MB of /dev/shm a rank) are released by the trainer
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, left
    return proc


def _hash(out, rank, tag):
    return (Path(out) / f"param_sha256_rank{rank}_{tag}.txt").read_text().strip()


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_records(read_metrics(Path(out) / "metrics.jsonl"))}


def test_two_cpu_ranks_train_identically_and_resume(tmp_path):
    _write_corpus(tmp_path)
    out = tmp_path / "run"

    proc = _launch(tmp_path, out, "--max_steps", "4")
    final = _hash(out, 0, "final")
    assert _hash(out, 1, "final") == final  # ZeRO-2 kept both ranks' weights identical
    path = out / "checkpoints" / ckpt.step_dirname(4)
    files = set(ckpt.verify(path)["files"])
    assert {"ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank00000.pt", "rng_rank00001.pt",
            "trainer_state.json"} <= files
    # One source of truth: --batch_size given -> written into the DeepSpeed config; lr "auto" in the
    # JSON -> the trainer's default, and the schedule runs from it; the starting lines say so.
    used = json.loads((out / "config.json").read_text())
    assert used["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 2
    assert used["deepspeed_config"]["train_batch_size"] == 4
    assert used["train_args"]["lr"] == used["deepspeed_config"]["optimizer"]["params"]["lr"] == 3e-3
    first = train_records(read_metrics(out / "metrics.jsonl"))[0]
    assert first["lr"] == learning_rate(0, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=4)
    assert ("batch: 2 sequences per micro-batch per rank (flag) x 2 ranks x 1 micro-batches accumulated (default) "
            "= a global batch of 4 sequences") in proc.stderr
    assert "lr 0.003 (default)" in proc.stderr and "precision fp32 (flag)" in proc.stderr

    _launch(tmp_path, out, "--max_steps", "6", "--resume", "auto")
    assert _hash(out, 0, "loaded") == _hash(out, 1, "loaded") == final  # the checkpoint reloads exactly
    assert _hash(out, 0, "final") == _hash(out, 1, "final") != final
    assert [r["step"] for r in train_records(read_metrics(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


# ---- DeepSpeed's torch_autocast mode --------------------------------------------------------------

@pytest.fixture(scope="module")
def autocast_run(tmp_path_factory):
    """6 steps in torch_autocast mode from a ds_config.json enabling it (no --precision: the file
    decides), checkpoints at steps 2, 4 and 6 -> (root, run directory, the launch)."""
    root = tmp_path_factory.mktemp("autocast")
    _write_corpus(root)
    (root / "ds.json").write_text(json.dumps(AUTOCAST))
    out = root / "run"
    return root, out, _launch(root, out, "--max_steps", "6", ds=root / "ds.json", precision=())


def test_torch_autocast_run_trains_a_float32_module(autocast_run):
    _, out, proc = autocast_run
    assert AUTOCAST_LINE in proc.stderr and "precision bf16 (ds.json)" in proc.stderr
    used = json.loads((out / "config.json").read_text())["deepspeed_config"]
    assert used["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and used["bf16"]["enabled"] is False
    path = out / "checkpoints" / ckpt.step_dirname(6)
    assert ckpt.read_trainer_state(path, framework="torch")["module_dtype"] == "float32"
    files = set(ckpt.verify(path)["files"])  # float32 ZeRO's partitions (bf16 mode's are bf16_zero_pp_rank_*)
    assert {"ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1] - 0.1, losses
    assert _hash(out, 0, "final") == _hash(out, 1, "final")


@pytest.mark.slow
def test_torch_autocast_resumes_exactly_and_into_bf16_mode(autocast_run, monkeypatch):
    """From step 4: in torch_autocast mode it repeats the uninterrupted run bit for bit; in DeepSpeed's
    bf16 mode (ds_config.json, a bf16 module: DeepSpeed's own files do not fit, so the layout-free ones
    load) its module holds the checkpoint's float32 master weights rounded to bf16, and trains on."""
    import torch

    from blues_torch import BluesModel
    from blues_torch.checkpoint import write_param_hash

    root, out, _ = autocast_run
    step4, ref = out / "checkpoints" / ckpt.step_dirname(4), _losses(out)
    again = root / "again"
    _launch(root, again, "--max_steps", "6", "--resume", str(step4), ds=root / "ds.json", precision=())
    assert _hash(again, 0, "final") == _hash(again, 1, "final") == _hash(out, 0, "final")
    assert _losses(again) == {5: ref[5], 6: ref[6]}

    bf16 = root / "bf16"
    proc = _launch(root, bf16, "--max_steps", "6", "--resume", str(step4), precision=())
    assert "bf16 module (float32 master weights in ZeRO)" in proc.stderr
    args = parse_args(["--config", CONFIG, "--out_dir", str(root / "o")], "torch")
    model = BluesModel(args.model_config)
    model.load_state_dict(load_file(str(step4 / "model.safetensors")))
    monkeypatch.setenv("BLUES_WRITE_PARAM_HASH", "1")  # the trainer's hash of a module's parameters
    write_param_hash(model.to(torch.bfloat16), root, 0, "rounded")
    assert _hash(bf16, 0, "loaded") == _hash(bf16, 1, "loaded") == _hash(root, 0, "rounded")
    # the same weights and tokens: step 5's loss differs from torch_autocast's by the weights' rounding
    # to bf16 only (2^-9 relative each; measured 1.1e-3 on a loss of 12.46, a tenth of this bound)
    assert sorted(_losses(bf16)) == [5, 6] and abs(_losses(bf16)[5] - ref[5]) < 1e-3 * ref[5]


def test_engine_forward_runs_under_its_modes_autocast(tmp_path, deepspeed_one_rank):
    """The trainer's engine (make_engine over resolve_deepspeed_config's config), one rank in this
    process, per mode: the dtype of its module, and whether the training step's forward (TrainStep,
    through the engine) and the evaluation's (the module called directly, under the trainer's
    autocast_for) run under autocast, seen by a hook on the first attention, with the dtype its
    GEMMs give. The torch_autocast engine comes last: DeepSpeed keeps a process-wide flag once one
    is built."""
    import torch

    from blues_torch import BluesModel
    from blues_torch.distributed import Dist
    from blues_torch.training import TrainStep, autocast_for, evaluate, make_engine, precision_mode

    bf16, f32 = torch.bfloat16, torch.float32
    cases = [("bf16_module", DS_JSON, (), bf16, [(False, bf16)] * 2),
             ("fp32", AUTOCAST, ("--precision", "fp32"), f32, [(False, f32)] * 2),
             ("torch_autocast", AUTOCAST, (), f32, [(True, bf16)] * 2)]
    dist = Dist(False)
    device = dist.device
    for mode, ds, flags, module_dtype, forwards in cases:
        cfg, args, _ = _resolve(tmp_path, ds, "--config", CONFIG, "--batch_size", "2", "--eval_batches", "1",
                                *flags, world_size=1)
        torch.manual_seed(0)
        with torch.device(device):
            model = BluesModel(args.model_config)
        engine, optimizer = make_engine(model, cfg, args.weight_decay)
        assert precision_mode(args.precision, engine) == mode
        assert {p.dtype for p in model.parameters()} == {module_dtype}
        seen = []
        model.layers[0].attn.register_forward_hook(
            lambda m, inputs, out: seen.append((torch.is_autocast_enabled(device.type), out.dtype)))
        tokens = np.random.default_rng(0).integers(0, args.model_config.vocab_size, 4 * (args.seq_len + 1))
        x, y = (torch.from_numpy(tokens[:2 * args.seq_len].reshape(2, -1)).long().to(device),
                torch.from_numpy(tokens[1:2 * args.seq_len + 1].reshape(2, -1)).long().to(device))  # [B, T] each
        step = TrainStep(model, optimizer, dist=dist, grad_clip=args.grad_clip, precision=args.precision,
                         gen=torch.Generator(device=device).manual_seed(1), engine=engine)
        values, applied = step([(x, y)], lr=1e-3).read()
        evaluate(model, tokens, args, dist, lambda: autocast_for(args.precision, dist.device, engine))
        assert applied and math.isfinite(values[0]), (mode, values)
        assert seen == forwards, mode


def test_the_trainers_engine_does_not_synchronise_in_its_steps(tmp_path, deepspeed_one_rank, monkeypatch):
    """DeepSpeed's throughput timer synchronises the device as each forward starts and each step ends,
    from the third step on (deepspeed/utils/timer.py): a host wait that keeps the trainer from queueing
    a step ahead. resolve_deepspeed_config turns it off for a file that does not set it, and a file
    that turns it on keeps it (the case that shows the count would see it)."""
    import torch
    from deepspeed.accelerator import get_accelerator

    from blues_torch import BluesModel
    from blues_torch.distributed import Dist
    from blues_torch.training import TrainStep, make_engine

    without_timers = {k: v for k, v in NUMERIC.items() if k != "timers"}
    timer_on = {**NUMERIC, "timers": {"throughput": {"enabled": True}}}
    dist = Dist(False)
    device = dist.device
    for ds, expect_synchronize in ((without_timers, False), (timer_on, True)):
        cfg, args, _ = _resolve(tmp_path, ds, "--config", CONFIG, "--batch_size", "2", world_size=1)
        torch.manual_seed(0)
        with torch.device(device):
            model = BluesModel(args.model_config)
        engine, optimizer = make_engine(model, cfg, args.weight_decay)
        step = TrainStep(model, optimizer, dist=dist, grad_clip=args.grad_clip, precision=args.precision,
                         gen=torch.Generator(device=device).manual_seed(1), engine=engine)
        tokens = np.random.default_rng(0).integers(0, args.model_config.vocab_size, 2 * args.seq_len + 1)
        x, y = (torch.from_numpy(tokens[:-1].reshape(2, -1)).long().to(device),
                torch.from_numpy(tokens[1:].reshape(2, -1)).long().to(device))  # [B, T] each
        calls = []
        with monkeypatch.context() as m:
            m.setattr(get_accelerator(), "synchronize", lambda device_index=None: calls.append(device_index))
            for _ in range(4):
                step([(x, y)], lr=1e-3).read()
        assert bool(calls) is expect_synchronize, (ds.get("timers"), len(calls))


def test_bench_config_keeps_the_files_bf16_mode(tmp_path, monkeypatch):
    """bench/deepspeed_step.py forces bf16 in the mode the config chooses: the project's file's bf16
    module; torch_autocast from a ds_config.json, or a variant (scripts/ds_variants.py), enabling it."""
    from bench import deepspeed_step
    from bench.train_step import train_workload

    wl = train_workload("tiny", quick=True)
    cfg, _ = deepspeed_step.ds_config_for(wl, "torch")
    assert cfg["bf16"]["enabled"] is True and "torch_autocast" not in cfg
    cfg, note = deepspeed_step.ds_config_for(wl, "torch", {"bf16": {"enabled": False},
                                                          "torch_autocast": {"enabled": True, "dtype": "bf16"}})
    assert cfg["bf16"]["enabled"] is False and cfg["torch_autocast"]["enabled"] is True and "torch_autocast" in note
    (tmp_path / "ds_config.json").write_text(json.dumps({k: v for k, v in AUTOCAST.items() if k != "bf16"}))
    monkeypatch.setattr(deepspeed_step, "REPO", tmp_path)
    cfg, _ = deepspeed_step.ds_config_for(wl, "torch")
    assert cfg["bf16"]["enabled"] is False and cfg["torch_autocast"] == AUTOCAST["torch_autocast"]


# ---- flags and ds_config.json (no launch) ----------------------------------------------------------

def _resolve(tmp_path, ds: dict, *argv, world_size=2):
    sys.path.insert(0, str(REPO))
    try:
        import train_torch
    finally:
        sys.path.pop(0)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    args = parse_args(["--deepspeed", str(path), "--out_dir", str(tmp_path / "o"), *argv], "torch")
    return train_torch.resolve_deepspeed_config(args, world_size)


def test_flags_override_json_and_json_fills_the_rest(tmp_path):
    cfg, args, sources = _resolve(tmp_path, NUMERIC, "--lr", "5e-4", "--grad_accum", "3", "--precision", "fp32")
    assert cfg["optimizer"]["params"]["lr"] == args.lr == 5e-4
    assert cfg["gradient_accumulation_steps"] == args.grad_accum == 3
    assert cfg["train_micro_batch_size_per_gpu"] == args.batch_size == NUMERIC["train_micro_batch_size_per_gpu"]
    assert cfg["train_batch_size"] == args.batch_size * 3 * 2
    assert cfg["gradient_clipping"] == args.grad_clip == NUMERIC["gradient_clipping"]
    assert cfg["bf16"]["enabled"] is False and args.precision == "fp32"
    assert sources == {"batch_size": "ds.json", "weight_decay": "ds.json", "grad_clip": "ds.json"}
    cfg, args, sources = _resolve(tmp_path, NUMERIC)
    assert args.precision == "bf16" and cfg["bf16"]["check_grad_overflow"] is True and sources["precision"] == "ds.json"
    assert cfg["bf16"]["enabled"] is True and "torch_autocast" not in cfg  # the project's file: DeepSpeed's bf16 mode
    assert args.weight_decay == NUMERIC["optimizer"]["params"]["weight_decay"]


@pytest.mark.parametrize("bf16", [{"enabled": False}, {"enabled": "auto"}, None])
def test_torch_autocast_in_the_file_means_bf16_in_that_mode(tmp_path, bf16):
    """A file enabling torch_autocast decides bf16 (bf16.enabled false, "auto" or absent beside it);
    --precision bf16 keeps that mode, --precision fp32 turns torch_autocast off."""
    ds = {k: v for k, v in AUTOCAST.items() if k != "bf16"} | ({"bf16": bf16} if bf16 else {})
    cfg, args, sources = _resolve(tmp_path, ds)
    assert args.precision == "bf16" and sources["precision"] == "ds.json"
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and cfg["bf16"]["enabled"] is False
    cfg, args, sources = _resolve(tmp_path, ds, "--precision", "bf16")
    assert args.precision == "bf16" and "precision" not in sources
    assert cfg["torch_autocast"]["enabled"] is True and cfg["bf16"]["enabled"] is False
    cfg, args, sources = _resolve(tmp_path, ds, "--precision", "fp32")
    assert args.precision == "fp32" and "precision" not in sources
    assert cfg["torch_autocast"]["enabled"] is False and cfg["bf16"]["enabled"] is False


def test_auto_fields_take_the_trainers_values(tmp_path):
    """The project's ds_config.json says "auto" for what the plain trainer also sets: the same defaults."""
    cfg, args, sources = _resolve(tmp_path, DS_JSON, "--precision", "fp32")
    plain = parse_args(["--out_dir", str(tmp_path / "o")], "torch")
    for flag in ("batch_size", "grad_accum", "lr", "weight_decay", "grad_clip"):
        assert getattr(args, flag) == getattr(plain, flag), flag
    assert cfg["train_micro_batch_size_per_gpu"] == plain.batch_size and cfg["optimizer"]["params"]["lr"] == plain.lr
    assert cfg["gradient_clipping"] == plain.grad_clip and sources == {}
    assert "auto" not in json.dumps(cfg)  # DeepSpeed never sees "auto"


@pytest.mark.parametrize("change, field", [
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"optimizer": {"type": "SGD", "params": {}}}, "optimizer.type"),
    ({"scheduler": {"type": "WarmupLR"}}, "scheduler"),
    ({"train_micro_batch_size_per_gpu": "8"}, "train_micro_batch_size_per_gpu"),
    ({"gradient_clipping": "max"}, "gradient_clipping"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": -1.0}}}, "--lr"),
    ({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, "bf16.enabled"),  # beside bf16.enabled true
    ({"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "float16"}}, "torch_autocast.dtype"),
    ({"bf16": {"enabled": False}, "torch_autocast": {"enabled": True}}, "torch_autocast.dtype"),
    ({"bf16": {"enabled": False}, "torch_autocast": {"enabled": "yes", "dtype": "bfloat16"}}, "torch_autocast.enabled"),
])
def test_bad_deepspeed_config_is_refused_naming_the_field(tmp_path, change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as e:
        _resolve(tmp_path, {**DS_JSON, **change})
    assert "\n" not in str(e.value)

"""The command line shared by `train_torch.py` and `train_jax.py` (issue 6): same flags, same meaning.

`parse_args(argv, framework)` turns argv into a `TrainArgs` and refuses every invalid value before
any work starts, naming the flag (`UsageError`, exit 2) or the config field (`ConfigError`, exit 1).
It creates nothing on disk: the trainers create `out_dir` only after everything has been checked.

Framework extras: torch has `--deepspeed CONFIG` and `--local_rank` (set by the deepspeed
launcher); jax has `--mesh data=2,expert=4` and, for multi-process runs, `--coordinator HOST:PORT
--num_processes N --process_id I` (all three or none; see train_jax.py's docstring).

`--init_from PATH` (both): start from the canonical weights of an export (`model.safetensors` +
`config.json`, blues/safetensors_io.py) instead of a random initialisation; the tensors must fit
the run's model config. The cross-framework training-parity test starts both trainers this way.

Hidden flags (for tests, not in --help; both trainers honour them the same way):
- `--inject_nan STEP[,STEP...]` makes the loss of those 1-based optimizer steps NaN before the
  backward pass, so the update is skipped as a non-finite step;
- `--stop_after N` behaves as if SIGTERM arrived during step N: finish it, checkpoint, exit 0 (a
  deterministic interruption for the exact-resume tests; the schedule still spans --max_steps).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from blues.config import PRESETS, BluesConfig
from blues.data_sources import expand_inputs
from blues.errors import ConfigError, DataError, UsageError

FRAMEWORKS = ("torch", "jax")
ATTN_IMPLS = {"torch": ("auto", "reference", "sdpa", "flash_attn"),
              "jax": ("auto", "reference", "xla", "cudnn")}
MESH_AXES = ("data", "expert")
PRECISIONS = ("fp32", "bf16")

# The defaults make `python train_jax.py` / `python train_torch.py` with no arguments train the
# tiny preset on the embedded corpus in well under 10 minutes on a 2-core CPU with the loss visibly
# falling. Measured (train_torch.py, 2 dedicated Xeon cores): the 200k-vocabulary LM head dominates,
# so a step costs about 2.2 s (torch) to 3.2 s (JAX) per 512 tokens; batch 2 x 256 tokens beat
# batch 1 and batch 4 per wall-clock second; 80 steps take ~4.5 min (JAX) plus start-up,
# evaluations and checkpoints, leaving room for `make demo`'s install inside 10 minutes, and the
# training loss falls from 12.7 to ~7.5. Larger runs (GPU, bigger presets) pass their own values.
DEFAULTS: dict[str, Any] = dict(
    data=None,  # None = the embedded corpus (blues.data.DEFAULT_CORPUS)
    text_column=None,  # None = 'Text' (CSV, TSV, Parquet) / 'text' (JSONL)
    workers=None,  # tokenizing processes; None = the CPU count (blues.data.prepare_data)
    val_fraction=0.05,  # chance that a document goes to the validation split
    preset="tiny",
    config=None,
    out_dir=None,  # None = runs/<timestamp>
    max_steps=80,
    batch_size=2,
    grad_accum=1,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=8,
    weight_decay=0.1,
    grad_clip=1.0,
    eval_every=40,
    eval_batches=8,
    save_every=40,
    keep_checkpoints=3,
    seed=0,
    resume=None,
    precision="fp32",
    attn_impl="auto",
    max_bad_steps=5,
    max_minutes=None,  # None = no time budget
    save_best=False,  # export the best evaluation's weights to DIR/best
    debug=False,
    inject_nan=(),
    stop_after=None,
    init_from=None,  # canonical export to start from instead of a random init
    # torch only
    deepspeed=None,
    local_rank=-1,
    compile=False,  # torch.compile the training forward
    cuda_graph=False,  # replay the whole step from one CUDA graph
    expert_parallel=1,  # P: ranks sharing out each layer's experts
    # jax only
    mesh=None,
    scan_layers=False,  # one compiled block scanned over the layers
    coordinator=None,  # multi-process: HOST:PORT of process 0 (jax.distributed.initialize)
    num_processes=None,
    process_id=None,
)
_PATH_FLAGS = ("out_dir", "resume", "init_from", "deepspeed", "config")  # plus --data's list
_FRAMEWORK_ONLY = {"deepspeed": "torch", "local_rank": "torch", "compile": "torch", "cuda_graph": "torch",
                   "expert_parallel": "torch", "mesh": "jax",
                   "scan_layers": "jax", "coordinator": "jax", "num_processes": "jax", "process_id": "jax"}


@dataclass(frozen=True)
class TrainArgs:
    """Every training flag, validated; `model_config` is the preset with `--config` applied."""

    framework: str
    model_config: BluesConfig
    data: tuple[str, ...] | None
    preset: str
    config: str | None
    out_dir: str
    max_steps: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_every: int
    eval_batches: int
    save_every: int
    keep_checkpoints: int
    seed: int
    resume: str | None
    precision: str
    attn_impl: str
    max_bad_steps: int
    max_minutes: float | None
    save_best: bool
    debug: bool
    inject_nan: tuple[int, ...] = ()
    stop_after: int | None = None
    deepspeed: str | None = None
    local_rank: int = -1
    compile: bool = False
    cuda_graph: bool = False
    expert_parallel: int = 1
    mesh: dict[str, int] | None = None
    scan_layers: bool = False
    init_from: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    text_column: str | None = None
    workers: int | None = None
    val_fraction: float = 0.05
    # Flags the user gave explicitly (DeepSpeed: these override ds_config.json, the rest come from it).
    explicit: frozenset[str] = field(default_factory=frozenset)

    @property
    def seq_len(self) -> int:
        return self.model_config.max_position_embeddings

    def to_dict(self) -> dict:
        """JSON-serialisable view (stored in checkpoints and printed at start-up)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("model_config", "explicit")}
        # absolute: a resume from another directory names the same files by other relative paths
        d["data"] = [os.path.abspath(p) for p in self.data] if self.data is not None else None
        d["inject_nan"] = list(self.inject_nan)
        d["model_config"] = self.model_config.to_dict()
        return d

    def replace(self, **changes) -> "TrainArgs":
        return dataclasses.replace(self, **changes)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser(framework: str) -> argparse.ArgumentParser:
    """The argparse parser for one trainer. Defaults are SUPPRESSed so `explicit` can be computed."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    script = f"train_{framework}.py"
    p = _Parser(prog=script, argument_default=argparse.SUPPRESS, allow_abbrev=False,
                description=f"Train a Blues MoE language model ({'PyTorch' if framework == 'torch' else 'JAX'}).")
    D = DEFAULTS
    group = p  # add() puts each flag into the group opened last

    def add(name, help, **kw):
        key = name.lstrip("-")
        if D.get(key) is not None and "action" not in kw:
            help = f"{help} (default: {_show(D[key])})"
        group.add_argument(name, help=help, **kw)

    group = p.add_argument_group("data and model")
    add("--data", "data files, directories or globs (.csv .tsv .jsonl .parquet .txt, optionally .gz/.zst); "
        "default: the embedded corpus", nargs="+", metavar="PATH")
    add("--text_column", "column (CSV, TSV, Parquet) or field (JSONL) holding the text (default: Text; text "
        "for JSONL)", metavar="NAME")
    add("--workers", "processes tokenizing the data on a first run (default: the CPU count)", type=int, metavar="N")
    add("--val_fraction", "chance that a document goes to the validation split, chosen by a hash of its text",
        type=float, metavar="F")
    add("--preset", f"model preset: {', '.join(PRESETS)}", metavar="NAME")
    add("--config", "JSON file (or inline JSON object) of config fields overriding the preset", metavar="JSON")
    add("--attn_impl", f"attention backend: {', '.join(ATTN_IMPLS[framework])}", metavar="IMPL")
    add("--init_from", "start from these canonical weights (an export directory or its model.safetensors) "
        "instead of a random init", metavar="PATH")
    group = p.add_argument_group("optimisation")
    add("--max_steps", "optimizer steps to train for (the cosine schedule's length)", type=int, metavar="N")
    add("--max_minutes", "also stop after this many minutes of training (then evaluate, save and plot as at "
        "--max_steps; the schedule still spans --max_steps)", type=float, metavar="M")
    add("--batch_size", "sequences per micro-batch per data-parallel rank", type=int, metavar="B")
    add("--grad_accum", "micro-batches accumulated per optimizer step", type=int, metavar="G")
    add("--lr", "peak learning rate", type=float)
    add("--min_lr", "final learning rate of the cosine decay", type=float)
    add("--warmup_steps", "linear warmup steps", type=int, metavar="N")
    add("--weight_decay", "AdamW weight decay (matrices only, not norm scales)", type=float)
    add("--grad_clip", "clip the global gradient norm to this (0 = no clipping)", type=float)
    add("--precision", "fp32 or bf16 (bf16 autocast, fp32 master weights)", metavar="P")
    add("--seed", "seed for weights, data order and router noise", type=int)
    group = p.add_argument_group("evaluation, checkpoints, output")
    add("--eval_every", "evaluate on the validation split every N steps (and at the end)", type=int, metavar="N")
    add("--eval_batches", "validation batches per evaluation", type=int, metavar="N")
    add("--save_every", "checkpoint every N steps (and at the end)", type=int, metavar="N")
    add("--keep_checkpoints", "keep the newest K checkpoints", type=int, metavar="K")
    add("--save_best", "also keep the weights of the best evaluation so far as an export in DIR/best "
        "(model.safetensors + config.json; generate.py and --init_from read it)", action="store_true")
    add("--out_dir", "run directory (metrics, checkpoints, plots); default: runs/<timestamp>", metavar="DIR")
    add("--resume", "'auto' (latest checkpoint in --out_dir, or start fresh) or a checkpoint PATH",
        metavar="auto|PATH")
    add("--max_bad_steps", "stop after this many consecutive non-finite steps", type=int, metavar="N")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    p.add_argument("--inject_nan", help=argparse.SUPPRESS, metavar="STEPS")  # tests only (docstring)
    p.add_argument("--stop_after", help=argparse.SUPPRESS, type=int, metavar="N")  # tests only (docstring)
    if framework == "torch":
        add("--compile", "run the training forward and backward under torch.compile, block by block (GPU: "
            "~1.4x the tokens/s of eager at the bench size, docs/performance.md; the first step compiles, a "
            "repeated run loads the compiled graphs from BLUES_CACHE/inductor)",
            action="store_true")
        add("--cuda_graph", "replay the whole training step from one CUDA graph after 3 ordinary steps: "
            "fewer host launches where the step is host-bound (small models; --precision bf16, one process, "
            "no DeepSpeed; its activations stay allocated between steps)", action="store_true")
        add("--expert_parallel", "P: split every layer's experts over groups of P ranks (tokens move by "
            "all-to-all; P divides the rank count and tot_num_experts; under torchrun or deepspeed)",
            type=int, metavar="P")
        group = p.add_argument_group("DeepSpeed (launch with: deepspeed --num_gpus=N train_torch.py --deepspeed ds_config.json)")
        add("--deepspeed", "DeepSpeed JSON config; enables DeepSpeed (ZeRO, bf16, its checkpoints)", metavar="CONFIG")
        add("--local_rank", "set by the deepspeed launcher", type=int)
    else:
        group = p.add_argument_group("devices")
        add("--mesh", "device mesh, e.g. data=2,expert=4 (default: all devices on 'data')", metavar="SPEC")
        group = p.add_argument_group("compilation")
        add("--scan_layers", "run the blocks as one lax.scan, so XLA compiles one block instead of num_layers: "
            "a shorter first step, slower steps (docs/performance.md, 'Time to first step')", action="store_true")
        group = p.add_argument_group("multi-process (all three, or none: then SLURM/Open MPI/... are detected)")
        add("--coordinator", "HOST:PORT of process 0, reachable from every process", metavar="HOST:PORT")
        add("--num_processes", "total number of processes", type=int, metavar="N")
        add("--process_id", "this process's index, 0 .. N-1", type=int, metavar="I")
    return p


def _show(value) -> str:
    if value is None:
        return "none"
    return str(value)


def parse_args(argv: Sequence[str] | None, framework: str) -> TrainArgs:
    """Parse and validate; raises UsageError / ConfigError naming the flag or field. Writes nothing."""
    parser = build_parser(framework)
    ns = vars(parser.parse_args(list(argv) if argv is not None else None))
    explicit = frozenset(ns)  # defaults are SUPPRESSed, so only flags given on the command line
    values = {k: v for k, v in DEFAULTS.items() if _FRAMEWORK_ONLY.get(k, framework) == framework}
    values.update(ns)
    for key in _PATH_FLAGS:  # `~` works even where no shell expanded it (quoted, or --flag=~/x)
        if isinstance(values.get(key), str):
            values[key] = os.path.expanduser(values[key])
    if values["data"] is not None:
        values["data"] = [os.path.expanduser(p) for p in values["data"]]

    check_numbers(values)
    if values["preset"] not in PRESETS:
        raise UsageError(f"--preset: unknown preset '{values['preset']}'; known presets: {', '.join(PRESETS)}")
    if values["precision"] not in PRECISIONS:
        raise UsageError(f"--precision: must be one of {', '.join(PRECISIONS)}, got '{values['precision']}'")
    if values["attn_impl"] not in ATTN_IMPLS[framework]:
        raise UsageError(f"--attn_impl: must be one of {', '.join(ATTN_IMPLS[framework])}, "
                         f"got '{values['attn_impl']}'")
    model_config = load_model_config(values["preset"], values["config"])

    if values["data"] is not None:
        try:
            expand_inputs(values["data"])
        except DataError as e:
            raise UsageError(f"--data: {e}") from None
        values["data"] = tuple(values["data"])
    if values["workers"] is not None and values["workers"] <= 0:
        raise UsageError(f"--workers: must be a positive integer, got {values['workers']}")
    if not 0 < values["val_fraction"] < 1:
        raise UsageError(f"--val_fraction: must be in (0, 1) (the trainers evaluate on the validation split), "
                         f"got {values['val_fraction']}")
    values["inject_nan"] = _parse_steps(values["inject_nan"]) if values["inject_nan"] else ()
    if values["stop_after"] is not None and values["stop_after"] <= 0:
        raise UsageError(f"--stop_after: must be a positive step number, got {values['stop_after']}")

    out_dir = values["out_dir"] or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out_dir: {out_dir} exists and is not a directory")
    values["out_dir"] = out_dir
    resume = values["resume"]
    if resume is not None and resume != "auto" and not os.path.exists(resume):
        raise UsageError(f"--resume: {resume} does not exist (pass 'auto' or a checkpoint directory)")
    if resume is None and os.path.isdir(os.path.join(out_dir, "checkpoints")) and any(
            n.startswith("step_") for n in os.listdir(os.path.join(out_dir, "checkpoints"))):
        raise UsageError(f"--out_dir: {out_dir} already holds checkpoints; pass --resume auto to continue "
                         f"that run, or choose another --out_dir")

    if framework == "torch" and values.get("deepspeed") is not None:
        _check_readable_file(values["deepspeed"], "--deepspeed")
        load_json_file(values["deepspeed"], "--deepspeed")
    if framework == "jax" and values.get("mesh") is not None:
        values["mesh"] = parse_mesh(values["mesh"])
    if values["init_from"] is not None and not os.path.exists(values["init_from"]):
        raise UsageError(f"--init_from: {values['init_from']} does not exist (pass an export directory or "
                         f"its model.safetensors)")
    if framework == "jax":
        _check_distributed(values)
    return TrainArgs(framework=framework, model_config=model_config, explicit=explicit, **values)


def check_numbers(v: dict) -> None:
    """Refuse out-of-range numeric flags (UsageError naming the flag); `v` maps flag names to values."""
    def bad(flag, what):
        raise UsageError(f"--{flag}: must be {what}, got {v[flag]}")

    for flag in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every",
                 "keep_checkpoints", "max_bad_steps"):
        if v[flag] <= 0:
            bad(flag, "a positive integer")
    for flag in ("warmup_steps", "seed"):
        if v[flag] < 0:
            bad(flag, "a non-negative integer")
    if not (math.isfinite(v["lr"]) and v["lr"] > 0):
        bad("lr", "a positive number")
    for flag in ("min_lr", "weight_decay", "grad_clip"):
        if not (math.isfinite(v[flag]) and v[flag] >= 0):
            bad(flag, "a non-negative number")
    if v["max_minutes"] is not None and not (math.isfinite(v["max_minutes"]) and v["max_minutes"] > 0):
        bad("max_minutes", "a positive number of minutes")
    if v["min_lr"] > v["lr"]:
        raise UsageError(f"--min_lr ({v['min_lr']}) must not exceed --lr ({v['lr']})")


def _check_readable_file(path: str, flag: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{flag}: {path} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag}: {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag}: {path} is not readable (check its permissions)")


def load_json_file(path: str, flag: str) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag}: cannot read {path} ({e.__class__.__name__}: {e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_model_config(preset: str, config: str | None) -> BluesConfig:
    """The preset, with the fields of `config` (a JSON file path or an inline JSON object) on top."""
    base = BluesConfig.preset(preset)
    if config is None:
        return base
    if config.lstrip().startswith("{"):
        text, where = config, "--config (inline JSON)"
    else:
        _check_readable_file(config, "--config")
        try:
            text = Path(config).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--config: cannot read {config} ({e.__class__.__name__})") from None
        where = f"--config {config}"
    try:
        return BluesConfig.from_json(text, base=base)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_distributed(v: dict) -> None:
    """--coordinator/--num_processes/--process_id: all three or none, in range."""
    given = [f for f in ("coordinator", "num_processes", "process_id") if v.get(f) is not None]
    if given and len(given) < 3:
        missing = [f"--{f}" for f in ("coordinator", "num_processes", "process_id") if f not in given]
        raise UsageError(f"--{given[0]}: a multi-process launch needs --coordinator, --num_processes and "
                         f"--process_id together; missing {', '.join(missing)}")
    if not given:
        return
    host, colon, port = v["coordinator"].rpartition(":")
    if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--coordinator: must be HOST:PORT (e.g. 10.0.0.1:1234), got '{v['coordinator']}'")
    if v["num_processes"] <= 0:
        raise UsageError(f"--num_processes: must be a positive integer, got {v['num_processes']}")
    if not 0 <= v["process_id"] < v["num_processes"]:
        raise UsageError(f"--process_id: must be in 0 .. {v['num_processes'] - 1}, got {v['process_id']}")


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,expert=4' -> {'data': 2, 'expert': 4}; axis names and sizes checked, not devices."""
    mesh: dict[str, int] = {}
    for part in spec.split(","):
        name, eq, size = part.strip().partition("=")
        if not eq:
            raise UsageError(f"--mesh: '{part}' is not AXIS=SIZE (e.g. --mesh data=2,expert=4)")
        if name not in MESH_AXES:
            raise UsageError(f"--mesh: unknown mesh axis '{name}'; known axes: {', '.join(MESH_AXES)}")
        if name in mesh:
            raise UsageError(f"--mesh: axis '{name}' given twice")
        try:
            n = int(size)
        except ValueError:
            n = 0
        if n <= 0:
            raise UsageError(f"--mesh: size of axis '{name}' must be a positive integer, got '{size}'")
        mesh[name] = n
    return mesh


def _parse_steps(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise UsageError(f"--inject_nan: expected comma-separated step numbers, got '{text}'") from None
    if any(s <= 0 for s in steps):
        raise UsageError("--inject_nan: step numbers are 1-based")
    return steps

"""Time to first step: how long each trainer takes from process start to its first training step and
to its first evaluation, with empty compile caches ("cold") and again with the caches that run filled
("repeated"), and the tokens/s it then trains at. One markdown table.

    python scripts/time_to_first_step.py                          # bench preset, torch --compile and JAX (a GPU)
    python scripts/time_to_first_step.py --frameworks jax --steps 10
    python scripts/time_to_first_step.py --quick                  # CPU smoke test: a toy model, tiny preset

Each run is the real trainer in a fresh process, as bench/trainer.py starts it (`train_torch.py
--compile` / `train_jax.py`, bf16, the bench's batch and sequence for the preset, the embedded corpus,
`--warmup` + `--steps` steps, one evaluation batch and a checkpoint at the last step), twice per
framework with the same cache directories, created empty before the cold run under OUT/caches/:
BLUES_CACHE (so inductor's BLUES_CACHE/inductor and JAX's BLUES_CACHE/xla, the trainers' defaults),
TRITON_CACHE_DIR and CUDA_CACHE_PATH; TORCHINDUCTOR_CACHE_DIR and JAX_COMPILATION_CACHE_DIR are
unset. The token cache is filled before the cold run, so neither run tokenizes.

Columns: "first step" and "first evaluation" are the seconds from process start the trainer prints
("first step after 12.3 s (compile included)"), interpreter start-up and imports included;
"evaluation" is the first evaluation alone (its compile included, if it still has one); "tokens/s" is
the median of metrics.jsonl's steps after the warm-up (the repeated run's is the steady figure: in
JAX's cold run those steps share the GPU with the evaluation's background compile); "process" is the
whole run, checkpoint included. JAX runs log their compiles (JAX_LOG_COMPILES=1): the notes add up XLA compile time,
tracing and lowering, and count persistent-cache hits. Each run's output is kept in OUT/logs/, every
line of its stderr prefixed with the seconds since the process started ("[  12.34] "), so the log
shows where the time before the first step went; its run directory is removed (a bench checkpoint
is ~17 GB).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.trainer import REPO, SCRIPTS, measured_tokens_per_s, quick_corpus, trainer_command  # noqa: E402
from bench.train_step import train_workload  # noqa: E402
from blues.cli import run_main  # noqa: E402
from blues.config import PRESETS  # noqa: E402
from blues.errors import UsageError  # noqa: E402
from blues.train_args import parse_args as parse_train_args  # noqa: E402

FRAMEWORKS = {"torch": "PyTorch `--compile`", "jax": "JAX", "jax-scan": "JAX `--scan_layers`"}
RUNS = ("cold", "repeated")
# Set by this script for both runs; a user's own value of these would point a run at other caches.
UNSET = ("TORCHINDUCTOR_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH")

FIRST_STEP = re.compile(r"first step after ([0-9.]+) s")
FIRST_EVAL = re.compile(r"first evaluation after ([0-9.]+) s \(([0-9.]+) s for the evaluation itself")
TORCH_GRAPHS = re.compile(r"torch\.compile: (\d+) graph\(s\) compiled for the training step.*?; "
                          r"(\d+) of (\d+) inductor graph\(s\) loaded from")
XLA_COMPILE = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.eE+-]+) sec")
JAX_TRACE = re.compile(r"Finished (?:tracing \S+ for jit|jaxpr to MLIR module conversion \S+) in ([0-9.eE+-]+) sec")
JAX_CACHE_HIT = re.compile(r"Persistent compilation cache hit for")


@dataclass
class Result:
    framework: str
    run: str
    first_step_s: float | None = None
    first_eval_s: float | None = None
    eval_s: float | None = None
    tokens_per_s: float | None = None
    process_s: float | None = None
    notes: str = ""
    error: str | None = None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="scripts/time_to_first_step.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench", choices=sorted(PRESETS), help="model preset (default: bench)")
    p.add_argument("--frameworks", default="torch,jax",
                   help="comma-separated: torch, jax, jax-scan (train_jax.py --scan_layers); default: torch,jax")
    p.add_argument("--steps", type=int, default=10, help="steps timed for tokens/s after the warm-up (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="steps before the timed ones (default: 3)")
    p.add_argument("--out", default="runs/time_to_first_step", help="caches, logs and the table (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per run (default: 900)")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: a toy model of the tiny preset")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


def parse(argv) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown or not frameworks:
        raise UsageError(f"--frameworks: {','.join(unknown) or 'none given'}: choose from {', '.join(FRAMEWORKS)}")
    if args.steps < 1 or args.warmup < 1:
        raise UsageError(f"--steps and --warmup: at least 1 each, got {args.steps} and {args.warmup}")
    args.frameworks = frameworks
    if args.quick:
        args.preset = "tiny"
    return args


def cache_env(root: Path) -> dict[str, str]:
    """The runs' environment: every compile cache under ROOT, unbuffered output, JAX's compile log."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(BLUES_CACHE=str(root / "blues"), TRITON_CACHE_DIR=str(root / "triton"),
               CUDA_CACHE_PATH=str(root / "cuda"), PYTHONUNBUFFERED="1", JAX_LOG_COMPILES="1")
    return env


def prepare_tokens(cmd: list[str], framework: str, cache: Path) -> None:
    """Fill the token cache the trainer's command will read (the same key: data, split, text column)."""
    from blues.data import prepare_data

    targs = parse_train_args(cmd[2:], framework)
    prepare_data(targs.data, seq_len=targs.seq_len, val_fraction=targs.val_fraction, text_column=targs.text_column,
                 workers=targs.workers, cache_dir=cache, show_progress=False)


def notes_for(framework: str, stderr: str) -> str:
    if framework == "torch":
        m = TORCH_GRAPHS.search(stderr)
        return f"{m[1]} graph(s); {m[2]} of {m[3]} inductor graph(s) from the cache" if m else ""
    compiles = [float(s) for _, s in XLA_COMPILE.findall(stderr)]
    trace = sum(float(s) for s in JAX_TRACE.findall(stderr))
    return (f"XLA {sum(compiles):.1f} s over {len(compiles)} program(s), {len(JAX_CACHE_HIT.findall(stderr))} from "
            f"the cache; tracing and lowering {trace:.1f} s")


def run_timed(cmd: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, str]:
    """CMD to completion: (the process with its stdout and stderr, stderr with each line prefixed by
    the seconds since the start). Raises subprocess.TimeoutExpired after TIMEOUT seconds."""
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout: list[bytes] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    killed = threading.Event()
    timer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
    timer.start()
    stderr, timed = [], []
    for raw in proc.stderr:  # lines end at "\n" only: a progress bar's "\r" updates stay on their line
        line = raw.decode("utf-8", errors="replace")
        stderr.append(line)
        timed.append(f"[{time.perf_counter() - began:8.2f}] {line}")
    proc.wait()
    timer.cancel()
    reader.join()
    if killed.is_set():
        raise subprocess.TimeoutExpired(cmd, timeout)
    text = b"".join(stdout).decode("utf-8", errors="replace")
    return subprocess.CompletedProcess(cmd, proc.returncode, text, "".join(stderr)), "".join(timed)


def run_once(framework: str, run: str, cmd: list[str], env: dict, out: Path, run_dir: Path, warmup: int,
             timeout: float) -> Result:
    result = Result(framework, run)
    shutil.rmtree(run_dir, ignore_errors=True)
    began = time.perf_counter()
    try:
        proc, timed_stderr = run_timed(cmd, env, timeout)
    except subprocess.TimeoutExpired:
        result.error = f"timed out after {timeout:g} s"
        return result
    result.process_s = time.perf_counter() - began
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{framework}-{run}.log").write_text(timed_stderr + proc.stdout, encoding="utf-8")
    try:
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
            result.error = f"{SCRIPTS[framework]} exited {proc.returncode}: {last}"
            return result
        step, evaluation = FIRST_STEP.search(proc.stderr), FIRST_EVAL.search(proc.stderr)
        if step is None or evaluation is None:
            result.error = f"{SCRIPTS[framework]} printed no 'first step after' / 'first evaluation after' line"
            return result
        result.first_step_s = float(step[1])
        result.first_eval_s, result.eval_s = float(evaluation[1]), float(evaluation[2])
        result.tokens_per_s = measured_tokens_per_s(run_dir / "metrics.jsonl", warmup)[0]
        result.notes = notes_for(framework, proc.stderr)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def measure(framework: str, args, out: Path) -> list[Result]:
    """The cold and the repeated run of one framework's trainer, on fresh cache directories."""
    wl = train_workload(args.preset, args.quick)
    caches = out / "caches" / framework
    shutil.rmtree(caches, ignore_errors=True)
    caches.mkdir(parents=True)
    data = quick_corpus(caches) if args.quick else None
    run_dir = (out / "run" / framework).resolve()
    trainer = framework.split("-")[0]
    cmd = trainer_command(trainer, wl, steps=args.warmup + args.steps, out_dir=run_dir,
                          data=data.resolve() if data else None, compile=trainer == "torch")
    cmd += ["--scan_layers"] if framework == "jax-scan" else []
    env = cache_env(caches.resolve())
    prepare_tokens(cmd, trainer, Path(env["BLUES_CACHE"]))
    print(f"{framework}: python {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    results = []
    for run in RUNS:
        results.append(run_once(framework, run, cmd, env, out, run_dir, args.warmup, args.timeout))
        r = results[-1]
        print(f"  {run}: " + (r.error or f"first step {r.first_step_s:.1f} s, first evaluation {r.first_eval_s:.1f} s, "
                                          f"{r.tokens_per_s:,.0f} tokens/s, process {r.process_s:.1f} s"),
              file=sys.stderr, flush=True)
    return results


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def table(results: list[Result], args) -> str:
    what = "tiny toy (--quick, CPU)" if args.quick else f"{args.preset} preset"
    lines = [f"Time to first step, {what}, {args.warmup} + {args.steps} steps, seconds from process start:", "",
             "| framework | run | first step s | first evaluation s | evaluation s | tokens/s | process s | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        name = FRAMEWORKS[r.framework]
        lines.append(f"| {name} | {r.run} | {_num(r.first_step_s, '.1f')} | {_num(r.first_eval_s, '.1f')} | "
                     f"{_num(r.eval_s, '.1f')} | {_num(r.tokens_per_s, ',.0f')} | {_num(r.process_s, '.1f')} | "
                     f"{r.error or r.notes} |")
    return "\n".join(lines)


def main(argv) -> int:
    args = parse(argv)
    out = Path(args.out)
    results = [r for framework in args.frameworks for r in measure(framework, args, out)]
    text = table(results, args)
    (out / "time_to_first_step.md").write_text(text + "\n", encoding="utf-8")
    (out / "time_to_first_step.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n",
                                                 encoding="utf-8")
    print(text)
    failed = [f"{r.framework} {r.run}" for r in results if r.error]
    if failed:
        print(f"time_to_first_step.py: error: {', '.join(failed)} failed (logs in {out / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

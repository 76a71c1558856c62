"""Where a trainer's time before its first step goes: the trainer runs under cProfile from its imports
to the end of its first training step (and, with --evaluations N, N evaluations after it), then the
process prints the profile's largest entries and exits (no checkpoint).

    python scripts/startup_profile.py train_torch.py --preset bench --precision bf16 --batch_size 8 --compile
    python scripts/startup_profile.py train_jax.py --preset tiny --out_dir /tmp/p --top 40
    python scripts/startup_profile.py --evaluations 2 train_torch.py --preset tiny --batch_size 32 --eval_batches 1000
    python scripts/startup_profile.py --save /tmp/startup.prof train_torch.py ...   # the stats, for pstats/snakeviz

Everything after the script's name is the trainer's own command line. The listing is by cumulative
time, main thread only (a JAX background compile shows as the first step's wait for it), filtered to
Blues' own functions and the imports of top-level packages (the phases: data, model, optimizer, the
first step), then the calls with the most time of their own (where the seconds were spent).
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blues.cli import run_main  # noqa: E402
from blues.errors import UsageError  # noqa: E402

TRAINERS = {"train_torch.py": "blues_torch.train", "train_jax.py": "blues_jax.train"}


class Done(BaseException):
    """Raised after the first step (and evaluations): not an Exception, so no handler of the trainer's takes it."""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this script's options and the trainer, the trainer's own command line): split at the trainer's name."""
    p = argparse.ArgumentParser(prog="scripts/startup_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=30, help="entries listed (default: 30)")
    p.add_argument("--evaluations", type=int, default=0, help="evaluations after the first step, each timed (default: 0)")
    p.add_argument("--save", help="also write the raw stats to this file")
    p.add_argument("script", help=f"the trainer ({' or '.join(TRAINERS)}); the arguments after it are its own")
    at = next((i for i, a in enumerate(argv) if Path(a).name in TRAINERS), None)
    if at is None:
        p.error(f"name the trainer to profile: {' or '.join(TRAINERS)}")
    return p.parse_args(argv[:at + 1]), argv[at + 1:]


def is_phase(func: tuple[str, int, str]) -> bool:
    """Blues' own code, or the import of a top-level package (site-packages/<name>/__init__.py)."""
    filename, _, name = func
    if filename.startswith(str(REPO)) and "site-packages" not in filename:
        return name != "<module>" or filename.endswith("__init__.py")
    parts = Path(filename).parts
    return name == "<module>" and len(parts) >= 3 and parts[-3] == "site-packages" and parts[-1] == "__init__.py"


def where(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    shown = os.path.relpath(filename, REPO) if filename.startswith(str(REPO)) else filename
    if "site-packages/" in shown:
        shown = shown.split("site-packages/", 1)[1]
    return f"{name} ({shown}:{line})"


def report(profile: cProfile.Profile, seconds: float, top: int) -> str:
    stats = pstats.Stats(profile).stats  # {func: (calls, primitive calls, own s, cumulative s, callers)}
    phases = sorted((f for f in stats if is_phase(f)), key=lambda f: -stats[f][3])[:top]
    busiest = sorted(stats, key=lambda f: -stats[f][2])[:top]
    lines = [f"first step done {seconds:.1f} s after the profile started (main thread; the listing covers "
             f"every call profiled)", "",
             "Blues' calls and package imports, by cumulative seconds:"]
    lines += [f"{stats[f][3]:8.2f} s  {where(f)}" for f in phases if stats[f][3] >= 0.05]
    lines += ["", "calls by their own seconds, each with its largest callers:"]
    for f in busiest:
        if stats[f][2] < 0.05:
            break
        lines.append(f"{stats[f][2]:8.2f} s  {where(f)}  x{stats[f][0]}")
        callers = sorted(stats[f][4].items(), key=lambda kv: -kv[1][2])[:3]  # {caller: (.., .., own s, ..)}
        lines += [f"            {c[2]:6.2f} s from {where(caller)}" for caller, c in callers if c[2] >= 0.05]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, trainer_argv = parse(argv)
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    from blues import loop  # imported under the profile: the trainer's imports are part of its start


    done = {}

    def first_step_only(trainer, train_args, step, **_):
        trainer.launch(0.0, False)()  # the first step, waited for
        done["first step"] = time.perf_counter() - started
        for i in range(args.evaluations):
            began = time.perf_counter()
            trainer.evaluate(step + 1)
            done[f"evaluation {i + 1}"] = time.perf_counter() - began
        raise Done  # unwinds the trainer (its frames' times are recorded as they return), then stops

    loop.train = first_step_only
    trainer = importlib.import_module(TRAINERS[Path(args.script).name])
    try:
        trainer.main(trainer_argv)
    except Done:
        pass
    profile.disable()
    if "first step" not in done:
        raise UsageError("the trainer ended before its first step")
    if args.save:
        profile.dump_stats(args.save)
    timed = [f"{name}: {seconds:.2f} s" for name, seconds in done.items() if name != "first step"]
    sys.stderr.flush()
    sys.stdout.write("\n".join(timed + [report(profile, done["first step"], args.top)]) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no checkpoint, plots or exit handlers (JAX's background compiles): the profile is the result


if __name__ == "__main__":
    sys.exit(run_main(main))

"""The table of scripts/gpu_multi.sh: weak scaling and loss agreement of runs on 1 and N devices.

    python scripts/multi_gpu_report.py RUNS_DIR [--json OUT.json] [--skip 5]

RUNS_DIR holds one directory per run (each with `metrics.jsonl` and a `run.json` that
gpu_multi.sh writes: {"name", "group", "devices", "baseline"}). For each run the table shows
tokens/s per device (the median over the steps after the first `--skip`, which hold compilation
and warm-up), the weak-scaling efficiency against its group's 1-device baseline (per-device batch
fixed, so the ideal is 1.0), and the largest relative difference of its per-step losses from the
baseline's over the steps both logged (the same global batch gives the same losses up to
reduction order; under bf16 this is the tolerance the parity suite documents).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from blues.metrics import read_metrics, train_records


def load_run(directory: Path, skip: int) -> dict | None:
    meta_path = directory / "run.json"
    metrics_path = directory / "metrics.jsonl"
    if not meta_path.is_file() or not metrics_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    train = train_records(read_metrics(metrics_path))
    timed = [r["tokens_per_s"] for r in train[skip:]] or [r["tokens_per_s"] for r in train]
    meta["steps"] = len(train)
    meta["tokens_per_s"] = statistics.median(timed) if timed else float("nan")
    meta["per_device"] = meta["tokens_per_s"] / max(1, meta["devices"])
    meta["losses"] = {r["step"]: r["loss"] for r in train}
    return meta


def max_rel_loss_diff(a: dict[int, float], b: dict[int, float]) -> float | None:
    steps = sorted(set(a) & set(b))
    if not steps:
        return None
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps)


def build_rows(runs: list[dict]) -> list[dict]:
    by_name = {r["name"]: r for r in runs}
    rows = []
    for r in runs:
        base = by_name.get(r.get("baseline") or "")
        row = {"name": r["name"], "devices": r["devices"], "steps": r["steps"],
               "tokens_per_s": r["tokens_per_s"], "per_device": r["per_device"],
               "efficiency": None, "loss_rel_diff": None, "baseline": r.get("baseline")}
        if base is not None and base is not r:
            row["efficiency"] = r["per_device"] / base["per_device"] if base["per_device"] else None
            row["loss_rel_diff"] = max_rel_loss_diff(r["losses"], base["losses"])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| run | devices | steps | tokens/s | per device | efficiency | max loss rel. diff vs 1 device |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        eff = "-" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        diff = "-" if r["loss_rel_diff"] is None else f"{r['loss_rel_diff']:.1e}"
        lines.append(f"| {r['name']} | {r['devices']} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['per_device']:,.0f} | {eff} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/multi_gpu_report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs_dir")
    p.add_argument("--json", default="")
    p.add_argument("--skip", type=int, default=5, help="steps left out of the tokens/s median (compilation, warm-up)")
    args = p.parse_args(argv)
    root = Path(args.runs_dir).expanduser()
    runs = [r for d in sorted(root.iterdir()) if d.is_dir() and (r := load_run(d, args.skip)) is not None] \
        if root.is_dir() else []
    if not runs:
        print(f"error: no runs with run.json and metrics.jsonl under {args.runs_dir}", file=sys.stderr)
        return 2
    rows = build_rows(runs)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

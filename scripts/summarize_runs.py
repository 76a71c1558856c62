"""One table from training run directories: steps, time, throughput, best and final validation perplexity.

    python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...] [--bigram 599] [--json FILE]

Reads each run's `metrics.jsonl` and `run.log` (the trainer's stderr, when the caller kept it: the
wall-clock time comes from its summary line). Best = the lowest validation perplexity of any
evaluation in the run; final = the last evaluation's. With --bigram, a column says whether the
best is at most half the bigram baseline's perplexity (issue 6's target for `tiny`).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blues.metrics import eval_records, read_metrics, train_records  # noqa: E402


def summarize(run_dir: Path) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    train, evals = train_records(records), eval_records(records)
    row = {"run": run_dir.name, "steps": train[-1]["step"] if train else 0}
    speeds = [r["tokens_per_s"] for r in train[len(train) // 10:] if r.get("tokens_per_s")]
    row["tokens_per_s"] = statistics.median(speeds) if speeds else None
    if evals:
        best = min(evals, key=lambda r: r["val_loss"] if r["val_loss"] is not None else math.inf)
        row.update(best_ppl=best["val_perplexity"], best_step=best["step"],
                   final_ppl=evals[-1]["val_perplexity"], final_step=evals[-1]["step"])
    stdout = run_dir / "stdout.log"
    if stdout.exists():
        m = re.search(r"done: trained (\d+) steps in ([^;]+);", stdout.read_text(errors="replace"))
        row["wall"] = m.group(2) if m else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--bigram", type=float, help="the bigram baseline's validation perplexity")
    p.add_argument("--json", type=Path, help="also write the rows here")
    a = p.parse_args(argv)
    rows = [summarize(d) for d in a.runs if d.is_dir()]
    print("| run | steps | wall | tokens/s (median) | best val ppl (step) | final val ppl |"
          + (" best <= bigram/2 |" if a.bigram else ""))
    print("|---|---:|---|---:|---:|---:|" + ("---|" if a.bigram else ""))
    for r in rows:
        best = f"{r['best_ppl']:,.1f} ({r['best_step']})" if "best_ppl" in r else "-"
        final = f"{r['final_ppl']:,.1f}" if "final_ppl" in r else "-"
        tps = f"{r['tokens_per_s'] / 1e3:,.1f}k" if r["tokens_per_s"] else "-"
        line = f"| {r['run']} | {r['steps']} | {r.get('wall') or '-'} | {tps} | {best} | {final} |"
        if a.bigram:
            line += (" yes |" if r.get("best_ppl", math.inf) <= a.bigram / 2 else " no |")
        print(line)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One table from training run directories: steps, time, throughput, best and final validation perplexity.

    python scripts/summarize_runs.py RUN_DIR [RUN_DIR ...] [--bigram 534] [--json FILE] [--plot PNG]

Reads each run's `metrics.jsonl` and `run.log` (the trainer's stderr, when the caller kept it: the
wall-clock time comes from its summary line). Best = the lowest validation perplexity of any
evaluation in the run; final = the last evaluation's. With --bigram, a column says whether the
best is at most half the bigram baseline's perplexity (issue 6's target for `tiny`). --plot draws
every run's validation perplexity against epochs of training data seen (runs of different batch
sizes and sequence lengths line up), with the baseline's half as a line.
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


def epochs_per_step(run_dir: Path) -> float | None:
    """Training-split epochs one optimizer step consumes, from the run's config.json and log."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        t = cfg["train_args"]
        tokens = t["batch_size"] * t["grad_accum"] * cfg.get("world_size", 1) * t["model_config"]["max_position_embeddings"]
        m = re.search(r"\(([\d,]+) train / [\d,]+ val tokens\)", (run_dir / "run.log").read_text(errors="replace"))
        return tokens / int(m.group(1).replace(",", "")) if m else None
    except (OSError, KeyError, ValueError):
        return None


def plot_curves(run_dirs: list[Path], out_png: Path, bigram: float | None) -> None:
    from blues.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(8, 4.8))
    for d in run_dirs:
        evals = [r for r in eval_records(read_metrics(d / "metrics.jsonl")) if r["val_perplexity"] is not None]
        scale = epochs_per_step(d)
        if not evals or scale is None:
            continue
        ax.plot([r["step"] * scale for r in evals], [r["val_perplexity"] for r in evals], ".-", lw=1.2,
                label=d.name)
    if bigram:
        ax.axhline(bigram / 2, color="k", ls="--", lw=1, label=f"half the bigram's ({bigram / 2:g})")
    ax.set_yscale("log")
    ax.set_xlabel("epochs of the training split")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, out_png)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--bigram", type=float, help="the bigram baseline's validation perplexity")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--plot", type=Path, help="also draw the validation curves into this PNG")
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
    if a.plot:
        plot_curves([d for d in a.runs if d.is_dir()], a.plot, a.bigram)
    return 0


if __name__ == "__main__":
    sys.exit(main())

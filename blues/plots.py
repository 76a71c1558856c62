"""The two end-of-run plots, drawn from metrics.jsonl with matplotlib's Agg backend (no display).

- `plot_losses`: training loss (per step) and validation loss (per evaluation) against step.
- `plot_experts`: per-layer expert utilization of the last evaluation as a heatmap (layers x
  experts, the share of the layer's assignments each expert received), with routing entropy and
  drop rate per layer in the row labels.
"""
from __future__ import annotations

import math
import os

import numpy as np

from blues.metrics import eval_records, read_metrics, train_records


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported when a plot is drawn: the import takes ~0.4 s
    (a sixth of train_jax.py's imports on a 2-core CPU, more where packages have no bytecode), which
    every trainer would otherwise spend before its first step for plots drawn at the end of the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out_png) -> None:
    # Write under a temporary name and rename, so a killed run never leaves half a PNG.
    tmp = f"{out_png}.tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    os.replace(tmp, out_png)


def plot_losses(metrics_path, out_png) -> None:
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in train_records(records) if r["loss"] is not None]
    val = [(r["step"], r["val_loss"]) for r in eval_records(records) if r["val_loss"] is not None]
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, lw=1, alpha=0.8, label="train loss")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", lw=1.5, label="validation loss")
        last_step, last = val[-1]
        title = f"Blues: validation loss {last:.3f} (perplexity {math.exp(min(last, 700)):.1f}) at step {last_step}"
        best_step, best = min(val, key=lambda sv: sv[1])
        if best < last:  # the run has gone past its best evaluation (overfitting): mark where that was
            ax.plot([best_step], [best], "*", ms=14, color="tab:red", label="best validation loss")
            title += f"\nbest {best:.3f} (perplexity {math.exp(min(best, 700)):.1f}) at step {best_step}"
        ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, out_png)


def plot_experts(metrics_path, out_png) -> None:
    evals = [r for r in eval_records(read_metrics(metrics_path)) if r.get("experts")]
    fig, ax = pyplot().subplots(figsize=(7, 3.6))
    if not evals:
        ax.text(0.5, 0.5, "no evaluation with expert statistics yet", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        save_figure(fig, out_png)
        return
    last = evals[-1]
    layers = last["experts"]
    frac = np.array([layer["fractions"] for layer in layers])  # [L, E]
    num_layers, num_experts = frac.shape
    im = ax.imshow(frac, cmap="viridis", vmin=0.0, vmax=max(1.0 / num_experts * 2, float(frac.max())),
                   aspect="auto")
    for i in range(num_layers):
        for e in range(num_experts):
            ax.text(e, i, f"{frac[i, e]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, e] < frac.max() * 0.6 else "black")
    ax.set_xticks(range(num_experts), [f"expert {e}" for e in range(num_experts)], fontsize=8)
    ax.set_yticks(range(num_layers), [f"layer {layer['layer']}  H={layer['entropy']:.2f}"
                                      + (f" drop={layer['drop_rate']:.1%}" if layer["drop_rate"] else "")
                                      for layer in layers], fontsize=8)
    ax.set_title(f"Share of routed tokens per expert (validation, step {last['step']}; "
                 f"balanced = {1 / num_experts:.0%}, H max = {math.log(num_experts):.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of assignments")
    save_figure(fig, out_png)

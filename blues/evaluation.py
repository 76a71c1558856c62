"""Framework-free parts of evaluation: the sliding-window plan for perplexity and the routing report.

Perplexity of a text: its tokens are preceded by `<|endoftext|>` (the document boundary training
uses), giving a sequence s[0..N] with s[0] = eot; every text token s[i], i >= 1, is predicted from
s[0..i-1]. Input position p "predicts" s[p+1]; the N predictor positions are 0..N-1.

Sliding window (texts with N > T, T = max_position_embeddings): a window feeds inputs s[b:e]
(e - b <= T) and scores only the predictions it owns:

    window 0:  b = 0,         e = min(T, N),             scores positions [0, e)
    window j:  e' = min(e + stride, N), b' = e' - T,     scores positions [e, e')

so every prediction is scored exactly once. In window 0 each token sees everything before it. In a
later window a scored token sees at least T - stride + 1 tokens (itself included) and at most T, the
whole context; `stride = 1` gives every token the full context T (N - T + 1 forward passes), larger
strides trade context for speed. The default stride is T // 2.

The expert-utilization report counts the routing of the tokens the model reads at the scored
predictor positions (`<|endoftext|>` and every text token but the last), each once, in the window
that scores it: per layer, each expert's share of the routed assignments (N * k of them), the
entropy of that load distribution (nats; ln E when perfectly balanced, 0 when one expert takes all),
and the mean per-token entropy of the router's softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from blues.errors import UsageError
from blues.utilization import expert_utilization, max_entropy


@dataclass(frozen=True)
class Window:
    begin: int  # first input position
    end: int  # one past the last input position; targets are s[begin + 1 : end + 1]
    score_from: int  # predictor positions [score_from, end) are scored here

    @property
    def length(self) -> int:
        return self.end - self.begin


def default_stride(context: int) -> int:
    return max(1, context // 2)


def plan_windows(num_predictions: int, context: int, stride: int | None = None) -> list[Window]:
    """Windows that score predictor positions 0..num_predictions-1 once each (see module doc)."""
    stride = default_stride(context) if stride is None else stride
    if not 1 <= stride <= context:
        raise UsageError(f"--stride must be between 1 and the context length {context}, got {stride}")
    n = num_predictions
    if n <= 0:
        return []
    end = min(context, n)
    windows = [Window(0, end, 0)]
    while end < n:
        new_end = min(end + stride, n)
        windows.append(Window(new_end - context, new_end, end))
        end = new_end
    return windows


def nll_summary(total_nll: float, tokens: int) -> dict:
    """The evaluation numbers: tokens scored, mean NLL (nats) and perplexity."""
    nll = total_nll / tokens
    return {"tokens": int(tokens), "nll": float(nll), "perplexity": float(math.exp(min(nll, 700.0)))}


class RoutingStats:
    """Per-layer expert loads (blues.utilization) and router entropies over the scored tokens."""

    def __init__(self, num_layers: int, num_experts: int):
        self.counts = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.entropy_sum = np.zeros(num_layers, dtype=np.float64)
        self.tokens = 0

    def add(self, expert_indices: np.ndarray, router_entropy: np.ndarray) -> None:
        """expert_indices [L, n, k] of n tokens, router_entropy [L, n] (nats) of the same tokens."""
        num_layers, n, _ = expert_indices.shape
        for layer in range(num_layers):
            self.counts[layer] += np.bincount(expert_indices[layer].reshape(-1), minlength=self.counts.shape[1])
        self.entropy_sum += router_entropy.astype(np.float64).sum(axis=1)
        self.tokens += n

    def report(self) -> dict:
        """{"tokens", "max_entropy", "layers": [{"layer", "fractions", "entropy", "router_entropy"}]}:
        `fractions` each expert's share of the layer's assignments, `entropy` that distribution's
        entropy, `router_entropy` the mean entropy of the router softmax (nats)."""
        layers = []
        for row in expert_utilization(self.counts):
            layers.append({"layer": row["layer"],
                           "fractions": [round(f, 6) for f in row["fractions"]],
                           "entropy": round(row["entropy"], 6),
                           "router_entropy": round(float(self.entropy_sum[row["layer"]] / max(self.tokens, 1)) + 0.0, 6)})
        return {"tokens": int(self.tokens), "max_entropy": round(max_entropy(self.counts.shape[1]), 6),
                "layers": layers}


def format_utilization(report: dict) -> str:
    """The report as a fixed-width table."""
    layers = report["layers"]
    num_experts = len(layers[0]["fractions"]) if layers else 0
    head = ["layer"] + [f"e{e}" for e in range(num_experts)] + ["load_H", "router_H"]
    rows = [[str(r["layer"])] + [f"{s:.3f}" for s in r["fractions"]]
            + [f"{r['entropy']:.3f}", f"{r['router_entropy']:.3f}"] for r in layers]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = [f"expert utilization over {report['tokens']} tokens: share of routed assignments per expert; "
             f"entropies in nats (balanced = ln {num_experts} = {report['max_entropy']:.3f})",
             "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)

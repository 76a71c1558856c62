"""Expert utilization from the model's routing counts (framework-free, numpy only).

The model reports, per forward pass, `expert_counts` [L, E] (assignments each expert received,
before capacity) and `dropped` [L] (assignments refused by capacity; zero when dropless). Summed
over the evaluation batches they give, per layer:

- `fractions`: share of the layer's N*k assignments that went to each expert (sums to 1);
- `entropy`: entropy of `fractions` in nats (log E = perfectly balanced, 0 = one expert takes all);
- `drop_rate`: fraction of the layer's assignments refused by capacity.
"""
from __future__ import annotations

import math

import numpy as np


class ExpertStats:
    """Accumulates expert counts and drops over batches; `summary()` gives per-layer utilization."""

    def __init__(self):
        self.counts: np.ndarray | None = None  # [L, E] float64
        self.dropped: np.ndarray | None = None  # [L]

    def update(self, expert_counts, dropped=None) -> None:
        counts = np.asarray(expert_counts, dtype=np.float64)  # [L, E]
        if counts.ndim != 2:
            raise ValueError(f"expert_counts must be [L, E], got shape {counts.shape}")
        drops = np.zeros(counts.shape[0]) if dropped is None else np.asarray(dropped, dtype=np.float64)  # [L]
        if self.counts is None:
            self.counts, self.dropped = counts.copy(), drops.copy()
        else:
            self.counts += counts
            self.dropped += drops

    def summary(self) -> list[dict]:
        if self.counts is None:
            return []
        return expert_utilization(self.counts, self.dropped)


def expert_utilization(expert_counts, dropped=None) -> list[dict]:
    """Per-layer {'layer', 'fractions', 'entropy', 'drop_rate'} from counts [L, E] and drops [L]."""
    counts = np.asarray(expert_counts, dtype=np.float64)  # [L, E]
    drops = np.zeros(counts.shape[0]) if dropped is None else np.asarray(dropped, dtype=np.float64)  # [L]
    out = []
    for layer, (row, drop) in enumerate(zip(counts, drops)):
        total = row.sum()
        fractions = row / total if total > 0 else np.zeros_like(row)
        nz = fractions[fractions > 0]
        entropy = float(-(nz * np.log(nz)).sum()) + 0.0 if nz.size else 0.0  # + 0.0: one expert alone is 0, not -0
        out.append({"layer": layer,
                    "fractions": [float(f) for f in fractions],
                    "entropy": entropy,
                    "drop_rate": float(drop / total) if total > 0 else 0.0})
    return out


def max_entropy(num_experts: int) -> float:
    """log E: the entropy of a perfectly balanced layer."""
    return math.log(num_experts)

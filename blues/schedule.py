"""The learning-rate schedule both trainers use: linear warmup, then cosine decay to `min_lr`.

Step convention (both frameworks agree on it): `step` is the 0-based index of the optimizer
update, i.e. the number of updates already applied. The first update uses `learning_rate(0)`
(= lr / warmup_steps, never 0, so no update is wasted), the update logged as 1-based step s in
metrics.jsonl used `learning_rate(s - 1)`. This is optax's convention (a schedule is called with the
update count before the update), so the JAX trainer can use `learning_rate_table(...)` indexed by
optax's count; the torch trainer sets `group["lr"] = learning_rate(step)` before `optimizer.step()`.

Warmup reaches the peak at the update with index `warmup_steps - 1`; the cosine then falls from lr
at index `warmup_steps` towards min_lr, which it would reach at index `max_steps` (one past the last
update). Indices past the end stay at min_lr.
"""
from __future__ import annotations

import math

import numpy as np


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate of update `step` (0-based; see the module docstring)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    decay_steps = max(1, max_steps - warmup_steps)
    progress = (step - warmup_steps) / decay_steps  # in [0, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def learning_rate_table(*, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> np.ndarray:
    """`learning_rate(s)` for s in [0, max_steps] as float32 (index max_steps = min_lr, a safe end)."""
    return np.asarray([learning_rate(s, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, max_steps=max_steps)
                       for s in range(max_steps + 1)], dtype=np.float32)

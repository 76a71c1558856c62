"""The optimizer both trainers (and the benchmark) use: AdamW with these constants, decoupled weight
decay on matrices only (every parameter with ndim >= 2: embedding, attention, router, experts);
RMSNorm scales (ndim 1) are not decayed. torch.optim.AdamW and optax.adamw take the same numbers.
`AdamWState` is the optimizer state in framework-neutral form (parity/optim_convert.py converts it to
and from each framework's; checkpoint exports store it)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from blues.canonical import ConversionError, check_canonical
from blues.config import BluesConfig

BETAS, EPS = (0.9, 0.95), 1e-8


def decays(ndim: int) -> bool:
    """Whether a parameter of this rank gets weight decay."""
    return ndim >= 2


@dataclass
class AdamWState:
    """AdamW moments by canonical tensor name (float32, canonical shapes) and its hyperparameters."""

    step: int  # updates applied so far (torch `step`, optax `count`)
    exp_avg: dict[str, np.ndarray]  # first moment m
    exp_avg_sq: dict[str, np.ndarray]  # second moment v
    lr: float  # learning rate of the last update (informational: the trainers' schedule sets it)
    betas: tuple[float, float]
    eps: float
    weight_decay: float  # on the matrices (ndim >= 2); the norm scales are not decayed

    def check(self, config: BluesConfig) -> None:
        """ConversionError unless the moments fit `config` (names, shapes, finite, v >= 0) and the
        hyperparameters are AdamW's."""
        for what, arrays in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            try:
                check_canonical(arrays, config)
            except ConversionError as e:
                raise ConversionError(f"optimizer {what}: {e}") from None
        negative = [n for n, a in self.exp_avg_sq.items() if np.any(a < 0)]
        if negative:
            raise ConversionError(f"optimizer exp_avg_sq of '{negative[0]}' has negative values")
        if not (isinstance(self.step, int) and self.step >= 0):
            raise ConversionError(f"optimizer step must be an integer >= 0, got {self.step!r}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ConversionError(f"optimizer betas must lie in [0, 1), got {self.betas}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConversionError(f"optimizer eps must be positive, got {self.eps}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConversionError(f"optimizer weight_decay must be >= 0, got {self.weight_decay}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ConversionError(f"optimizer learning rate must be >= 0, got {self.lr}")

    @property
    def num_tensors(self) -> int:
        return len(self.exp_avg)

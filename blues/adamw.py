"""The optimizer both trainers (and the benchmark) use: AdamW with these constants, decoupled weight
decay on matrices only (every parameter with ndim >= 2: embedding, attention, router, experts);
RMSNorm scales (ndim 1) are not decayed. torch.optim.AdamW and optax.adamw take the same numbers."""
BETAS, EPS = (0.9, 0.95), 1e-8


def decays(ndim: int) -> bool:
    """Whether a parameter of this rank gets weight decay."""
    return ndim >= 2

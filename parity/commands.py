"""The installed console commands (pyproject.toml [project.scripts]): each runs a `main(argv)`
through blues.cli.run_main, as `python train_torch.py` / `python generate.py` /
`python -m parity.convert_checkpoint` / `python -m parity.check` do from a checkout.

Each command imports only its own framework stack, when it runs.
"""
from __future__ import annotations

from blues.cli import run_main


def train_torch() -> int:
    from blues_torch.train import main
    return run_main(main)


def train_jax() -> int:
    from blues_jax.train import main
    return run_main(main)


def generate() -> int:
    from parity.generate import main
    return run_main(main)


def convert() -> int:
    from parity.convert_checkpoint import main
    return run_main(main)


def check() -> int:
    from parity.check import main
    return run_main(main)

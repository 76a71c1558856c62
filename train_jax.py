"""Train Blues with JAX (`python train_jax.py --help`): blues_jax/train.py, runnable as a script, one
process or one per host (`--coordinator ...`, SLURM, Open MPI)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the checkout's packages, from any directory

from blues.cli import run_main  # noqa: E402
from blues_jax.train import main  # noqa: E402,F401  (tests call train_jax.main)
from blues_jax.checkpoint import Checkpointer  # noqa: E402,F401  (tests write checkpoints as the trainer does)

if __name__ == "__main__":
    sys.exit(run_main(main))

"""Train Blues with PyTorch (`python train_torch.py --help`): blues_torch/train.py, runnable as a script,
under `deepspeed ... train_torch.py --deepspeed ds_config.json` and under torchrun."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the checkout's packages, from any directory

from blues.cli import run_main  # noqa: E402
from blues_torch.train import main  # noqa: E402,F401  (tests call train_torch.main)
from blues_torch.deepspeed_config import resolve_deepspeed_config  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(run_main(main))

"""`python generate.py ...` and `from generate import load_model, sample_text` from a checkout.

The implementation is parity/generate.py (installed as the `blues-generate` command; from an
installed package import it as `from parity.generate import load_model, sample_text`).
"""
import sys

from blues.cli import run_main
from parity.generate import *  # noqa: F401,F403 (the public API, parity.generate.__all__)
from parity.generate import main

if __name__ == "__main__":
    sys.exit(run_main(main))

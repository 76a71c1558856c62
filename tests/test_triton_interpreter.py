"""PyTorch's Triton kernels checked on a CPU, in Triton's interpreter (tests/triton_interpreted.py):
each check in a fresh process with TRITON_INTERPRET=1. Triton comes with CUDA builds of torch and is
pinned in requirements/cpu.txt for CI; without it these skip."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from triton_interpreted import CHECKS

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_triton_kernel_in_the_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(HERE, "triton_interpreted.py"), check], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith(f"{check}: ok")

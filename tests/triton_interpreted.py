"""PyTorch's Triton kernels in Triton's interpreter, on a CPU: `python tests/triton_interpreted.py CHECK`
with TRITON_INTERPRET=1 set (tests/test_triton_interpreter.py runs each check in its own process, as
Triton reads the variable when it is imported). Exits 0 when the check holds.

The interpreter runs each program of a launch with numpy, so these checks hold the kernels' indexing,
masks, online softmaxes and float32 math to the functions they compute (tests/kernel_cases.py, the
GPU tests' cases at smaller sizes); their GPU compile and speed are tests/test_gpu.py's and the
benchmark's. A kernel with a `tl.dot` runs in float16 and float32 here: the interpreter's bf16 dot
is wrong (a 16 x 16 product came out ~1e10 off, Triton 3.6 and 3.7); the GPU tests run it in bf16.
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the checkout, and tests/

from blues.xent_launch import Launch  # noqa: E402
from blues_torch import xent_kernel  # noqa: E402
from kernel_cases import check_gated_gelu_backward, check_loss_kernels  # noqa: E402


def loss_kernels() -> None:
    """The loss kernels at V 10001 in Vp 10048 (a partial last piece) with three launches: one program
    a row (the trainer's), three programs a row of 1024-column pieces (the last split's last two
    pieces wholly past Vp), and four asked of a row of three pieces (fitted to three)."""
    g = torch.Generator().manual_seed(8)
    for launch in (xent_kernel.LAUNCH, Launch(1024, 3, 4), Launch(4096, 4, 4)):
        check_loss_kernels(48, 10001, 10048, g, launch)


def gated_gelu_backward() -> None:
    """The experts' fused gated-GeLU backward on a row count and a width its blocks do not divide."""
    check_gated_gelu_backward(torch.ops.blues.gated_gelu_backward, 101, 384, torch.Generator().manual_seed(6))


CHECKS = {"loss_kernels": loss_kernels, "gated_gelu_backward": gated_gelu_backward}

if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1"
    assert xent_kernel.triton is not None, "Triton is not installed"
    CHECKS[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")

"""RoPE's inverse frequencies, shared by both frameworks: inv_freq[j] = theta^(-2j/Dh), j < Dh/2.

Computed in float64 on the host, here, so that each framework rounds the same numbers to float32
once (they then agree bit for bit) and so that no device kernel computes a float64 power: left in a
traced graph, torch.compile fused the power (and the cos/sin after it) into every kernel that
applies RoPE, recomputing them per element of q and k.
"""
from __future__ import annotations


def inv_freq(head_dim: int, theta: float) -> list[float]:
    """[Dh/2] Python floats (float64), to be rounded to float32 by the caller."""
    return [theta ** -(j * 2.0 / head_dim) for j in range(head_dim // 2)]

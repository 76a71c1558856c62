"""The experts' activation, gated GeLU: hidden [M, 2F] (value columns first, then gate) -> [M, F]
gelu(gate) * value, exact (erf) GeLU in float32.

`gated_gelu` is the definition (and the path everywhere but the sorted GPU experts). `forward` and
`backward` are the sorted experts' two passes; with `fused` they run as Pallas (Triton) kernels
that treat each [value, gate] pair of columns together. XLA's own fusions do not: a fusion writes
one output, so the backward's [d_value | d_gate] concatenation computes erf once per output column
(twice per pair) and reads each pair twice: the two passes ran at 2.0 and 1.7 TB/s (16 ms of a
153 ms bench step on an H200; scripts/gelu_probe.py). The kernels read each input once and compute
erf once per pair; the backward also returns the activation itself, which the weight gradient
needs, from the same read. Pallas's Triton lowering has no erf, so the kernels carry their own.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Launch(NamedTuple):
    """A kernel's program shape: the elements of its [bm, bf] block of each half, and its warps."""
    block_elements: int
    num_warps: int


# Picked on an H200 at the bench shape, [32768, 2 x 4096] (scripts/gelu_probe.py, docs/performance.md):
# the forward 0.218 ms at 4096 x 4 warps (3.70 TB/s), the backward 0.424 ms at 2048 x 4 warps (3.80
# TB/s; 0.522 at 4096 x 4, 0.435 at 4096 x 8, 0.62-0.64 with 8192-element blocks).
FORWARD_LAUNCH = Launch(4096, 4)
BACKWARD_LAUNCH = Launch(2048, 4)


def gated_gelu(hidden: jax.Array, f: int) -> jax.Array:
    """[..., 2F] -> [..., F] float32: gelu(gate) * value."""
    value, gate = hidden[..., :f], hidden[..., f:]  # [..., F] each
    return jax.nn.gelu(gate.astype(jnp.float32), approximate=False) * value.astype(jnp.float32)


def forward(hidden: jax.Array, f: int, *, fused: bool, interpret: bool = False) -> jax.Array:
    """[M, 2F] -> act [M, F] in hidden's dtype."""
    if not fused:
        return gated_gelu(hidden, f).astype(hidden.dtype)
    m = hidden.shape[0]
    return _pallas(_forward_kernel, (m, f), FORWARD_LAUNCH, [(m, f)], hidden.dtype, interpret)(hidden)[0]


def backward(hidden: jax.Array, d_act: jax.Array, *, fused: bool,
             interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """hidden [M, 2F], d_act [M, F] -> (act [M, F], d_hidden [M, 2F]), both in hidden's dtype."""
    f = d_act.shape[-1]
    if not fused:
        act, act_vjp = jax.vjp(lambda h: gated_gelu(h, f).astype(h.dtype), hidden)  # [M, F]
        (d_hidden,) = act_vjp(d_act.astype(hidden.dtype))  # [M, 2F]
        return act, d_hidden
    m = hidden.shape[0]
    call = _pallas(_backward_kernel, (m, f), BACKWARD_LAUNCH, [(m, f), (m, 2 * f)], hidden.dtype, interpret)
    act, d_hidden = call(hidden, d_act)
    return act, d_hidden


def _blocks(m: int, f: int, block_elements: int) -> tuple[int, int]:
    """Power-of-two block sides (Triton's rule) that divide M and F: no masks, no ragged edge."""
    bf = math.gcd(f, 1024)
    bm = math.gcd(m, max(block_elements // bf, 1))
    return bm, bf


def _pallas(kernel, shape, launch: Launch, out_shapes, dtype, interpret):
    """A grid of [bm, bf] blocks over [M, F]; every ref is the whole array, indexed in the kernel
    (one program touches two column blocks, F apart, of the [M, 2F] arrays)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    m, f = shape
    bm, bf = _blocks(m, f, launch.block_elements)
    return pl.pallas_call(
        functools.partial(kernel, bm=bm, bf=bf, f=f),
        out_shape=[jax.ShapeDtypeStruct(s, dtype) for s in out_shapes],
        grid=(m // bm, f // bf),
        compiler_params=plt.CompilerParams(num_warps=launch.num_warps, num_stages=1),
        interpret=interpret,
        name=kernel.__name__.strip("_"),
    )


def _halves(hidden_ref, bm, bf, f):
    """This program's (rows, columns) and its float32 value and gate blocks [bm, bf]."""
    from jax.experimental import pallas as pl

    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bf, bf)
    gate_cols = pl.ds(f + j * bf, bf)
    value = hidden_ref[rows, cols].astype(jnp.float32)  # [bm, bf]
    gate = hidden_ref[rows, gate_cols].astype(jnp.float32)  # [bm, bf]
    return rows, cols, gate_cols, value, gate


# Eigen's float32 erf (its generic_fast_erf_float): x * P(x^2) / Q(x^2) on x clamped to [-4, 4],
# where erf is 1 to float32 precision. Max error 4.2e-7 against math.erf over [-6, 6]; JAX's own
# float32 erf on a CPU: 3.0e-7. Coefficients highest power first.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _erf(x: jax.Array) -> jax.Array:
    x = jnp.minimum(jnp.maximum(x, -4.0), 4.0)
    x2 = x * x
    p, q = jnp.full_like(x, _ERF_P[0]), jnp.full_like(x, _ERF_Q[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


def _forward_kernel(hidden_ref, act_ref, *, bm, bf, f):
    rows, cols, _, value, gate = _halves(hidden_ref, bm, bf, f)
    cdf = 0.5 * (1.0 + _erf(gate * _SQRT_HALF))  # Phi(gate)
    act_ref[rows, cols] = (gate * cdf * value).astype(act_ref.dtype)


def _backward_kernel(hidden_ref, d_act_ref, act_ref, d_hidden_ref, *, bm, bf, f):
    rows, cols, gate_cols, value, gate = _halves(hidden_ref, bm, bf, f)
    d_act = d_act_ref[rows, cols].astype(jnp.float32)  # [bm, bf]
    cdf = 0.5 * (1.0 + _erf(gate * _SQRT_HALF))  # Phi(gate)
    pdf = jnp.exp(-0.5 * gate * gate) * _INV_SQRT_2PI  # phi(gate)
    gelu = gate * cdf
    act_ref[rows, cols] = (gelu * value).astype(act_ref.dtype)
    d_hidden_ref[rows, cols] = (d_act * gelu).astype(d_hidden_ref.dtype)  # d value
    d_hidden_ref[rows, gate_cols] = (d_act * value * (cdf + gate * pdf)).astype(d_hidden_ref.dtype)  # d gate

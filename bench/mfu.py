"""Model FLOPs utilisation: one formula for every framework and for the peer.

Training, per token (forward + backward):

    flops_per_token = 6 * N_active + 6 * L * H * Dh * T

- `N_active = config.num_active_matmul_parameters()`: the matmul weights one token touches: q, k,
  v, o, the router, k of the E experts (3 * d * F each: w_in's two halves and w_out) in every
  layer, and the tied LM head (V * d, the unpadded vocabulary). Norm scales and the embedding
  *lookup* are not matmuls and are not counted. 6 = 2 (multiply-add) x 3 (forward, and backward
  for activations and for weights).
- Causal attention: per layer and query, QK^T and PV each take 2 * H * Dh flops per key attended;
  a causal query at position t attends t + 1 keys, T/2 on average (the +1/2 is dropped), so the
  forward is 2 * 2 * H * Dh * T/2 = 2 * H * Dh * T per token and layer; times 3 for forward +
  backward gives 6 * L * H * Dh * T. Flash kernels that skip the masked half do exactly this much
  useful work; kernels that compute the full square do twice as much, and the formula does not
  credit them for it.

Decoding, per generated token (forward only, batch of independent sequences):

    flops_per_token = 2 * N_active + 4 * L * H * Dh * S_mean

with S_mean the mean number of cached keys a new token attends (prompt + half the new tokens).
Decoding is bound by memory bandwidth, so this MFU is small by nature; it is printed to show how far.

The peer (Hugging Face Mixtral at the same size) is held to the same formula with the same
config numbers, so MFU compares like with like. Two denominators, both reported:
- the datasheet's dense bf16 rate of the GPU (`spec_tflops`: 989 TFLOP/s on an H200), the figure
  other reports quote;
- the dense bf16 matmul rate measured in the same run on the same device by the same framework
  (`measure_dense_tflops`, an 8192^3 product: 660-800 TFLOP/s on an H200, varying by run), what
  this GPU actually sustains at its clocks and power limit.
"""
from __future__ import annotations

import statistics
import time

from blues.config import BluesConfig

DENSE_N = 8192


def train_flops_per_token(config: BluesConfig, seq_len: int) -> float:
    """6 * N_active + 6 * L * H * Dh * T (see the module docstring)."""
    attn = 6 * config.num_layers * config.num_attention_heads * config.head_dim * seq_len
    return 6.0 * config.num_active_matmul_parameters() + attn


def decode_flops_per_token(config: BluesConfig, prompt_len: int, new_tokens: int) -> float:
    """2 * N_active + 4 * L * H * Dh * S_mean (see the module docstring)."""
    s_mean = prompt_len + new_tokens / 2
    attn = 4 * config.num_layers * config.num_attention_heads * config.head_dim * s_mean
    return 2.0 * config.num_active_matmul_parameters() + attn


def lm_head_loss_flops_per_token(config: BluesConfig) -> float:
    """LM head + cross-entropy, forward and backward: 6 * V * d (the three GEMMs of the head)."""
    return 6.0 * config.vocab_size * config.hidden_size


# Dense bf16 tensor-core rate without sparsity, TFLOP/s, from the vendor's datasheet; matched
# against the GPU's name (torch.cuda.get_device_name), first match wins.
SPEC_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


def spec_tflops(gpu_name: str | None) -> float | None:
    """The datasheet's dense bf16 TFLOP/s of a GPU by name; None for a CPU or an unknown GPU."""
    for key, tflops in SPEC_TFLOPS:
        if gpu_name and key in gpu_name:
            return tflops
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float | None, dense_tflops: float | None) -> float | None:
    """Achieved model flops over a dense bf16 rate (measured or datasheet); None when any input is missing."""
    if not tokens_per_s or not flops_per_token or not dense_tflops:
        return None
    return tokens_per_s * flops_per_token / (dense_tflops * 1e12)


# ---- the denominator: a dense bf16 matmul, measured ------------------------------------------------

def measure_dense_tflops(framework: str, *, n: int = DENSE_N, samples: int = 7, reps: int = 10,
                         warm_s: float = 0.5) -> float:
    """Median TFLOP/s of an n x n x n bf16 matmul on the default device of `framework`.

    Random inputs (zeros run faster on some GPUs), two input sets alternated so consecutive
    products do not read the same operands from L2 (at n = 8192 one operand is 128 MiB, well past
    the H200's 50 MiB L2 anyway). First `warm_s` seconds of products untimed, so the clocks have
    ramped up from idle; then `samples` samples of `reps` products queued back to back and
    synchronised once (one product takes ~1.5 ms on an H200: a sync per product would count the
    host round trip too), median of the samples.
    """
    if framework == "torch":
        return _dense_torch(n, samples, reps, warm_s)
    if framework == "jax":
        return _dense_jax(n, samples, reps, warm_s)
    raise ValueError(f"unknown framework {framework!r}")


def _time_products(product, sync, samples: int, reps: int, warm_s: float) -> float:
    """Median seconds per product: warm for warm_s, then `samples` samples of `reps` products."""
    t_end = time.perf_counter() + warm_s
    i = 0
    while True:
        out = product(i)
        i += 1
        if i % 10 == 0 or time.perf_counter() > t_end:
            sync(out)
            if time.perf_counter() > t_end:
                break
    times = []
    for _ in range(samples):
        sync(out)
        t0 = time.perf_counter()
        for _ in range(reps):
            out = product(i)
            i += 1
        sync(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _dense_torch(n: int, samples: int, reps: int, warm_s: float) -> float:
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16),
             torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16)) for _ in range(2)]
    outs = [torch.empty(n, n, device=device, dtype=torch.bfloat16) for _ in range(2)]

    def product(i):
        a, b = sets[i % 2]
        return torch.matmul(a, b, out=outs[i % 2])

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = _time_products(product, sync, samples, reps, warm_s)
    del sets, outs
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2.0 * n ** 3 / seconds / 1e12


def _dense_jax(n: int, samples: int, reps: int, warm_s: float) -> float:
    import jax
    import jax.numpy as jnp
    keys = jax.random.split(jax.random.key(0), 4)
    sets = [(jax.random.normal(keys[2 * i], (n, n), jnp.bfloat16),
             jax.random.normal(keys[2 * i + 1], (n, n), jnp.bfloat16)) for i in range(2)]
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.bfloat16))

    def product(i):
        return matmul(*sets[i % 2])

    seconds = _time_products(product, jax.block_until_ready, samples, reps, warm_s)
    del sets
    return 2.0 * n ** 3 / seconds / 1e12

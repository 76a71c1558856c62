"""Mixture-of-experts pieces: routing, the capacity rule, expert compute (optionally expert-parallel
over a device mesh), router losses.

Everything works on flattened tokens: x [N, d] with N = B*T in (b, t) order, which is the "token
order" of the capacity priority rule. On a mesh the token axis is split over every device in
contiguous ranges (`sharding.BATCH_AXES`), and the expert axis of the weights over "expert".

Expert compute has two forms, with the same results (and on a GPU, for decode-sized inputs, a third:
every expert on every token, `_dense_small_block_mlp`, as in blues_torch):
- sorted (one device, where `grouped_matmul`'s Mosaic GPU kernels apply, i.e. a Hopper GPU in
  bf16): assignments sorted by expert into [N*k, d] and one grouped GEMM per projection; no
  padding, no GEMM recomputed. The same plan as blues_torch's `torch._grouped_mm` path.
- blocks (everywhere else, and always on a mesh, whose all-to-all needs equal shapes): dense
  per-expert blocks [E, C, d] and one batched einsum per projection, not `jax.lax.ragged_dot`,
  which XLA lowers ~16x slower than a dense GEMM on an H200. The block size C is picked at run
  time among a few static buckets from the actual largest expert load, so dropless mode never
  drops and the common case costs little more than the dense GEMM.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from blues.errors import BluesError
from blues_jax import gated_gelu
from blues_jax.grouped_matmul import mosaic_applies, product, weight_grad
from blues_jax.sharding import BATCH_AXES, mesh_is_trivial

EXPERT_AXIS = "expert"


class Routing(NamedTuple):
    logits: jax.Array  # [N, E] float32 router logits, before noise (the z-loss reads these)
    probs: jax.Array  # [N, E] float32 softmax of the (noisy, in training) logits
    weights: jax.Array  # [N, k] float32 gate weights of the chosen experts
    indices: jax.Array  # [N, k] int32 chosen experts, best first, ties to the lower index


def route(x: jax.Array, router: jax.Array, *, k: int, noise_std: float, normalize: bool,
          noise_key: jax.Array | None, training: bool) -> Routing:
    """Top-k softmax routing. x [N, d], router [d, E]. Noise N(0, 1) * noise_std is added to the
    logits in training only, drawn from `noise_key`."""
    # The router runs in float32 at full precision (no TF32 / bf16 passes) even in a bf16 model:
    # top-k choices must not flip with rounding, and the z-loss squares these logits.
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)  # [N, E]
    noisy = logits
    if training and noise_std > 0:
        if noise_key is None:
            raise BluesError("router noise needs a random key in training mode (model built without rngs?)")
        noisy = logits + noise_std * jax.random.normal(noise_key, logits.shape, jnp.float32)
    probs = jax.nn.softmax(noisy, axis=-1)  # [N, E]
    # lax.top_k returns equal values lower index first (documented), so ties go to the lower expert.
    weights, indices = jax.lax.top_k(probs, k)  # [N, k] each
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(logits, probs, weights, indices.astype(jnp.int32))


# ---- the capacity rule -----------------------------------------------------------------------------

def _num_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _check_tokens(n: int, mesh: Mesh) -> None:
    shards = _num_shards(mesh)
    if n % shards:
        raise BluesError(f"{n} tokens cannot be split over the mesh's {shards} devices (data x expert): "
                         f"use a batch size that is a multiple of {shards}")


def _local_keep(indices: jax.Array, num_experts: int, capacity: int, sharded: bool) -> jax.Array:
    """capacity_keep on this device's contiguous range of tokens, exact for the whole batch."""
    one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [n, k, E]
    rank = jnp.cumsum(one_hot, axis=0) - one_hot  # [n, k, E] earlier tokens here, same choice and expert
    counts = jnp.sum(one_hot, axis=0)  # [k, E] this shard's assignments per (choice, expert)
    if sharded:
        # Shards hold contiguous token ranges in (data, expert) order, so within a choice the
        # assignments of lower shards come first: offset by their counts.
        all_counts = jax.lax.all_gather(counts, BATCH_AXES)  # [S, k, E]
        shard = jax.lax.axis_index(BATCH_AXES)
        lower = (jnp.arange(all_counts.shape[0]) < shard).astype(jnp.int32)  # [S]
        earlier_shards = jnp.einsum("s,ske->ke", lower, all_counts)  # [k, E]
        totals = jnp.sum(all_counts, axis=0)  # [k, E]
    else:
        earlier_shards = jnp.zeros_like(counts)
        totals = counts
    earlier_choices = jnp.cumsum(totals, axis=0) - totals  # [k, E]: all of choice j' < j comes first
    position = rank + (earlier_shards + earlier_choices)[None]  # [n, k, E]
    position = jnp.take_along_axis(position, indices[..., None], axis=-1)[..., 0]  # [n, k]
    return position < capacity


def capacity_keep(indices: jax.Array, num_experts: int, capacity: int, *, mesh: Mesh | None = None) -> jax.Array:
    """keep [N, k] bool: which assignments an expert of `capacity` slots admits.

    Priority: all first choices in token order, then all second choices in token order, ... Each
    assignment's slot is the number of earlier assignments (in that order) to the same expert. On
    a mesh every device ranks its own tokens and offsets them by the other shards' all-gathered
    [k, E] counts, so the result is the same however the batch is split.
    """
    if mesh_is_trivial(mesh):
        return _local_keep(indices, num_experts, capacity, sharded=False)
    _check_tokens(indices.shape[0], mesh)
    spec = P(BATCH_AXES, None)
    fn = jax.shard_map(lambda idx: _local_keep(idx, num_experts, capacity, sharded=True),
                       mesh=mesh, in_specs=(spec,), out_specs=spec)
    return fn(indices)


# ---- expert compute --------------------------------------------------------------------------------

def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# Up to this many assignments (N * k) on one GPU (decode steps), expert_mlp computes every expert
# on every token (_dense_small_block_mlp, as blues_torch does): blocks this small cost about their
# launch, and the blocks form would add its dispatch kernels and a `lax.switch` among block sizes,
# whose branch index XLA:GPU copies to the host and waits for, once per layer and step.
SMALL_BLOCK_ROWS = 256


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def block_buckets(num_tokens: int, k: int, num_experts: int, capacity: int | None, sharded: bool) -> list[int]:
    """Candidate per-expert block sizes, smallest first; the last holds any possible load.

    One device never gives an expert more than `num_tokens` of its assignments (a token picks an
    expert at most once), nor more than C in capacity mode. Unsharded capacity mode uses C directly.
    """
    top = min(num_tokens, capacity) if capacity is not None else num_tokens
    top = _round_up(max(top, 1), 8)  # multiples of 8 keep the GEMMs on tensor-core shapes
    if capacity is not None and not sharded:
        return [top]
    mean_load = num_tokens * k / num_experts
    sizes = {min(_round_up(math.ceil(f * mean_load), 8), top) for f in (1.25, 2.0)}
    return sorted(sizes | {top})


def _sorted_compute(x, indices, weights, keep, w_in, w_out, gmm: str):
    """Assignments sorted by expert, one grouped GEMM per projection, combined. -> [n, d]

    Every assignment is computed, refused ones (capacity mode) included, and the combine gives
    those a zero weight: grouped_matmul wants every row in a group, and the refused rows are few
    (C >= the mean load), so skipping them would save little.

    What the backward keeps, per layer at the bench size: the projection's input `hidden`
    [N*k, 2F] bf16 (512 MiB), the tokens x, the bf16 expert outputs and the bf16 weight copies
    (192 MiB; cast once a step, as autocast's are in blues_torch: recasting them in the backward
    costs 1.75 ms of kernels a step on an H200); the sorted rows, the activation and
    the float32 expert outputs are recomputed (a gather, an elementwise pass) rather than held
    (see _fresh for what that measured).
    """
    n, d = x.shape
    k = indices.shape[1]
    num_experts = w_in.shape[0]
    flat = indices.reshape(-1)  # [n*k] assignment a = token * k + choice
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [n*k] assignments by expert, token order within
    position = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32))  # [n*k] the inverse
    # A one-hot sum, not jnp.bincount: a scatter-add of n*k ones into E bins is atomics contending
    # on E addresses (PyTorch's equivalent took 0.5 ms a call at the bench size).
    group_sizes = expert_counts(indices, num_experts).astype(jnp.int32)  # [E]
    hidden = _gather_grouped_matmul(x, order, position.reshape(n, k), w_in.astype(x.dtype), group_sizes,
                                    gmm)  # [n*k, 2F]
    out = _gelu_grouped_matmul(hidden, w_out.astype(x.dtype), group_sizes, gmm)  # [n*k, d]
    picked = _combine(out, position.reshape(n, k), order)  # [n, k, d]
    return _weighted_sum(picked, weights, keep).astype(x.dtype)


def _fresh(tree):
    """The backward's recomputations start from here: without the barrier XLA's CSE merges them
    with the forward's identical ops and keeps those results alive from the forward instead
    (measured on an H200 at the bench size: peak 41.9 GiB without, 31.6 GiB with)."""
    return jax.lax.optimization_barrier(tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gather_grouped_matmul(x, order, position, w_in, group_sizes, impl):
    """rows = x[order // k] (the assignments sorted by expert), times their group's w_in:
    [n, d] -> [n*k, 2F]. position [n, k] is order's inverse; w_in in x's dtype."""
    rows = x[order // position.shape[1]]  # [n*k, d]
    return product(rows, w_in, group_sizes, impl=impl)


def _gather_grouped_matmul_fwd(x, order, position, w_in, group_sizes, impl):
    out = _gather_grouped_matmul(x, order, position, w_in, group_sizes, impl)
    return out, (x, order, position, w_in, group_sizes)


def _gather_grouped_matmul_bwd(impl, res, g):
    x, order, position, w_in, group_sizes = res
    x = _fresh(x)
    rows = x[order // position.shape[1]]  # [n*k, d], gathered again
    g = g.astype(x.dtype)  # [n*k, 2F]
    d_rows = product(g, w_in, group_sizes, transpose_rhs=True, impl=impl)  # [n*k, d]
    d_w_in = weight_grad(rows, g, group_sizes, impl=impl)  # [G, d, 2F]
    # dx[t] = sum over t's k assignments: a gather by the inverse map, not autodiff's scatter-add
    dx = jnp.sum(d_rows[position].astype(jnp.float32), axis=1)  # [n, k, d] -> [n, d]
    return dx.astype(x.dtype), None, None, d_w_in.astype(w_in.dtype), None


_gather_grouped_matmul.defvjp(_gather_grouped_matmul_fwd, _gather_grouped_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gelu_grouped_matmul(hidden, w_out, group_sizes, impl):
    """gated_gelu(hidden) times its group's w_out: [M, 2F] -> [M, d]; w_out in hidden's dtype.

    The backward keeps `hidden` and recomputes the activation rather than saving it and autodiff's
    float32 intermediates, as blues_torch's _GatedGelu does: with the Mosaic GEMMs (a Hopper GPU)
    the activation's two passes are gated_gelu's fused kernels, the second of which returns the
    activation and its input gradient from one read of `hidden`.
    """
    act = gated_gelu.forward(hidden, w_out.shape[1], fused=impl == "mosaic")  # [M, F]
    return product(act, w_out, group_sizes, impl=impl)


def _gelu_grouped_matmul_fwd(hidden, w_out, group_sizes, impl):
    return _gelu_grouped_matmul(hidden, w_out, group_sizes, impl), (hidden, w_out, group_sizes)


def _gelu_grouped_matmul_bwd(impl, res, g):
    hidden, w_out, group_sizes = res
    hidden = _fresh(hidden)
    g = g.astype(hidden.dtype)  # [M, d]
    d_act = product(g, w_out, group_sizes, transpose_rhs=True, impl=impl)  # [M, F]
    act, d_hidden = gated_gelu.backward(hidden, d_act, fused=impl == "mosaic")  # [M, F], [M, 2F]
    d_w_out = weight_grad(act, g, group_sizes, impl=impl)  # [G, F, d]
    return d_hidden, d_w_out.astype(w_out.dtype), None


_gelu_grouped_matmul.defvjp(_gelu_grouped_matmul_fwd, _gelu_grouped_matmul_bwd)


@jax.checkpoint  # keeps the bf16 expert outputs for the backward, not their float32 copies
def _weighted_sum(picked, weights, keep):
    """[n, k, d] expert outputs, [n, k] gate weights (refused: 0) -> [n, d] float32."""
    gate_w = jnp.where(keep, weights, 0.0).astype(jnp.float32)  # [n, k]
    return jnp.einsum("nkd,nk->nd", picked.astype(jnp.float32), gate_w)  # [n, d]


def _blocks_compute(x, indices, weights, keep, w_in, w_out, block: int, ep: int):
    """Dispatch into [E, block, d], run the experts (over the mesh when ep > 1), combine. -> [n, d]."""
    n, d = x.shape
    k = indices.shape[1]
    e_local, f = w_in.shape[0], w_out.shape[1]
    num_experts = e_local * ep
    slots = num_experts * block
    slot = _slots(indices, keep, num_experts)  # [n, k] place within the expert's block
    dest = jnp.where(keep, indices * block + slot, slots).astype(jnp.int32)  # [n, k]; refused: slots (zero row)
    # The inverse map, slot -> assignment n*k + j (empty slots: n*k). Only int32s are scattered here;
    # the activations move by row gathers in both passes (see _dispatch / _combine).
    src = jnp.full((slots,), n * k, jnp.int32).at[dest.reshape(-1)].set(
        jnp.arange(n * k, dtype=jnp.int32), mode="drop")  # [E*block]
    blocks = _dispatch(x, src, dest, k).reshape(num_experts, block, d)  # [E, block, d]
    if ep > 1:  # send each expert's block to the device that holds that expert
        blocks = jax.lax.all_to_all(blocks, EXPERT_AXIS, 0, 1, tiled=True)  # [E_local, ep*block, d]
    hidden = jnp.einsum("ecd,edf->ecf", blocks, w_in.astype(x.dtype))  # [E_local, C, 2F]
    act = gated_gelu.gated_gelu(hidden, f)  # [E_local, C, F]
    out = jnp.einsum("ecf,efd->ecd", act.astype(x.dtype), w_out.astype(x.dtype))  # [E_local, C, d]
    if ep > 1:  # and the results back to the tokens' devices
        out = jax.lax.all_to_all(out, EXPERT_AXIS, 1, 0, tiled=True)  # [E, block, d]
    picked = _combine(out.reshape(slots, d), dest, src)  # [n, k, d]; refused assignments read zeros
    return _weighted_sum(picked, weights, keep).astype(x.dtype)


def _dense_small_block_mlp(x, indices, weights, keep, w_in, w_out):
    """expert_mlp for decode-sized blocks on a GPU (mirror of blues_torch's): every expert on every
    token in two batched GEMMs, then each token takes its k experts' rows. At this size the GEMMs
    are bound by reading the weights, which happens once either way; no slots, scatter or gathers
    of the blocks form. x [N, d] -> [N, d]."""
    f = w_out.shape[1]
    hidden = jnp.einsum("nd,edf->enf", x, w_in.astype(x.dtype))  # [E, N, 2F]
    act = gated_gelu.gated_gelu(hidden, f)  # [E, N, F]
    out = jnp.einsum("enf,efd->end", act.astype(x.dtype), w_out.astype(x.dtype))  # [E, N, d]
    picked = out[indices, jnp.arange(x.shape[0])[:, None]]  # [N, k, d]: row n of each chosen expert
    return _weighted_sum(picked, weights, keep).astype(x.dtype)


# Dispatch and combine are row gathers whose index maps are injective (a slot holds at most one
# assignment), so each one's gradient is the gather by the inverse map. Left to autodiff, the
# gradient of a gather is a scatter-add, which on a GPU is atomics (slow in bf16) for no reason.

def _with_zero_row(a: jax.Array) -> jax.Array:
    return jnp.concatenate([a, jnp.zeros((1, *a.shape[1:]), a.dtype)], axis=0)  # [rows+1, ...]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(x, src, dest, k):
    """blocks[s] = x[src[s] // k] (the token of the assignment in slot s), zeros for an empty slot.
    x [n, d], src [S] (empty: n*k), dest [n, k] (refused: S) -> [S, d]."""
    return _with_zero_row(x)[src // k]


def _dispatch_fwd(x, src, dest, k):
    return _dispatch(x, src, dest, k), (src, dest)


def _dispatch_bwd(k, res, g):
    src, dest = res
    # dx[n] = sum over n's kept assignments of their slots' gradients; refused ones read the zero row.
    dx = jnp.sum(_with_zero_row(g)[dest].astype(jnp.float32), axis=1)  # [n, k, d] -> [n, d]
    return dx.astype(g.dtype), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(out, dest, src):
    """picked[n, j] = out[dest[n, j]], zeros for a refused assignment. out [S, d] -> [n, k, d]."""
    return _with_zero_row(out)[dest]


def _combine_fwd(out, dest, src):
    return _combine(out, dest, src), (dest, src)


def _combine_bwd(res, g):
    dest, src = res
    n, k, d = g.shape
    d_out = _with_zero_row(g.reshape(n * k, d))[src]  # [S, d]: each slot's assignment's gradient; empty: 0
    return d_out, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _slots(indices, keep, num_experts):
    """[n, k] rank of each kept assignment among this device's kept assignments to its expert."""
    one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32) * keep[..., None]  # [n, k, E]
    flat = one_hot.reshape(-1, num_experts)  # [n*k, E]
    rank = (jnp.cumsum(flat, axis=0) - flat).reshape(one_hot.shape)  # [n, k, E]
    return jnp.take_along_axis(rank, indices[..., None], axis=-1)[..., 0]  # [n, k]


def _local_expert_mlp(x, indices, weights, keep, w_in, w_out, *, capacity, ep: int, sharded: bool):
    n, k = indices.shape
    num_experts = w_in.shape[0] * ep
    buckets = block_buckets(n, k, num_experts, capacity, sharded)
    branches = [lambda ops, b=b: _blocks_compute(*ops, block=b, ep=ep) for b in buckets]
    ops = (x, indices, weights, keep, w_in, w_out)
    if len(branches) == 1:
        return branches[0](ops)
    # Rematerialise each branch: autodiff of a switch otherwise makes every branch's residuals
    # (hidden activations of every block size, mostly zeros) outputs of the forward switch, which
    # costs several times the expert GEMMs. Saving only the inputs, the backward pass recomputes
    # the one branch taken.
    branches = [jax.checkpoint(branch) for branch in branches]
    # The largest kept load of any expert on this device; every device must take the same branch
    # (the all-to-all needs equal block shapes), so agree on the mesh-wide maximum.
    load = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.int32) * keep[..., None], axis=(0, 1))  # [E]
    max_load = jnp.max(load)
    if sharded:
        max_load = jax.lax.pmax(max_load, BATCH_AXES)
    choice = jnp.sum(max_load > jnp.asarray(buckets[:-1], jnp.int32))  # first bucket that fits
    return jax.lax.switch(choice, branches, ops)


EXPERT_GEMMS = ("auto", "blocks", "mosaic", "ragged_dot")


def expert_mlp(x: jax.Array, indices: jax.Array, weights: jax.Array, keep: jax.Array | None,
               w_in: jax.Array, w_out: jax.Array, *, capacity: int | None = None,
               mesh: Mesh | None = None, gemm: str = "auto") -> jax.Array:
    """y[n] = sum_j keep[n,j] * weights[n,j] * Expert_{indices[n,j]}(x[n]).

    x [N, d], indices/weights/keep [N, k] (keep None = dropless), w_in [E, d, 2F], w_out [E, F, d]
    -> y [N, d]. `capacity` (C, capacity mode only) bounds the block size. With a mesh, tokens stay
    split over all devices and each device computes only the experts it holds (w_in/w_out split on
    axis 0 over "expert"): blocks travel to their experts' devices and back by all-to-all.
    `gemm`: "auto" (on one GPU up to SMALL_BLOCK_ROWS assignments every expert on every token, else
    sorted with Mosaic grouped GEMMs where they apply, else blocks), "blocks", or the sorted form with
    "mosaic" / "ragged_dot" grouped GEMMs (one device only).
    """
    if gemm not in EXPERT_GEMMS:
        raise BluesError(f"expert gemm must be one of {', '.join(EXPERT_GEMMS)}, not {gemm!r}")
    if gemm == "auto" and _on_gpu() and mesh_is_trivial(mesh) and indices.size <= SMALL_BLOCK_ROWS:
        return _dense_small_block_mlp(x, indices, weights, _keep_all(indices) if keep is None else keep, w_in, w_out)
    if gemm == "auto":
        gemm = "mosaic" if _sorted_pays(x, indices, w_in, w_out, mesh) else "blocks"
    if gemm != "blocks":
        if not mesh_is_trivial(mesh):
            raise BluesError(f"expert gemm {gemm!r} runs on one device; a mesh uses 'blocks'")
        return _sorted_compute(x, indices, weights, _keep_all(indices) if keep is None else keep, w_in, w_out, gemm)
    if keep is None:  # dropless: the capacity bound does not apply
        keep, capacity = _keep_all(indices), None
    if mesh_is_trivial(mesh):
        return _local_expert_mlp(x, indices, weights, keep, w_in, w_out, capacity=capacity, ep=1, sharded=False)
    _check_tokens(x.shape[0], mesh)
    ep = mesh.shape[EXPERT_AXIS]
    if w_in.shape[0] % ep:
        raise BluesError(f"tot_num_experts ({w_in.shape[0]}) must be a multiple of the mesh's expert axis ({ep})")
    tokens, experts = P(BATCH_AXES, None), P(EXPERT_AXIS, None, None)
    fn = jax.shard_map(
        lambda *ops: _local_expert_mlp(*ops, capacity=capacity, ep=ep, sharded=True),
        mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, experts, experts), out_specs=tokens)
    return fn(x, indices, weights, keep, w_in, w_out)


# Below this many assignments per expert on average (one Mosaic row tile) the blocks form stays:
# decode steps (a few rows) were measured with it, and the sorted form only on training batches.
SORTED_MIN_ROWS_PER_EXPERT = 128


def _sorted_pays(x, indices, w_in, w_out, mesh) -> bool:
    """The sorted form with Mosaic grouped GEMMs: one device, Hopper bf16, enough rows per expert."""
    return (mesh_is_trivial(mesh) and indices.size >= SORTED_MIN_ROWS_PER_EXPERT * w_in.shape[0]
            and mosaic_applies(x, w_in) and mosaic_applies(x, w_out))


def _keep_all(indices: jax.Array) -> jax.Array:
    return jnp.ones(indices.shape, bool)


# ---- router losses ---------------------------------------------------------------------------------

def expert_counts(indices: jax.Array, num_experts: int) -> jax.Array:
    """[E] int32: assignments each expert received (before capacity). indices [N, k]."""
    return jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.int32), axis=(0, 1))


def load_balancing_loss(probs: jax.Array, indices: jax.Array, num_experts: int) -> jax.Array:
    """Switch loss E * sum_e f_e * P_e. probs [N, E], indices [N, k] (before capacity) -> scalar."""
    f = expert_counts(indices, num_experts).astype(jnp.float32) / indices.size  # [E] fraction of N*k
    p = jnp.mean(probs.astype(jnp.float32), axis=0)  # [E] mean router probability
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss: mean over tokens of logsumexp(r)^2. logits [N, E] (before noise) -> scalar."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))

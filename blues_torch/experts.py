"""Mixture-of-experts pieces: routing, the capacity rule, dropless expert compute, router losses.

Everything works on flattened tokens: x [N, d] with N = B*T in (b, t) order, which is the "token
order" of the capacity priority rule.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

import torch

from blues_torch.gated_gelu import gated_gelu

if TYPE_CHECKING:  # the annotation only: expert_parallel imports this module
    from blues_torch.expert_parallel import ExpertExchange


class Routing(NamedTuple):
    logits: torch.Tensor  # [N, E] float32 router logits, before noise (the z-loss reads these)
    probs: torch.Tensor  # [N, E] float32 softmax of the (noisy, in training) logits
    weights: torch.Tensor  # [N, k] float32 gate weights of the chosen experts
    indices: torch.Tensor  # [N, k] int64 chosen experts, best first, ties to the lower index


def route(x: torch.Tensor, router: torch.Tensor, *, k: int, noise_std: float, normalize: bool,
          generator: torch.Generator | None, training: bool, noise: torch.Tensor | None = None) -> Routing:
    """Top-k softmax routing. x [N, d], router [d, E].

    Noise N(0, 1) * noise_std is added to the logits in training only; `noise` [N, E] is a
    pre-drawn standard-normal sample (the model draws all layers' noise up front so gradient
    checkpointing recomputes identical routing), else it is drawn from `generator`.
    """
    # The router runs in float32 even under bf16 autocast: top-k choices must not flip with
    # rounding, and the z-loss squares these logits.
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = x.float() @ router.float()  # [N, E]
    noisy = logits
    if training and noise_std > 0:
        if noise is None:
            noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
        noisy = logits + noise_std * noise
    probs = noisy.softmax(dim=-1)  # [N, E]
    indices = _top_k_lower_index_first(probs, k)  # [N, k]
    weights = probs.gather(1, indices)  # [N, k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, weights, indices)


def _top_k_lower_index_first(probs: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of the k largest probs, best first, equal values to the lower index (as
    jax.lax.top_k; torch.topk leaves the order of ties unspecified). k passes of argmax, which
    returns the first maximum: cheaper than a stable sort for the small k of routing, and one
    fused kernel under torch.compile (a decode step's routing was a 3-kernel radix sort)."""
    chosen = []
    for _ in range(k):
        best = probs.argmax(dim=-1)  # [N]
        chosen.append(best)
        probs = probs.scatter(1, best[:, None], float("-inf"))  # probabilities are >= 0: never chosen again
    return torch.stack(chosen, dim=-1)  # [N, k]


def capacity_keep(indices: torch.Tensor, num_experts: int, capacity: int, shard_counts: torch.Tensor | None = None,
                  shard: int = 0) -> torch.Tensor:
    """keep [N, k] bool: which assignments an expert of `capacity` slots admits.

    Priority: all first choices in token order, then all second choices in token order, ... Each
    assignment's slot is the number of earlier assignments (in that order) to the same expert.
    When the batch is split over S ranks in rank order (contiguous token ranges), `shard_counts`
    [S, k, E] holds every rank's `choice_counts` and `shard` is this rank: its tokens are offset by
    the lower ranks' assignments, so the result is this rank's rows of the whole batch's keep.
    """
    one_hot = (indices[..., None] == torch.arange(num_experts, device=indices.device)).long()  # [N, k, E]
    rank = one_hot.cumsum(dim=0) - one_hot  # [N, k, E] earlier tokens here with the same choice and expert
    if shard_counts is None:
        earlier_shards, totals = 0, one_hot.sum(dim=0)  # [k, E]
    else:
        earlier_shards, totals = shard_counts[:shard].sum(dim=0), shard_counts.sum(dim=0)  # [k, E] each
    earlier_choices = totals.cumsum(dim=0) - totals  # [k, E]: every choice j' < j comes first
    slot = rank + earlier_shards + earlier_choices  # [N, k, E]
    return slot.gather(-1, indices[..., None])[..., 0] < capacity  # [N, k]


def kept_counts(shard_counts: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """[S, E] int64: how many assignments each expert admits from each of S ranks, from every
    rank's `choice_counts` [S, k, E] alone (capacity None: dropless, all of them).

    The same rule as `capacity_keep`: rank s's choice-j assignments to expert e take the slots
    [start, start + count) with start = every rank's earlier choices' count plus the lower ranks'
    choice-j count, and the expert admits those below `capacity`. Row s equals the per-expert
    count of rank s's kept assignments, without its tokens.
    """
    if capacity is None:
        return shard_counts.sum(dim=1)  # [S, E]
    totals = shard_counts.sum(dim=0)  # [k, E]
    start = (totals.cumsum(dim=0) - totals) + (shard_counts.cumsum(dim=0) - shard_counts)  # [S, k, E]
    kept = torch.minimum((capacity - start).clamp(min=0), shard_counts)  # [S, k, E]
    return kept.sum(dim=1)  # [S, E]


def choice_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[k, E] int64: how many of the tokens' j-th choices name each expert. indices [N, k]."""
    return (indices[..., None] == torch.arange(num_experts, device=indices.device)).sum(dim=0)  # [N, k, E] -> [k, E]


def expert_counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many entries of `indices` (any shape) name each expert."""
    # A one-hot sum: a reduction with no host sync (CUDA bincount reads the max back to the host)
    # and no atomics. index_add_ into E bins ran as CUDA's sorting index_put, one warp per bin
    # adding thousands of ones in turn: 0.5 ms a call, 18.7 ms of a 153 ms compiled bench step.
    flat = indices.reshape(-1, 1)  # [M, 1]
    return (flat == torch.arange(num_experts, device=flat.device)).sum(dim=0)  # [M, E] -> [E] int64


# Up to this many assignments (N * k) a CUDA block without gradients is computed densely (see
# _dense_small_block_mlp): KV-cached decode steps.
SMALL_BLOCK_ROWS = 256


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on Hopper/Blackwell and needs every row stride and base pointer
    16-byte aligned, i.e. each inner dimension a multiple of 8 bf16 elements."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return False
    return all(w.dtype == torch.bfloat16 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)


def _expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, use_grouped: bool) -> torch.Tensor:
    """Row block e of x (rows sorted by expert, counts[e] rows each) times w[e]. x [M, a], w [E, a, b] -> [M, b]."""
    if use_grouped:
        offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's block
        return torch._grouped_mm(x, w, offs=offs)
    return _expert_loop(x, w, counts)


@torch.compiler.disable  # eager under torch.compile: traced, every new set of counts would recompile it
def _expert_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The portable path of _expert_matmul: one matmul per expert on its contiguous slice; an expert
    never sees a token it was not routed to, and empty experts cost nothing."""
    blocks = [x_e @ w[e] for e, x_e in enumerate(x.split(counts.tolist())) if x_e.shape[0] > 0]
    return torch.cat(blocks) if blocks else x.new_zeros(0, w.shape[-1])


def expert_mlp(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None,
               w_in: torch.Tensor, w_out: torch.Tensor, exchange: ExpertExchange | None = None) -> torch.Tensor:
    """y[n] = sum_j keep[n,j] * weights[n,j] * Expert_{indices[n,j]}(x[n]).

    x [N, d], indices/weights/keep [N, k] (keep None = dropless), w_in [E, d, 2F], w_out [E, F, d]
    -> y [N, d]. Assignments are sorted by expert, their tokens gathered into one [M, d] block and
    each projection is one grouped GEMM (or a loop over experts), so only routed pairs are computed.
    With an `exchange` (blues_torch/expert_parallel.py) this rank holds E/P of the experts (w_in
    [E/P, d, 2F]): the sorted rows travel to their experts' ranks and back around the GEMMs.
    """
    n, k = indices.shape
    # Under autocast the experts run in the autocast dtype (grouped_mm is not on autocast's list,
    # so cast explicitly); accumulation of the k contributions is float32.
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    w_in, w_out = w_in.to(dtype), w_out.to(dtype)
    if x.is_cuda and n * k <= SMALL_BLOCK_ROWS and not torch.is_grad_enabled() and exchange is None:
        return _dense_small_block_mlp(x.to(dtype), indices, weights, keep, w_in, w_out).to(x.dtype)

    expert = indices.reshape(-1)  # [N*k] assignment n*k + j -> expert
    assignment = torch.arange(n * k, device=x.device)  # [N*k]
    if keep is not None:  # capacity mode: refused assignments are not computed at all (the
        # kept count is data-dependent, so this boolean selection waits for the device)
        assignment = assignment[keep.reshape(-1)]  # [M]
        expert = expert[assignment]  # [M]
    order = torch.argsort(expert, stable=True)  # [M] group assignments by expert
    assignment = assignment[order]  # [M] sorted row -> assignment
    token = assignment // k  # [M] sorted row -> token
    m = assignment.shape[0]
    # The inverse map, assignment -> sorted row (m: refused), so that both gathers below have
    # gathers for backwards, as blues_jax/experts.py's do.
    position = torch.full((n * k,), m, device=x.device, dtype=torch.int64)
    position = position.scatter(0, assignment, torch.arange(m, device=x.device))  # [N*k]

    gate = _GatherRows.apply(weights.reshape(-1), assignment, position[:, None])  # [M]
    xs = _GatherRows.apply(x.to(dtype), token, position.view(n, k))  # [M, d]
    experts = functools.partial(sorted_experts, w_in=w_in, w_out=w_out)
    if exchange is None:
        out = experts(xs, expert_counts(expert, w_in.shape[0]))  # [M, d]; [E] rows per expert block
    else:  # the exchange holds every rank's kept counts per expert (ExpertExchange.plan)
        out = exchange(xs, experts)  # [M, d]
    # bf16 * float32 promotes to float32 (the same products as out.float() * gate), but autograd
    # keeps the bf16 `out` for the backward rather than a float32 copy (64 MiB a layer less at bench size).
    out = out * gate[:, None]  # [M, d] float32
    y = torch.zeros(n, x.shape[-1], device=x.device, dtype=torch.float32)
    y.index_add_(0, token, out)  # [N, d]: scatter-add the k contributions back to their tokens
    return y.to(x.dtype)


def sorted_experts(xs: torch.Tensor, counts: torch.Tensor, *, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """Every expert on its block of rows: xs [M, d] sorted by expert, counts [E] rows each -> [M, d]."""
    use_grouped = _grouped_mm_ok(xs, w_in, w_out)
    hidden = _expert_matmul(xs, w_in, counts, use_grouped)  # [M, 2F]
    return _expert_matmul(gated_gelu(hidden), w_out, counts, use_grouped)  # [M, F] -> [M, d]


class _GatherRows(torch.autograd.Function):
    """src[index], with a gather for its backward: `inverse` [len(src), r] lists, for each source
    row, the r output rows it was copied to (len(out): none). Autograd's backward of src[index] is
    an accumulating index_put: in eager, CUDA sorts the indices and adds each run in turn; compiled,
    atomics, whose order shows in the last bit once a row has more than two copies. Reading the r
    copies back and summing them in float32 is one gather, deterministic in both."""

    @staticmethod
    def forward(ctx, src, index, inverse):
        ctx.save_for_backward(inverse)
        return src[index]  # [M, ...]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros((1, *grad.shape[1:]))])  # [M + 1, ...]: row M is "no copy"
        return padded[inverse].sum(1, dtype=torch.float32).to(grad.dtype), None, None  # [len(src), ...]


def _dense_small_block_mlp(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor | None,
                           w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """expert_mlp for decode-sized blocks (inference only): every expert on every token in two
    batched GEMMs, then each token takes its k experts' rows. At this size the GEMMs are bound by
    reading the weights, which happens once either way; there is no sort, no scatter and no split
    size travelling to the host, so a decode step is a handful of kernels and a CUDA graph captures it.
    x [N, d] -> y [N, d] float32."""
    hidden = torch.matmul(x, w_in)  # [E, N, 2F]
    out = torch.matmul(gated_gelu(hidden), w_out)  # [E, N, d]
    rows = torch.arange(x.shape[0], device=x.device)[:, None]  # [N, 1]
    gate = weights if keep is None else weights * keep  # [N, k]: a refused assignment adds nothing
    return (out[indices, rows].float() * gate[..., None]).sum(dim=1)  # [N, k, d] -> [N, d]


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """Switch loss E * sum_e f_e * P_e. probs [N, E]; counts [E] assignments per expert (before
    capacity) out of `num_assignments` (N*k), those of the whole batch when it is split over ranks
    (f is then the batch's, P this rank's mean, and the mean over ranks is the batch's loss) -> scalar."""
    f = counts.float() / num_assignments  # [E] fraction of the assignments
    p = probs.float().mean(dim=0)  # [E] mean router probability
    return probs.shape[-1] * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(r)^2. logits [N, E] (before noise) -> scalar."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()

"""Expert parallelism: N ranks train one model, each with its own share of the global batch and
E/P of every layer's experts (docs/architecture.md, "Parallel layouts").

The ranks form N/P expert-parallel groups of P consecutive ranks; each group holds every expert
once (rank r holds experts [(r % P) * E/P, (r % P + 1) * E/P)), and the N/P ranks holding the same
experts (r, r + P, r + 2P, ...) are that shard's data-parallel replicas. This is DeepSpeed's
layout (`deepspeed.utils.groups`, expert-parallel groups of consecutive ranks) and blues_jax's mesh
`data=N/P,expert=P` (devices data-major). Tokens are in rank order: rank r holds rows
[r * B, (r + 1) * B) of the global batch (blues.data.BatchIterator).

- `build_layout(P)` makes the process groups (DeepSpeed's own under DeepSpeed), `parallelize`
  cuts a model's experts down to the rank's slice and tells its MoE layers the layout;
- in the forward, each MoE layer routes its own tokens, all-gathers the [k, E] per-choice counts
  (so the capacity rule and the load-balancing loss see the whole global batch) and exchanges the
  sorted rows with its experts' ranks (`ExpertExchange`, all_to_all_single both ways, with autograd;
  its split sizes are every rank's kept counts, `kept_counts` of the gathered counts, so no
  collective exchanges them);
- `reduce_gradients` / `clip_grad_norm_` are the gradient rules of a plain PyTorch step, and
  `tag_expert_params` / `optimizer_param_groups` what DeepSpeed's MoE optimizer split needs;
- `gather_experts` / `slice_experts` turn a rank's tensors (weights, optimizer moments: any dict
  by layout path) into canonical full tensors and back, so checkpoints are layout-free.

With one rank and P = 1 nothing here runs: `parallelize` leaves the model as it is. DeepSpeed is
imported only where a layout is DeepSpeed's: it is an optional dependency.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from blues.errors import UsageError
from blues_torch.experts import kept_counts

EXPERT_TENSORS = ("moe.w_in", "moe.w_out")  # the layout rows whose axis 0 is the expert axis


def is_expert_tensor(name: str) -> bool:
    """Whether a layout path / canonical name (e.g. "layers.0.moe.w_in") is split over experts."""
    return name.endswith(EXPERT_TENSORS)



# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there); older
# releases (the GPU image's 2.11) have only all_gather_into_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable split sizes; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad, recv_splits, send_splits, ctx.group), None, None, None


class _PermuteRows(torch.autograd.Function):
    """x[perm] for a permutation `perm` with inverse `inverse`; its backward is grad[inverse], a
    gather (autograd's own backward of x[perm] is an accumulating index_put, which sorts)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class HostValues:
    """A small device tensor's values, on their way to the host while the CPU goes on queueing work.

    On CUDA the copy into pinned memory is queued (non_blocking) behind the kernels that compute
    the tensor, with an event after it; `tolist()` waits on that event only. The kernels queued
    between the two keep the GPU busy while the CPU waits, where an immediate `.tolist()` would
    drain the whole launch queue and leave the GPU idle until the CPU has launched the next
    kernels. On the CPU the values are already there.
    """

    def __init__(self, values: torch.Tensor):
        self._event = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            values = host
        self._values = values

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._values.tolist()


@dataclass(frozen=True)
class ExpertExchange:
    """Moves one MoE layer's expert-sorted rows to the ranks that hold their experts and the
    results back; built by `plan` from every rank's kept counts before the rows are sorted."""

    group: dist.ProcessGroup  # the P ranks that together hold every expert
    size: int  # P
    recv: torch.Tensor  # [P, E/P] rows this rank receives from each rank of its group, per local expert
    splits: HostValues  # [2, P]: rows sent to and received from each rank of the group

    @classmethod
    def plan(cls, kept: torch.Tensor, group: dist.ProcessGroup, size: int, rank: int) -> ExpertExchange:
        """kept [N, E]: every rank's kept assignments per expert, in rank order (`kept_counts`);
        rank: this rank's index there. Its group is ranks [rank - rank % P, ... + P), and group
        rank q holds experts [q * E/P, (q + 1) * E/P). The split sizes start for the host here."""
        first, me = rank - rank % size, rank % size
        send = kept[rank].view(size, -1).sum(dim=1)  # [P] rows for each rank of the group
        recv = kept[first:first + size].view(size, size, -1)[:, me]  # [P, E/P] rows from each source, per my expert
        return cls(group, size, recv, HostValues(torch.stack([send, recv.sum(dim=1)])))

    def __call__(self, xs: torch.Tensor, experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """xs [M, d] this rank's rows sorted by expert; `experts(rows, local_counts)` computes this
        rank's E/P experts on rows sorted by local expert. -> [M, d] each row's expert output, in xs's order."""
        send_splits, recv_splits = self.splits.tolist()  # the layer's one host sync, its sort and gathers queued
        rows = _AllToAll.apply(xs, send_splits, recv_splits, self.group)  # [R, d] in (source, expert) order
        local_counts = self.recv.sum(dim=0)  # [E/P]
        if self.size == 1:  # one source: (source, expert) order is expert order
            out = experts(rows, local_counts)  # [R, d]
        else:
            local_expert = torch.arange(self.recv.shape[1], device=xs.device).repeat(self.size)  # [P * E/P]
            blocks = local_expert.repeat_interleave(self.recv.reshape(-1), output_size=rows.shape[0])  # [R]
            order = torch.argsort(blocks, stable=True)  # [R]: (source, expert) row of each (expert, source) row
            inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=xs.device))  # [R]
            # Within an expert, rows stay in (source rank, source row) order: the global token order,
            # so each expert sees its rows in the order one process holding the whole batch would.
            out = experts(_PermuteRows.apply(rows, order, inverse), local_counts)  # [R, d]
            out = _PermuteRows.apply(out, inverse, order)  # back to (source, expert) order
        return _AllToAll.apply(out, recv_splits, send_splits, self.group)  # [M, d]


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits when `world_size` ranks train one model with experts split P ways."""

    world_size: int  # N: ranks, each with its own rows of the global batch
    rank: int
    expert_parallel: int  # P
    batch_group: dist.ProcessGroup | None  # all N ranks (None when N == 1): capacity and load balancing
    expert_group: dist.ProcessGroup | None  # the P ranks holding every expert once (None when P == 1)
    expert_data_group: dist.ProcessGroup | None  # the N/P ranks holding this rank's experts
    group_name: str  # DeepSpeed's name of the expert groups ("ep_size_P")
    deepspeed: bool = False

    @property
    def expert_rank(self) -> int:
        return self.rank % self.expert_parallel

    def local_experts(self, num_experts: int) -> slice:
        """The experts this rank holds, as a slice of the canonical expert axis."""
        per_rank = num_experts // self.expert_parallel
        return slice(self.expert_rank * per_rank, (self.expert_rank + 1) * per_rank)

    def exchange(self, shard_counts: torch.Tensor, capacity: int | None) -> ExpertExchange | None:
        """One layer's exchange, from every rank's [k, E] choice counts [N, k, E] (`gather_choice_counts`)
        and the experts' capacity (None: dropless); None when this rank holds every expert."""
        if self.expert_group is None:
            return None
        kept = kept_counts(shard_counts, capacity)  # [N, E]
        return ExpertExchange.plan(kept, self.expert_group, self.expert_parallel, self.rank)

    def gather_choice_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Every rank's [k, E] choice counts, in rank order: [N, k, E]."""
        out = counts.new_empty((self.world_size * counts.shape[0], counts.shape[1]))  # gathered along axis 0
        _all_gather_single(out, counts.contiguous(), group=self.batch_group)
        return out.view(self.world_size, *counts.shape)


def check_layout(world_size: int, expert_parallel: int, num_experts: int) -> None:
    """One-line usage errors for an expert-parallel size that cannot work (before anything is written)."""
    if expert_parallel < 1:
        raise UsageError(f"--expert_parallel must be a positive integer, got {expert_parallel}")
    if world_size % expert_parallel:
        raise UsageError(f"--expert_parallel {expert_parallel} does not divide the world size {world_size}; "
                         f"use a divisor of {world_size}")
    if num_experts % expert_parallel:
        raise UsageError(f"--expert_parallel {expert_parallel} does not divide tot_num_experts ({num_experts}); "
                         f"use a divisor of {num_experts}")


def build_layout(expert_parallel: int, num_experts: int, *, deepspeed: bool = False) -> ParallelLayout:
    """This rank's layout over the initialised default process group (one rank without one).

    Every rank must call it, in the same order as its other group creations. Under DeepSpeed the
    groups are DeepSpeed's own (`deepspeed.utils.groups`), so its engine and ZeRO optimizer reduce
    the tagged expert parameters over the same expert-data-parallel groups; otherwise
    `torch.distributed.new_group`.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    check_layout(world_size, expert_parallel, num_experts)
    p = expert_parallel
    name = f"ep_size_{p}"
    if world_size == 1:
        return ParallelLayout(1, 0, 1, None, None, None, name, deepspeed)
    if deepspeed:
        from deepspeed.utils import groups

        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(p)
        batch_group = groups._get_data_parallel_group()
        expert_group = groups._get_expert_parallel_group(name)
        expert_data_group = groups._get_expert_data_parallel_group(name)
    else:
        batch_group = dist.group.WORLD
        expert_group = expert_data_group = None
        for start in range(0, world_size, p):  # consecutive ranks share out the experts
            group = dist.new_group(list(range(start, start + p)))
            if start <= rank < start + p:
                expert_group = group
        for first in range(p):  # ranks first, first + P, ... hold the same experts
            group = dist.new_group(list(range(first, world_size, p)))
            if rank % p == first:
                expert_data_group = group
    return ParallelLayout(world_size, rank, p, batch_group, expert_group if p > 1 else None, expert_data_group,
                          name, deepspeed)


# ---- the model ------------------------------------------------------------------------------------

def moe_layers(model) -> list:
    return [layer.moe for layer in model.layers]


@torch.no_grad()
def parallelize(model, layout: ParallelLayout):
    """Cut every MoE layer's w_in / w_out down to this rank's experts and give the layers the layout
    (in place; returns the model). The model must hold all E experts (e.g. freshly built with the
    same seed on every rank, or loaded from a canonical checkpoint). With one rank: unchanged."""
    if layout.world_size == 1:
        return model
    experts = layout.local_experts(model.config.tot_num_experts)
    for moe in moe_layers(model):
        if layout.expert_group is not None:
            moe.w_in = torch.nn.Parameter(moe.w_in[experts].clone())  # [E/P, d, 2F]
            moe.w_out = torch.nn.Parameter(moe.w_out[experts].clone())  # [E/P, F, d]
        moe.layout = layout
    if layout.deepspeed and layout.expert_group is not None:
        tag_expert_params(model, layout)
    return model


def expert_params(model) -> list[torch.nn.Parameter]:
    return [p for moe in moe_layers(model) for p in (moe.w_in, moe.w_out)]


def replicated_params(model) -> list[torch.nn.Parameter]:
    experts = {id(p) for p in expert_params(model)}
    return [p for p in model.parameters() if id(p) not in experts]


def tag_expert_params(model, layout: ParallelLayout) -> None:
    """Mark the expert parameters as DeepSpeed's MoE code expects (deepspeed/moe/utils.py: an
    expert parameter has `allreduce = False` and `group_name`, the name of its expert groups)."""
    for p in expert_params(model):
        p.allreduce = False
        p.group_name = layout.group_name


def optimizer_param_groups(param_groups: list[dict], layout: ParallelLayout) -> list[dict]:
    """The optimizer's param groups with the expert parameters in groups of their own where
    DeepSpeed needs that (its ZeRO optimizer partitions those over the expert-data-parallel group):
    `deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer`. Plain PyTorch's
    AdamW is per parameter, so the groups stay as they are."""
    if not (layout.deepspeed and layout.expert_group is not None):
        return param_groups
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    named = [{"name": f"group{i}", **group} for i, group in enumerate(param_groups)]
    return split_params_into_different_moe_groups_for_optimizer(named)


# ---- gradients (plain PyTorch; DeepSpeed's engine does the same for tagged parameters) -------------

@torch.no_grad()
def reduce_gradients(model, layout: ParallelLayout) -> None:
    """Turn each rank's gradients of its own loss into those of the mean loss over all N ranks.

    A replicated parameter's gradient is averaged over all N ranks. An expert's gradient on its
    rank already sums the contributions of the P ranks of its expert group (their tokens came
    to it by all-to-all), so it is summed over the N/P ranks holding it and divided by N, not N/P
    (DeepSpeed's engine divides expert gradients by the data-parallel world size likewise).
    """
    if layout.world_size == 1:
        return
    if layout.expert_group is None:  # every rank holds every expert: all replicated
        _all_reduce_mean(list(model.parameters()), layout.batch_group, layout.world_size)
    else:
        _all_reduce_mean(replicated_params(model), layout.batch_group, layout.world_size)
        _all_reduce_mean(expert_params(model), layout.expert_data_group, layout.world_size)


def _all_reduce_mean(params: list[torch.nn.Parameter], group, divisor: int) -> None:
    """Sum the parameters' gradients over `group` (one flat all-reduce) and divide by `divisor`."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    flat /= divisor
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


@torch.no_grad()
def clip_grad_norm_(model, layout: ParallelLayout, max_norm: float) -> torch.Tensor:
    """Clip by the norm of the whole model's gradient (every expert counted once: the expert part is
    summed over the expert group); call after `reduce_gradients`. Returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if layout.expert_group is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    experts = {id(p) for p in expert_params(model)}
    replicated = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in experts])
    local = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in experts])
    expert_sq = local.square()
    dist.all_reduce(expert_sq, group=layout.expert_group)
    total = (replicated.square() + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ---- layout-free tensors --------------------------------------------------------------------------

def gather_experts(tensors: Mapping[str, torch.Tensor], layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """A rank's tensors by layout path (a state_dict, optimizer moments) -> the same with every
    expert tensor gathered over the expert group into its canonical [E, ...] form. Collective: every
    rank of the expert group calls it with the same names in the same order."""
    if layout.expert_group is None:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        if is_expert_tensor(name):
            full = t.new_empty((t.shape[0] * layout.expert_parallel, *t.shape[1:]))
            _all_gather_single(full, t.contiguous(), group=layout.expert_group)
            t = full
        out[name] = t
    return out


def slice_experts(tensors: Mapping[str, torch.Tensor], layout: ParallelLayout) -> dict[str, torch.Tensor]:
    """Canonical tensors by layout path -> this rank's: every expert tensor cut to its experts."""
    if layout.expert_group is None:
        return dict(tensors)
    out = {}
    for name, t in tensors.items():
        if is_expert_tensor(name):
            t = t[layout.local_experts(t.shape[0])]
        out[name] = t
    return out


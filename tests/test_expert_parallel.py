"""PyTorch expert parallelism (blues_torch/expert_parallel.py) against one process and against JAX.

One `torchrun --nproc_per_node 4` launch per mode (dropless, capacity) runs parity/layouts.py over a
gloo process group in three layouts of the same 4 ranks: --expert_parallel 1 (pure data parallelism:
the capacity rule and the load-balancing loss still see the whole global batch), 2 (two replicas of
two expert shards) and 4 (every rank two of the eight experts). Each rank holds 2 of the global
batch's 8 rows. The reference is the same code with one process holding the whole batch, and
blues_jax on one device.

Tolerances: a layout changes only the order of float32 sums (the replicated gradients' all-reduce,
the aux loss's mean over ranks), so logits agree to 1e-5 absolute on O(1) values and gradients to
1e-5 relative per tensor (tests/test_parity.py's bounds between the frameworks); routing, drop
counts and expert counts are integers and must be identical; 20 AdamW steps' losses 1e-6 relative.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from blues.config import BluesConfig
from blues.errors import UsageError
from blues_torch.expert_parallel import ParallelLayout, build_layout, check_layout
from blues_torch.experts import capacity_keep, choice_counts, expert_counts, kept_counts
from blues_torch.model import MoE
from oracle import random_canonical
from parity import layouts, suite
from parity.convert import from_canonical

jax.config.update("jax_default_matmul_precision", "highest")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
WORLD, LAYOUTS, STEPS, GLOBAL_BATCH, SEQ = 4, (1, 2, 4), 20, 8, 16
# At 1e-3 the 20 steps keep every routing decision clear of ties; at 1e-2 one near-tied token of
# the dropless case flips its experts at step 19 (the layouts' float32 sums round differently),
# and from there the runs are two different trainings (5e-3 apart), not a broken layout.
LR = 1e-3
BASE = dict(vocab_size=256, max_position_embeddings=SEQ, num_layers=2, hidden_size=32, head_dim=8,
            num_attention_heads=4, num_key_value_heads=2, tot_num_experts=8, chosen_num_experts=2,
            embedding_multiplier_scale=2, router_noise_std=0.0, dropout=0.0)
MODES = {"dropless": {}, "capacity": dict(capacity_factor=0.5)}
LOGIT_ATOL, GRAD_RTOL, LOSS_RTOL = 1e-5, 1e-5, 1e-6


def _case(mode: str):
    cfg = BluesConfig(**(BASE | MODES[mode]))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, cfg.vocab_size, (STEPS, GLOBAL_BATCH, SEQ))
    targets = rng.integers(0, cfg.vocab_size, (STEPS, GLOBAL_BATCH, SEQ))
    return cfg, random_canonical(cfg, seed=3), ids, targets


@pytest.fixture(scope="module", params=list(MODES))
def results(request, tmp_path_factory):
    mode = request.param
    cfg, arrays, ids, targets = _case(mode)
    case_dir = tmp_path_factory.mktemp(f"layouts_{mode}")
    layouts.write_case(case_dir, cfg, arrays, ids, targets, list(LAYOUTS), LR)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(WORLD), "-m", "parity.layouts", str(case_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    reference = layouts.run(cfg, arrays, ids, targets, build_layout(1, cfg.tot_num_experts), lr=LR)
    jax_out, jax_grads, _ = suite.jax_grads(from_canonical(arrays, cfg, "jax"), ids[0], targets[0])
    ranks = {p: layouts.load_rank_results(case_dir, p, WORLD) for p in LAYOUTS}
    return mode, cfg, reference, jax_out, jax_grads, ranks


def _rows(ranks, key, axis=0):
    return np.concatenate([r[key] for r in ranks], axis=axis)


@pytest.mark.parametrize("p", LAYOUTS)
def test_forward_and_routing(results, p):
    mode, cfg, ref, jax_out, _, ranks = results
    ranks = ranks[p]
    logits = _rows(ranks, "logits")  # [global batch, T, V]
    assert np.max(np.abs(logits - ref["logits"])) <= LOGIT_ATOL
    assert np.max(np.abs(logits - jax_out.logits)) <= LOGIT_ATOL
    indices = _rows(ranks, "indices", axis=1)  # [L, global batch, T, k]
    assert np.array_equal(indices, ref["indices"]) and np.array_equal(indices, jax_out.expert_indices)
    for r in ranks:  # the batch's counts and drops, the same on every rank
        assert np.array_equal(r["counts"], ref["counts"]) and np.array_equal(r["dropped"], ref["dropped"])
    assert np.array_equal(ref["dropped"], jax_out.dropped)
    if mode == "capacity":
        assert ref["dropped"].min() > 0  # the rule was exercised
        # Per rank, the capacity rule would have refused different assignments: the global rule matters.
        local = [capacity_keep(torch.as_tensor(i), cfg.tot_num_experts, cfg.expert_capacity(i.shape[0]))
                 for i in ref["indices"][0].reshape(WORLD, -1, cfg.chosen_num_experts)]
        assert sum(int((~k).sum()) for k in local) != int(ref["dropped"][0])


@pytest.mark.parametrize("p", LAYOUTS)
def test_gradients(results, p):
    """Replicated parameters after the all-reduce, each expert on the rank that holds it."""
    _, cfg, ref, _, jax_grads, ranks = results
    per_rank = cfg.tot_num_experts // p
    for name in (n[len("grad."):] for n in ref if n.startswith("grad.")):
        g_ref = ref[f"grad.{name}"]
        g_jax = jax_grads[name]
        for rank, r in enumerate(ranks[p]):
            g = r[f"grad.{name}"]
            if name.endswith(("moe.w_in", "moe.w_out")):
                shard = slice((rank % p) * per_rank, (rank % p + 1) * per_rank)
                g_ref_part, g_jax_part = g_ref[shard], g_jax[shard]
            else:
                g_ref_part, g_jax_part = g_ref, g_jax
            assert g.shape == g_ref_part.shape, name
            assert np.linalg.norm(g - g_ref_part) <= GRAD_RTOL * np.linalg.norm(g_ref_part), (name, rank)
            assert np.linalg.norm(g - g_jax_part) <= GRAD_RTOL * np.linalg.norm(g_jax_part), (name, rank)


@pytest.mark.parametrize("p", LAYOUTS)
def test_twenty_adamw_steps(results, p):
    _, cfg, ref, _, _, ranks = results
    for r in ranks[p]:
        assert np.all(np.abs(r["losses"] - ref["losses"]) <= LOSS_RTOL * np.abs(ref["losses"])), \
            np.max(np.abs(r["losses"] - ref["losses"]) / np.abs(ref["losses"]))
        assert bool(r["slices_round_trip"])
        # gather_experts gives every rank the canonical full tensors
        assert r["final.layers.0.moe.w_in"].shape == ref["final.layers.0.moe.w_in"].shape
        np.testing.assert_array_equal(r["final.layers.0.moe.w_in"], ranks[p][0]["final.layers.0.moe.w_in"])


def test_capacity_split_over_shards_equals_whole_batch():
    """capacity_keep on each rank's rows with every rank's counts is the whole batch's keep."""
    rng = np.random.default_rng(0)
    e, k, n, shards = 4, 2, 24, 3
    indices = torch.as_tensor(np.argsort(rng.random((n, e)), axis=1)[:, :k])  # distinct experts per token
    whole = capacity_keep(indices, e, 5)
    parts = indices.view(shards, n // shards, k)
    counts = torch.stack([choice_counts(part, e) for part in parts])  # [S, k, E]
    split = torch.cat([capacity_keep(part, e, 5, counts, s) for s, part in enumerate(parts)])
    assert torch.equal(split, whole) and not whole.all()


def _shard_major_kept_counts(shard_counts, capacity):
    """A planted bug for the check below: the lower ranks' assignments, all choices, before this
    rank's (token-major priority, not capacity_keep's choice-major one)."""
    if capacity is None:
        return kept_counts(shard_counts, None)
    per_rank = shard_counts.sum(dim=1)  # [S, E]
    start = (per_rank.cumsum(dim=0) - per_rank)[:, None] + (shard_counts.cumsum(dim=1) - shard_counts)  # [S, k, E]
    return torch.minimum((capacity - start).clamp(min=0), shard_counts).sum(dim=1)


def _kept_counts_match(rule, seed: int) -> bool:
    """Whether rule(shard_counts, capacity)[s] is the per-expert count of capacity_keep's kept
    assignments of rank s, on random batches split over 1-4 ranks, at capacities from 1 (most
    assignments refused) to beyond every expert's load (none refused), and dropless."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        e, k = int(rng.integers(2, 9)), int(rng.integers(1, 3))
        shards, rows = int(rng.integers(1, 5)), int(rng.integers(1, 12))
        skew = rng.random(e) ** 3  # unbalanced experts, so some overflow while others have room
        scores = rng.random((shards * rows, e)) * skew
        indices = torch.as_tensor(np.argsort(-scores, axis=1)[:, :k].copy())  # distinct experts per token
        parts = indices.view(shards, rows, k)
        counts = torch.stack([choice_counts(part, e) for part in parts])  # [S, k, E]
        for capacity in (None, 1, int(rng.integers(1, shards * rows * k + 1)), shards * rows * k):
            kept = rule(counts, capacity)  # [S, E]
            for s, part in enumerate(parts):
                keep = torch.ones_like(part, dtype=torch.bool) if capacity is None else \
                    capacity_keep(part, e, capacity, counts, s)
                if not torch.equal(kept[s], expert_counts(part[keep], e)):
                    return False
    return True


def test_kept_counts_are_capacity_keeps_per_rank_counts():
    """ExpertExchange's split sizes come from kept_counts: each rank's row must be exactly what its
    capacity_keep admits; the choice-major priority matters (the planted rank-major rule fails)."""
    assert _kept_counts_match(kept_counts, seed=0)
    assert not _kept_counts_match(_shard_major_kept_counts, seed=0)


@pytest.fixture
def one_rank_group(tmp_path):
    """The default process group as one gloo rank, for the expert-parallel path forced on at P = 1.
    An earlier test in this process may have left one (the bench's in-process DeepSpeed engine
    initialises a one-rank group and keeps it): that one serves, and stays."""
    owned = not torch.distributed.is_initialized()
    if owned:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.get_world_size() == 1
    try:
        world = torch.distributed.group.WORLD
        yield ParallelLayout(world_size=1, rank=0, expert_parallel=1, batch_group=world, expert_group=world,
                             expert_data_group=world, group_name="ep_size_1")
    finally:
        if owned:
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", list(MODES))
def test_one_rank_exchange_is_the_plain_layer(one_rank_group, mode):
    """An MoE layer through ExpertExchange on a one-rank group (its P = 1 path, scripts/ep_overhead.py's
    measurement) computes bit for bit what the layer computes alone, forward and backward: the
    exchange only moves rows, and its split sizes are the layer's own kept counts."""
    cfg = BluesConfig(**(BASE | MODES[mode]))
    torch.manual_seed(0)
    moe = MoE(cfg)
    for w in moe.parameters():
        torch.nn.init.normal_(w, std=0.5)
    x = torch.randn(2, SEQ, cfg.hidden_size)
    results = []
    for layout in (None, one_rank_group):
        moe.layout = layout
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        y, stats = moe(xg)
        (y.square().sum() + stats.aux_loss).backward()
        results.append((y, stats.dropped, xg.grad, *(w.grad for w in moe.parameters())))
    if mode == "capacity":
        assert results[0][1] > 0  # the capacity rule refused assignments
    for plain, exchanged in zip(*results):
        assert torch.equal(plain, exchanged)


@pytest.mark.parametrize("world, p, experts, message", [
    (4, 3, 8, "--expert_parallel 3 does not divide the world size 4"),
    (4, 4, 6, "--expert_parallel 4 does not divide tot_num_experts (6)"),
    (4, 0, 8, "--expert_parallel must be a positive integer"),
])
def test_bad_layouts_are_usage_errors(world, p, experts, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_layout(world, p, experts)

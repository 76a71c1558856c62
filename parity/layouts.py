"""Parity in parallel layouts: PyTorch with the batch and the experts split over ranks computes what
one process computes on the whole global batch (and so what JAX computes).

    python -m torch.distributed.run --nproc_per_node N -m parity.layouts CASE_DIR

is the worker: CASE_DIR/case.npz holds canonical weights, batches and settings (`write_case`); every
rank runs each expert-parallel size of the case (`--expert_parallel` values dividing N) over a gloo
process group and writes CASE_DIR/ep<P>_rank<R>.npz. `run` is the one function both sides execute
(the single-process reference with the one-rank layout), so they differ only in the layout:

- an eval-mode forward of the first batch: this rank's logits and routing, the batch's drop count;
- the gradient of the first batch's loss after `reduce_gradients` (the mean loss over all ranks);
- `steps` AdamW steps (betas 0.9/0.95, eps 1e-8, weight decay on matrices, gradients clipped at
  norm 1 with the layout's global norm): the mean over ranks of each step's loss, and the final
  weights gathered into canonical full tensors (`gather_experts`).

`load_rank_results` reads the ranks' files back into whole-batch arrays.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from blues.adamw import BETAS, EPS
from blues.config import BluesConfig
from blues.layout import canonical_layout
from blues_torch.expert_parallel import (ParallelLayout, build_layout, clip_grad_norm_, gather_experts, parallelize,
                                         reduce_gradients, slice_experts)
from parity.convert import from_canonical

GRAD_CLIP = 1.0


def run(cfg: BluesConfig, arrays: dict[str, np.ndarray], ids: np.ndarray, targets: np.ndarray, layout: ParallelLayout,
        *, lr: float, weight_decay: float = 0.1) -> dict[str, np.ndarray]:
    """ids / targets [steps, global batch, T]; this rank takes rows [rank * B, (rank + 1) * B)."""
    b = ids.shape[1] // layout.world_size
    rows = slice(layout.rank * b, (layout.rank + 1) * b)
    x = torch.as_tensor(ids[:, rows], dtype=torch.int64)  # [steps, B, T]
    y = torch.as_tensor(targets[:, rows], dtype=torch.int64)
    model = parallelize(from_canonical(arrays, cfg, "torch"), layout)
    out: dict[str, np.ndarray] = {}

    model.eval()
    fwd = model(x[0], y[0])
    out |= {"logits": fwd.logits.detach().numpy(), "indices": fwd.expert_indices.numpy(),
            "dropped": fwd.dropped.numpy(), "counts": fwd.expert_counts.numpy()}
    fwd.loss.backward()
    reduce_gradients(model, layout)
    out |= {f"grad.{spec.name}": model.get_parameter(spec.path).grad[:spec.shape[0]].numpy().copy()
            for spec in canonical_layout(cfg)}  # canonical names; expert tensors: this rank's experts
    model.zero_grad(set_to_none=True)

    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=BETAS, eps=EPS)
    losses = []
    for step in range(x.shape[0]):
        loss = model(x[step], y[step]).loss
        loss.backward()
        reduce_gradients(model, layout)
        clip_grad_norm_(model, layout, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    losses = torch.stack(losses)  # [steps] this rank's losses; their mean over ranks is the batch's
    if layout.world_size > 1:
        dist.all_reduce(losses, group=layout.batch_group)
        losses /= layout.world_size
    out["losses"] = losses.numpy()
    state = {name: p.detach() for name, p in model.named_parameters()}
    full = gather_experts(state, layout)
    # Layout-free: cutting the gathered tensors again gives this rank's own, bit for bit.
    out["slices_round_trip"] = np.array(all(torch.equal(a, state[n]) for n, a in slice_experts(full, layout).items()))
    out |= {f"final.{name}": t.numpy() for name, t in full.items()}
    return out


# ---- the case on disk ------------------------------------------------------------------------------

def write_case(case_dir: Path, cfg: BluesConfig, arrays: dict[str, np.ndarray], ids: np.ndarray,
               targets: np.ndarray, expert_parallel: list[int], lr: float) -> None:
    case_dir.mkdir(parents=True, exist_ok=True)
    np.savez(case_dir / "case.npz", ids=ids, targets=targets, config=json.dumps(cfg.to_dict()), lr=lr,
             expert_parallel=np.asarray(expert_parallel), **{f"w.{k}": v for k, v in arrays.items()})


def load_rank_results(case_dir: Path, expert_parallel: int, world_size: int) -> list[dict[str, np.ndarray]]:
    results = []
    for rank in range(world_size):
        with np.load(case_dir / f"ep{expert_parallel}_rank{rank}.npz") as f:
            results.append(dict(f))
    return results


def read_case(case: dict[str, np.ndarray]) -> tuple[BluesConfig, dict[str, np.ndarray]]:
    """The config and canonical weights of a loaded case.npz."""
    cfg = BluesConfig.from_dict(json.loads(str(case["config"])))
    return cfg, {spec.name: case[f"w.{spec.name}"] for spec in canonical_layout(cfg)}


def main(argv: list[str]) -> None:
    case_dir = Path(argv[0])
    with np.load(case_dir / "case.npz") as f:
        case = dict(f)
    cfg, arrays = read_case(case)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for p in case["expert_parallel"].tolist():
            layout = build_layout(p, cfg.tot_num_experts)
            result = run(cfg, arrays, case["ids"], case["targets"], layout, lr=float(case["lr"]))
            np.savez(case_dir / f"ep{p}_rank{layout.rank}.npz", **result)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])

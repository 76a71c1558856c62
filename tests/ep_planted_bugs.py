"""Run under `torchrun --standalone --nproc_per_node 2`: parity/layouts.py's training with experts split
2 ways, once with the real gradient rule and once with each planted bug, results per rank in CASE_DIR
(tests/test_ep_gradient_rule.py).

Bugs: "experts_over_holders" divides an expert's summed gradient by the N/P ranks holding it instead
of by N; "replicated_not_averaged" skips the all-reduce of the replicated parameters.
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from blues_torch import expert_parallel as ep
from parity import layouts


def experts_over_holders(model, layout):
    ep._all_reduce_mean(ep.replicated_params(model), layout.batch_group, layout.world_size)
    ep._all_reduce_mean(ep.expert_params(model), layout.expert_data_group,
                        layout.world_size // layout.expert_parallel)


def replicated_not_averaged(model, layout):
    ep._all_reduce_mean(ep.expert_params(model), layout.expert_data_group, layout.world_size)


RULES = {"real": ep.reduce_gradients, "experts_over_holders": experts_over_holders,
         "replicated_not_averaged": replicated_not_averaged}


def main(case_dir: Path) -> None:
    with np.load(case_dir / "case.npz") as f:
        case = dict(f)
    cfg, arrays = layouts.read_case(case)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        layout = ep.build_layout(int(case["expert_parallel"][0]), cfg.tot_num_experts)
        for name, rule in RULES.items():
            layouts.reduce_gradients = rule  # the name parity/layouts.run calls
            out = layouts.run(cfg, arrays, case["ids"], case["targets"], layout, lr=float(case["lr"]))
            np.save(case_dir / f"{name}_rank{layout.rank}.npy", out["losses"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))

"""The expert-parallel losses check catches a wrong gradient rule (tests/ep_planted_bugs.py).

`torchrun --standalone --nproc_per_node 2` trains parity/layouts.py's case with the experts split 2
ways, with the real rule (blues_torch/expert_parallel.reduce_gradients) and with two planted bugs:
an expert's gradient divided by the N/P ranks that hold it instead of by N, and the replicated
parameters' average skipped. The check is tests/test_expert_parallel.py's: every step's loss within
1e-6 relative of one process on the whole batch. The real rule passes it (measured 9e-8) and each
bug fails it: the skipped average by 3e-3; the experts' doubled gradient by 8e-6 only, as AdamW is
nearly blind to a gradient's scale (only the whole-model clipping and eps see it).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blues.config import BluesConfig
from blues_torch.expert_parallel import build_layout
from oracle import random_canonical
from parity import layouts

REPO = Path(__file__).resolve().parent.parent
STEPS, GLOBAL_BATCH, SEQ, LR, LOSS_RTOL = 6, 4, 16, 1e-3, 1e-6
CFG = BluesConfig(vocab_size=256, max_position_embeddings=SEQ, num_layers=2, hidden_size=32, head_dim=8,
                  num_attention_heads=4, num_key_value_heads=2, tot_num_experts=4, chosen_num_experts=2,
                  embedding_multiplier_scale=2, router_noise_std=0.0, dropout=0.0)


def losses_match(got: np.ndarray, ref: np.ndarray) -> bool:
    return bool(np.all(np.abs(got - ref) <= LOSS_RTOL * np.abs(ref)))


@pytest.mark.slow
def test_planted_gradient_rule_bugs_fail_the_losses_check(tmp_path):
    rng = np.random.default_rng(1)
    ids, targets = (rng.integers(0, CFG.vocab_size, (STEPS, GLOBAL_BATCH, SEQ)) for _ in range(2))
    arrays = random_canonical(CFG, seed=3)
    layouts.write_case(tmp_path, CFG, arrays, ids, targets, [2], LR)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "ep_planted_bugs.py"), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    ref = layouts.run(CFG, arrays, ids, targets, build_layout(1, CFG.tot_num_experts), lr=LR)["losses"]
    got = {name: np.load(tmp_path / f"{name}_rank0.npy") for name in ("real", "experts_over_holders",
                                                                       "replicated_not_averaged")}
    deviation = {name: float(np.max(np.abs(g - ref) / np.abs(ref))) for name, g in got.items()}
    assert losses_match(got["real"], ref), deviation
    assert not losses_match(got["experts_over_holders"], ref), deviation
    assert not losses_match(got["replicated_not_averaged"], ref), deviation

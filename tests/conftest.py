"""Test-suite wide settings and shared fixtures.

JAX sees 8 CPU devices in every test process, so the mesh tests (data=2, expert=4) can run
without a GPU. This must be set before jax is first imported anywhere.

Disk: the suite writes ~14 GB of checkpoints (a 200,019-token vocabulary makes each tiny model's
checkpoint ~80 MB). A passing test's tmp_path goes when it ends (pyproject: retention "failed"), a
module's tmp_path_factory directories when its last test ends, unless one of its tests failed; so the
suite peaks at its largest module (~4 GB, test_ep_trainer.py) instead of holding every run.
"""
import os
import shutil

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module", autouse=True)
def _module_directories_removed(request, tmp_path_factory):
    """Set up before the module's other fixtures, so torn down after them: removes the directories the
    module made under the base temporary directory, when none of its tests failed."""
    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def deepspeed_one_rank():
    """For DeepSpeed engines built in this process: a process group of one (bench.deepspeed_step's
    init_single_rank, RANK/WORLD_SIZE/MASTER_* set for it), and afterwards the environment and
    DeepSpeedZeroOptimizer's norm/overflow methods and step (which building an engine replaces:
    blues_torch/deepspeed_norms.py, deepspeed_skip.py) as they were. The group itself stays, as in the bench: DeepSpeed
    caches groups made from it."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from bench.deepspeed_step import _free_port, init_single_rank

    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(_free_port())}.items():
            mp.setenv(name, value)
        for name in ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial", "step",
                     "independent_gradient_partition_epilogue"):
            mp.setattr(DeepSpeedZeroOptimizer, name, getattr(DeepSpeedZeroOptimizer, name))
        init_single_rank()
        yield

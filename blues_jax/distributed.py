"""The JAX trainer's processes and device mesh: multi-process start-up, barriers, the mesh, the
compilation cache.

Multi-process / multi-host (one process per host, or per GPU): every process runs the same command
and `jax.distributed.initialize()` is called first, either from the flags

    python train_jax.py --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0 ...   # host 0
    python train_jax.py --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 1 ...   # host 1

or, with none of those flags, from the cluster's environment when the job was launched by SLURM
(`srun`), Open MPI (`mpirun`) or with JAX_COORDINATOR_ADDRESS set (JAX detects the rest). The mesh
then spans the devices of all processes; each process reads its own slice of every global batch;
`--out_dir` must be a shared filesystem. Between CPU processes the collectives go through gloo.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from blues.data import default_cache_dir
from blues.errors import UsageError
from blues.train_args import TrainArgs
from blues_jax.sharding import MeshError, make_mesh


def cluster_launcher() -> str | None:
    """The multi-process launcher this process was started by (None: a plain single-process run)."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    return None


def init_distributed(args: TrainArgs) -> None:
    """jax.distributed.initialize() for a multi-process run; must come before any other JAX call."""
    if args.coordinator is not None or cluster_launcher() is not None:
        # CPU processes exchange data through gloo (GPUs use NCCL whatever this says).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif cluster_launcher() is not None:
        jax.distributed.initialize()  # JAX reads the coordinator, process count and id from the cluster


def enable_compilation_cache() -> None:
    """Keep compiled programs on disk (BLUES_CACHE/xla), so a second run skips most of the compile
    time: every program, not only those that took JAX's default second to compile (the optimizer's
    initialisation, the gathers and conversions: on a GPU each costs a compile of its own).
    JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself, with JAX's settings)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def build_mesh(args: TrainArgs):
    """The ("data", "expert") mesh over every device of every process; a bad --mesh is a usage error."""
    spec = args.mesh or {"data": jax.device_count()}
    try:
        mesh = make_mesh(spec)
    except MeshError as e:
        raise UsageError(f"--mesh: {e}") from None
    experts = args.model_config.tot_num_experts
    if experts % mesh.shape["expert"]:
        raise UsageError(f"--mesh: the expert axis ({mesh.shape['expert']}) must divide tot_num_experts "
                         f"({experts}); use expert=1, or a divisor of {experts}")
    return mesh


def topology(mesh, batch_size: int) -> dict:
    """This process's place: process index and count, data-parallel shards, local devices and rows."""
    topo = {"process": jax.process_index(), "processes": jax.process_count(), "dp": mesh.size,
            "local_devices": jax.local_device_count()}
    topo["local_batch"] = batch_size * topo["local_devices"]  # this process's rows of a global batch
    return topo


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single-process run)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """Process 0's `flag` on every process (itself in a single-process run)."""
    if jax.process_count() > 1:
        return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))
    return flag


def gather_to_host(tree):
    """The whole of a (possibly sharded) tree on every process; collective when several hold shards."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return tree

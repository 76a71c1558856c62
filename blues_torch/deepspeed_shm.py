"""DeepSpeed's CPU all-reduce leaves a shared-memory segment per rank behind: remove its name once
every rank has mapped every segment.

On the CPU accelerator `deepspeed.init_distributed` creates, for each rank, a 66 MB segment named
/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> and opens (maps) every
other rank's, waiting until it exists; it never unlinks its own (DeepSpeed 0.19.8,
ops/csrc/cpu/comm/shm.cpp). Each run left one per rank, and /dev/shm is memory: a day of test runs
left 19 GB in it on a 24 GB machine, and the test suite then ran out of memory. Once every rank
has passed init (a barrier), each rank's name can go; the mapped memory lives on until the ranks exit
and is freed then, even when one is killed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

SHM_DIR = Path("/dev/shm")


def shm_segment(rank: int) -> Path:
    """This run's segment for `rank`, named as DeepSpeed names it from the environment."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment(rank: int, barrier: Callable[[], None]) -> None:
    """Call on every rank right after deepspeed.init_distributed. `barrier()` waits until every rank
    has mapped every segment; before it, a rank still waiting to open this one would wait forever."""
    barrier()
    try:
        shm_segment(rank).unlink()
    except FileNotFoundError:  # not the CPU accelerator: no segment
        pass

"""The PyTorch trainer's parallel context: rank, world size and device: one process, torchrun
(plain torch.distributed: NCCL on GPUs, gloo on CPU) or DeepSpeed.

DeepSpeed is imported only when a run uses it (an optional dependency).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from blues_torch.deepspeed_shm import release_shm_segment


class Dist:
    """Rank/world/device. DeepSpeed initialises torch.distributed itself; under torchrun (WORLD_SIZE > 1
    in the environment) a plain run joins the process group with NCCL on GPUs, gloo on CPU."""

    def __init__(self, deepspeed_enabled: bool):
        self.deepspeed = deepspeed_enabled
        if deepspeed_enabled:
            import deepspeed
            from deepspeed.accelerator import get_accelerator

            deepspeed.init_distributed()
            self.rank, self.world_size = tdist.get_rank(), tdist.get_world_size()
            release_shm_segment(self.rank, self.barrier)
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            acc = get_accelerator()
            if acc.device_name() == "cuda":
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            else:
                self.device = torch.device(acc.device_name())
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            else:
                self.device = torch.device("cpu")
            tdist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world_size = tdist.get_rank(), tdist.get_world_size()
        else:
            self.rank, self.world_size, self.local_rank = 0, 1, 0
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.is_main = self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def broadcast_tensors(self, tensors) -> None:
        """Overwrite each tensor in place with rank 0's values."""
        if self.world_size == 1:
            return
        for t in tensors:
            tdist.broadcast(t, src=0)

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0)
        return out or []

    def mean(self, values):
        """Mean over ranks of a float32 tensor."""
        if self.world_size > 1:
            values = values.clone()
            tdist.all_reduce(values)
            values /= self.world_size
        return values

"""Process runtime in one place: torchrun/DDP or a single plain process, CUDA or CPU.

Every script calls `setup_runtime()` first. Under torchrun it joins the process group
(NCCL on CUDA, gloo on CPU) and takes the device index from LOCAL_RANK, so multi-node
jobs work (the original code used the global rank as the device index). As a plain
`python script.py` it runs one process on CUDA when present, else on the CPU.
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from core.errors import UserError


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def per_rank(self, global_batch):
        """Per-process share of a global batch; refuses batches that do not split evenly."""
        if global_batch % self.world_size:
            raise UserError(f"global batch size {global_batch} is not divisible by the world size "
                            f"{self.world_size}: pick a multiple of {self.world_size}")
        return global_batch // self.world_size

    def all_reduce_mean(self, tensor):
        if self.distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def shutdown(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup_runtime(device=None, tf32=True):
    """Join torchrun's process group if there is one; pick the device; enable TF32 on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but no GPU is visible: use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        dev = torch.device("cpu")
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=dev if use_cuda else None)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, distributed=distributed)


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(global_seed, runtime):
    """The reference convention: seed * world_size + rank."""
    return global_seed * runtime.world_size + runtime.rank

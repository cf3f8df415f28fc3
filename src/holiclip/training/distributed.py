"""torch.distributed set-up from torchrun's environment (gloo on CPU, nccl on GPU)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..io import torchrun_env


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # init_distributed created the process group: cleanup() is ours to call

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    env = torchrun_env()
    if env.world_size <= 1:
        return DistInfo()
    info = DistInfo(env.rank, env.local_rank, env.world_size)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        info.owns_group = True
    return info


def all_reduce_sum(value: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

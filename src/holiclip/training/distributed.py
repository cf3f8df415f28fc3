"""torch.distributed set-up from torchrun's environment (gloo on CPU, nccl on GPU), and the
host-side exchange by which an error on one rank stops every rank with that error."""
from __future__ import annotations

import inspect
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..io import torchrun_env


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # init_distributed created the process group: cleanup() is ours to call
    host_group: Any = None  # a gloo group for CPU tensors (None: the default group, itself gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str, timeout: float = 1800.0) -> DistInfo:
    """The process group of a torchrun launch; ``timeout`` (seconds) bounds every collective, so a
    rank that waits on a dead or stuck one fails instead of hanging (NCCL's own default: 10 min)."""
    env = torchrun_env()
    if env.world_size <= 1:
        return DistInfo()
    info = DistInfo(env.rank, env.local_rank, env.world_size)
    wait = timedelta(seconds=timeout)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
            # bound to its GPU at once: NCCL sets the communicator up eagerly, on the right device
            if "device_id" in inspect.signature(dist.init_process_group).parameters:
                kwargs["device_id"] = torch.device("cuda", info.local_rank)
        dist.init_process_group(backend=backend, timeout=wait, **kwargs)
        info.owns_group = True
    if dist.get_backend() != "gloo":  # flags and counters are host values: exchanged without touching the GPU
        info.host_group = dist.new_group(backend="gloo", timeout=wait)
    return info


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to be raised on another rank), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def exchange(info: DistInfo, values: Sequence[float], error: BaseException | None = None) -> np.ndarray:
    """Every rank's ``values`` as the rows of a (world_size, n) array, in one collective on the host
    (gloo, CPU: no wait on the GPU). ``error``: this rank failed; when any rank did, every rank raises
    the error of the lowest such rank (the message travels; the failing rank raises its own)."""
    row = torch.tensor([1.0 if error is not None else 0.0, *values], dtype=torch.float64)
    if not info.enabled:
        if error is not None:
            raise error
        return row.numpy()[None, 1:]
    rows = [torch.empty_like(row) for _ in range(info.world_size)]
    dist.all_gather(rows, row, group=info.host_group)
    table = torch.stack(rows).numpy()
    if table[:, 0].any():  # gathered, not broadcast: no rank leaves (and tears the group down) before all have it
        errors = all_gather_objects(info, portable(error) if error is not None else None)
        src = int(np.flatnonzero(table[:, 0])[0])
        raise error if info.rank == src else errors[src]
    return table[:, 1:]


def all_gather_objects(info: DistInfo, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; only on the rare steps that need one."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=info.host_group)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Process-group set-up under torchrun: what the trainer creates it also destroys."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import SLOTS


_EACH_RANK = """
import gc, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from holiclip.training.checkpoint import RunFolderError
from holiclip.training.config import load_config
from holiclip.training.trainer import train

destroy = dist.destroy_process_group

def destroy_last(*args, **kwargs):  # DDP's reducer holds the group: freed after the group, gloo can hang
    gc.collect()
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"DDP objects alive at destroy_process_group: {alive}", flush=True)
    return destroy(*args, **kwargs)

dist.destroy_process_group = destroy_last
try:
    train(load_config(None, sys.argv[1:]))
except RunFolderError:  # raised on every rank after the process group was set up
    print("stopped", flush=True)
assert not dist.is_initialized(), "process group left behind"
print("process group destroyed", flush=True)
"""


def test_torchrun_training_destroys_its_process_group(tmp_path):
    data = make_dataset(tmp_path, n=8)
    script = tmp_path / "each_rank.py"
    script.write_text(_EACH_RANK)
    overrides = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=1",
                 "optim.warmup_steps=1", "optim.batch_size=4", "run.progress=false", "run.tensorboard=false",
                 f"run.out={tmp_path}/run", f"run.cache_dir={tmp_path}/cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a run that trains, then one that stops on the folder the first one filled: both clean up
    for stopped in (0, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(script), *overrides]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("stopped") == stopped, proc.stdout[-2000:]
        assert proc.stdout.count("process group destroyed") == 2, proc.stdout[-2000:]
        assert proc.stdout.count("DDP objects alive at destroy_process_group: 0") == 2, proc.stdout[-2000:]


def _init_with(monkeypatch, device: str, backend: str, **env):
    """init_distributed under a torchrun environment, with the process-group calls recorded."""
    import inspect

    import torch
    import torch.distributed as dist

    from holiclip.training.distributed import init_distributed

    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", **env}.items():
        monkeypatch.setenv(name, value)
    calls, groups = {}, []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    fake = lambda **kw: calls.update(kw)  # noqa: E731
    fake.__signature__ = inspect.signature(dist.init_process_group)  # the real one's parameters
    monkeypatch.setattr(dist, "init_process_group", fake)
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(dist, "new_group", lambda **kw: groups.append(kw) or "host group")
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.update(set_device=index))
    info = init_distributed(device, timeout=42)
    return calls, groups, info


def test_process_group_gets_the_configured_timeout_and_its_gpu(monkeypatch):
    from datetime import timedelta

    import torch

    calls, groups, info = _init_with(monkeypatch, "cuda", "nccl")
    assert calls["backend"] == "nccl" and calls["timeout"] == timedelta(seconds=42)
    assert calls["device_id"] == torch.device("cuda", 1) and calls["set_device"] == 1
    # host-side flags and counters travel on a gloo group beside NCCL, with the same timeout
    assert groups == [{"backend": "gloo", "timeout": timedelta(seconds=42)}] and info.host_group == "host group"
    calls, groups, info = _init_with(monkeypatch, "cpu", "gloo")
    assert calls == {"backend": "gloo", "timeout": timedelta(seconds=42)} and not groups and info.host_group is None

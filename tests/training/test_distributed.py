"""Process-group set-up under torchrun: what the trainer creates it also destroys."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import SLOTS


_EACH_RANK = """
import sys
import torch.distributed as dist
from holiclip.training.checkpoint import RunFolderError
from holiclip.training.config import load_config
from holiclip.training.trainer import train

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

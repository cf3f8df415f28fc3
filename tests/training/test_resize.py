"""Resuming on another world size (8 -> 16 GPUs, scaled down to 2 -> 4 gloo ranks): refused by
``--resume latest`` naming both, unless allowed; then each sample of the epoch is trained once;
checkpoints from before the world size was stored still resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.training.checkpoint import CheckpointError, list_checkpoints
from holiclip.training.trainer import train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.shards import write_shards
from tests.helpers.training import SLOTS, cfg_for, weights

# records, per rank, the sample indices of every batch the trainer takes (epoch, indices), then runs the CLI
DRIVER = """
import json, os
from holiclip.training.trainer import Trainer
real = Trainer._batches
def recorded(self):
    path = os.path.join(os.environ["SEEN_DIR"], f"rank{self.dist.rank}.jsonl")
    for batch in real(self):
        with open(path, "a") as fh:
            fh.write(json.dumps([self.epoch, batch["index"].tolist()]) + "\\n")
        yield batch
Trainer._batches = recorded
from holiclip.cli.app import main
main()
"""


def torchrun(tmp_path: Path, ranks: int, args: list[str], seen: Path) -> subprocess.CompletedProcess:
    seen.mkdir(parents=True, exist_ok=True)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEN_DIR": str(seen)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(driver), "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def seen_in(folder: Path) -> Counter:
    counts: Counter = Counter()
    for path in folder.glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            epoch, indices = json.loads(line)
            counts.update((epoch, i) for i in indices)
    return counts


@pytest.mark.parametrize("source", ["manifest", "shards"])
def test_torchrun_resume_on_more_ranks_trains_each_sample_of_the_epoch_once(tmp_path, source):
    """48 samples, batch 4 per rank: 2 ranks train 2 of the epoch's 6 global batches of 8 and stop; on 4
    ranks with --allow-world-size-change the 32 samples left are 2 global batches of 16, then epoch 1
    starts on 4 ranks. (The refusal without the flag is rank-independent: every rank reads the same
    checkpoint and raises before any collective; tested in one process below.)"""
    if source == "manifest":
        data = make_dataset(tmp_path, n=48)
    else:
        write_shards(tmp_path / "shards", [10, 14, 12, 12])
        data = tmp_path / "shards"
    args = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.batch_size=4",
            "optim.steps=5", "optim.warmup_steps=1", "optim.lr=1e-3", f"run.out={tmp_path / 'run'}",
            "run.log_every=1", "run.progress=false", "run.tensorboard=false", "run.save_every=2",
            f"run.cache_dir={tmp_path / 'cache'}"]
    first = torchrun(tmp_path, 2, [*args, "run.max_steps_this_run=2"], tmp_path / "seen-2")
    assert first.returncode == 0, first.stderr[-3000:]
    state = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1], weights_only=True)
    assert (state["world_size"], state["global_batch"], state["batch_in_epoch"]) == (2, 8, 2)
    resumed = torchrun(tmp_path, 4, [*args, "--resume", "latest", "--allow-world-size-change"], tmp_path / "seen-4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming on 4 ranks a run trained on 2") == 1  # said once, by rank 0
    assert "global batch 8 -> 16; the epoch's 32 samples not yet trained" in resumed.stderr
    before, after = seen_in(tmp_path / "seen-2"), seen_in(tmp_path / "seen-4")
    assert sum(before.values()) == 16 and sum(after.values()) == 32 + 16
    epoch0 = before + Counter({k: n for k, n in after.items() if k[0] == 0})
    assert sorted(epoch0) == [(0, i) for i in range(48)] and set(epoch0.values()) == {1}  # each sample once
    assert len([k for k in after if k[0] == 1]) == 16  # one global batch of the next epoch, on 4 ranks
    state = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1], weights_only=True)
    assert (state["step"], state["world_size"], state["global_batch"]) == (5, 4, 16)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """4 of 6 steps on one process, 24 samples in batches of 8: the last checkpoint is mid-epoch 1."""
    root = tmp_path_factory.mktemp("resize")
    make_dataset(root, n=24)
    train(cfg_for(root, root / "train.jsonl", root / "part", "run.max_steps_this_run=4", "run.save_every=4"))
    return root


def copy_of(interrupted: Path, tmp_path: Path, edit=None) -> tuple[Path, Path]:
    """A copy of the interrupted run, its checkpoint's state passed through ``edit``."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    path = list_checkpoints(interrupted / "part" / "checkpoints")[-1]
    state = torch.load(path, weights_only=True)
    if edit is not None:
        edit(state)
    torch.save(state, run / "checkpoints" / path.name)
    return run, run / "checkpoints" / path.name


def claims_two_ranks(state: dict) -> None:
    state["world_size"], state["global_batch"] = 2, 16
    state["data_sampler"]["world_size"] = state["data_sampler"]["split_world_size"] = 2


def test_resume_latest_on_another_world_size_stops_naming_both_unless_allowed(interrupted, tmp_path):
    run, path = copy_of(interrupted, tmp_path, claims_two_ranks)
    args = ["train", f"data.train={interrupted / 'train.jsonl'}", f"data.slots={SLOTS}", "model.name=holi-tiny",
            "optim.batch_size=8", "optim.steps=6", "optim.warmup_steps=2", "optim.lr=1e-3", f"run.out={run}",
            "run.progress=false", "run.tensorboard=false", f"run.cache_dir={interrupted / 'cache'}",
            "--resume", "latest"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} was trained on 2 ranks (global batch 16); "
                                                   "this run has 1 rank (global batch 8")
    assert "--allow-world-size-change" in lines[0]
    with pytest.raises(CheckpointError, match="trained on 2 ranks"):  # from Python too
        train(cfg_for(interrupted, interrupted / "train.jsonl", run), resume="latest")
    result = CliRunner().invoke(app, [*args, "--allow-world-size-change"])
    assert result.exit_code == 0, result.output
    assert "done: step 6" in result.output


def test_checkpoint_from_before_world_sizes_were_stored_resumes_as_on_this_world_size(interrupted, tmp_path, caplog):
    def older(state):
        for key in ("world_size", "global_batch", "data_sampler"):
            del state[key]

    new_run, _ = copy_of(interrupted, tmp_path / "new")
    old_run, _ = copy_of(interrupted, tmp_path / "old", older)
    data = interrupted / "train.jsonl"
    train(cfg_for(interrupted, data, new_run), resume="latest")
    with caplog.at_level("WARNING"):
        assert train(cfg_for(interrupted, data, old_run), resume="latest")["step"] == 6
    assert "does not record the number of ranks it was trained on" in caplog.text
    a, b = weights(new_run), weights(old_run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same continuation

"""Run folders and checkpoints: a new run never mixes with the run already in run.out, a damaged
checkpoint is named (and skipped by --resume latest), metrics.jsonl holds each step once."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.training.checkpoint import CheckpointError, RunFolderError, list_checkpoints
from holiclip.training.config import load_config
from holiclip.training.trainer import read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port


KINDS = ("zero-byte", "truncated", "garbage", "not-a-training-state")


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.train={root / 'train.jsonl'}", "data.slots=[web,detail]", "model.name=holi-tiny", "optim.batch_size=8",
        "optim.steps=6", "optim.warmup_steps=2", "optim.lr=1e-3", f"run.out={out}", "run.log_every=1",
        "run.progress=false", "run.tensorboard=false", "run.save_every=3", f"run.cache_dir={root / 'cache'}", *extra,
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An interrupted run: 4 of 6 steps, checkpoints at steps 3 and 4, metrics rows 1-4."""
    root = tmp_path_factory.mktemp("base")
    make_dataset(root, n=16)
    train(load_config(None, overrides(root, root / "part", "run.max_steps_this_run=4")))
    return root


def copy_run(base: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base / "part", run)
    return run


def cfg(base: Path, out: Path, *extra: str):
    return load_config(None, overrides(base, out, *extra))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def damage(path: Path, kind: str) -> None:
    data = path.read_bytes()
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(random.Random(0).randbytes(4096))
    else:  # a readable torch file that is no training state (e.g. bare weights)
        torch.save({"weights": torch.zeros(3)}, path)


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}.pt"


def test_training_into_a_used_run_folder_stops_and_leaves_it_alone(base, tmp_path):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError) as err:
        train(cfg(base, run))
    msg = str(err.value)
    assert str(run) in msg and "step 4" in msg
    assert "--resume latest" in msg and "run.out" in msg and "--overwrite" in msg
    # a checkpoint of another run does not continue into this folder either
    with pytest.raises(RunFolderError, match=re.escape(str(run))):
        train(cfg(base, run), resume=str(ckpt(base / "part", 3)))
    result = CliRunner().invoke(app, ["train", *overrides(base, run)])
    assert result.exit_code == 2 and "already holds a run" in result.output and "Traceback" not in result.output
    assert snapshot(run) == before


def test_overwrite_replaces_the_previous_run(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.old").write_text("old")
    (run / "model").mkdir()
    (run / "model" / "model.safetensors").write_text("old")
    (run / "eval.json").write_text("{}")  # not a training output: stays
    result = train(cfg(base, run, "optim.steps=2", "run.save_every=1"), overwrite=True)
    assert result["step"] == 2
    assert "deleted the previous run's" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001.pt", "step_00000002.pt"]
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    assert not (run / "tensorboard").exists() and (run / "eval.json").exists()
    saved = json.loads((run / "model" / "holiclip_config.json").read_text())
    assert saved["train_config"]["optim"]["steps"] == 2
    # --resume latest now finds the new run (step 2), not the old one (step 4)
    assert train(cfg(base, run, "optim.steps=2"), resume="latest")["step"] == 2


def test_overwrite_refuses_to_delete_what_it_resumes(base, tmp_path):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError, match="--resume latest"):
        train(cfg(base, run), resume="latest", overwrite=True)
    with pytest.raises(RunFolderError, match=re.escape(str(ckpt(run, 3)))):
        train(cfg(base, run), resume=str(ckpt(run, 3)), overwrite=True)
    assert snapshot(run) == before
    help_text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
    assert "--overwrite" in help_text and "metrics.jsonl" in help_text


@pytest.mark.parametrize("kind", KINDS)
def test_resume_latest_skips_a_damaged_checkpoint(base, tmp_path, capsys, kind):
    run = copy_run(base, tmp_path)
    bad = ckpt(run, 4)
    damage(bad, kind)
    first = read_metrics(run)
    result = train(cfg(base, run), resume="latest")
    err = capsys.readouterr().err
    assert str(bad) in err and f"resuming from {ckpt(run, 3)}" in err
    assert result["step"] == 6
    rows = read_metrics(run)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["loss"] == first[3]["loss"]  # step 4 trained again from step 3: the same loss, logged once
    assert not bad.exists() and bad.with_name(bad.name + ".unreadable").exists()  # out of the rotation, kept


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_damaged_checkpoint_is_named(base, tmp_path, kind):
    run = copy_run(base, tmp_path)
    bad = ckpt(run, 4)
    damage(bad, kind)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        train(cfg(base, run), resume=str(bad))
    result = CliRunner().invoke(app, ["train", *overrides(base, run), "--resume", str(bad)])
    assert result.exit_code == 2 and str(bad) in result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert bad.exists()  # an explicit choice is reported, never moved


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(base, tmp_path):
    run = copy_run(base, tmp_path)
    damage(ckpt(run, 3), "zero-byte")
    damage(ckpt(run, 4), "truncated")
    with pytest.raises(CheckpointError) as err:
        train(cfg(base, run), resume="latest")
    assert str(ckpt(run, 3)) in str(err.value) and str(ckpt(run, 4)) in str(err.value)
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


def test_resume_drops_rows_logged_after_the_checkpoint(base, tmp_path):
    run = copy_run(base, tmp_path)
    ckpt(run, 4).unlink()  # killed after logging step 4, before its checkpoint
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 1.2')  # and half-way through writing a row
    assert train(cfg(base, run), resume="latest")["step"] == 6
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


def test_explicit_resume_from_an_older_checkpoint_sets_newer_ones_aside(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    train(cfg(base, run, "run.max_steps_this_run=1"), resume=str(ckpt(run, 3)))
    assert "step_00000004.pt" in capsys.readouterr().err
    # a later --resume latest continues this line (step 4 again), not the abandoned step-4 checkpoint
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000003.pt", "step_00000004.pt"]
    assert ckpt(run, 4).with_name("step_00000004.pt.superseded").exists()
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]


def test_resuming_a_finished_run_reports_its_last_loss(base, tmp_path):
    run = copy_run(base, tmp_path)
    last_logged = read_metrics(run)[-1]["loss"]
    result = train(cfg(base, run, "optim.steps=4"), resume="latest")  # nothing left to train
    assert result["step"] == 4 and result["trained_steps"] == 0
    assert result["last"]["loss"] == last_logged
    out = CliRunner().invoke(app, ["train", *overrides(base, run, "optim.steps=4"), "--resume", "latest"]).output
    assert "already complete" in out and f"{last_logged:.4f}" in out and "nan" not in out


def test_torchrun_ranks_all_stop_on_a_used_run_folder(base, tmp_path):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "holiclip.cli.app", "train", *overrides(base, run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a run") == 2, proc.stderr[-3000:]  # each rank, the same message
    assert snapshot(run) == before


def test_checkpoint_of_another_model_is_named(base, tmp_path):
    run = copy_run(base, tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt(run, 4))) + " does not fit this run's config"):
        train(cfg(base, run, "model.encoder=mlp"), resume=str(ckpt(run, 4)))  # explicit: settings may differ
    with pytest.raises(RunFolderError, match="model.encoder: 'cls' -> 'mlp'"):  # latest: refused before loading
        train(cfg(base, run, "model.encoder=mlp"), resume="latest")


def test_resume_latest_with_other_training_settings_stops_and_names_them(base, tmp_path, capsys):
    run = copy_run(base, tmp_path)
    before = snapshot(run)
    with pytest.raises(RunFolderError) as err:
        train(cfg(base, run, "optim.lr=2e-3", "data.augment=false"), resume="latest")
    message = str(err.value)
    assert "optim.lr: 0.001 -> 0.002" in message and "data.augment: True -> False" in message
    assert "--overwrite" in message
    assert snapshot(run) == before
    # settings that do not change what is trained may change
    result = train(cfg(base, run, "run.log_every=2", "run.save_every=5", "data.workers=0"), resume="latest")
    assert result["step"] == 6


def test_explicit_checkpoint_with_other_settings_warns_and_trains(base, tmp_path, capsys):
    start = list_checkpoints(base / "part" / "checkpoints")[-1]
    result = train(cfg(base, tmp_path / "finetune", "optim.lr=2e-3"), resume=str(start))
    assert result["step"] == 6
    assert "optim.lr: 0.001 -> 0.002" in capsys.readouterr().err


def test_saved_config_lacking_a_newer_key_compares_as_its_default(base):
    from holiclip.benchmarks.emoji.demo import _same_run
    from holiclip.training.checkpoint import check_resume_config, config_changes

    current = cfg(base, base / "part").to_dict()
    saved = json.loads(json.dumps(current))  # written before data.max_image_pixels and run.seed existed
    del saved["data"]["max_image_pixels"], saved["run"]["seed"]
    assert config_changes(saved, current) == []
    check_resume_config(base / "part" / "checkpoints" / "step_00000003.pt", saved, current, "latest")
    assert _same_run(saved, current)
    saved["run"]["seed"] = 1  # a key the saved config has still counts
    assert config_changes(saved, current) == ["run.seed: 1 -> 0"] and not _same_run(saved, current)


def test_compiling_or_not_is_no_training_change():
    from holiclip.training.checkpoint import config_changes
    from holiclip.training.config import load_config

    eager = load_config(None, ["data.train=x.jsonl"]).to_dict()
    compiled = load_config(None, ["data.train=x.jsonl", "run.compile=true", "optim.lr=0.1"]).to_dict()
    assert config_changes(eager, compiled) == ["optim.lr: 0.0005 -> 0.1"]


def _killed_during_write(target: Path) -> None:
    """A process killed (SIGKILL) inside atomic_path's block, as a kill -9 during a checkpoint write."""
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom holiclip.io import atomic_path\n"
            "with atomic_path(Path(sys.argv[1])) as tmp:\n    tmp.write_bytes(b'x' * 300_000)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, timeout=60)
    assert res.returncode == -9, res.stderr


def test_resume_removes_partial_checkpoint_writes_and_counts_them(base, tmp_path):
    run = copy_run(base, tmp_path)
    folder = run / "checkpoints"
    _killed_during_write(folder / "step_00000005.pt")
    _killed_during_write(folder / "step_00000006.pt")
    partial = sorted(p.name for p in folder.glob("step_*.pt.*.tmp"))
    assert len(partial) == 2 and all(re.fullmatch(r"step_0000000[56]\.pt\.\d+\.[0-9a-f]{8}\.tmp", p) for p in partial)
    # names of other patterns are not this run's writes: left alone
    others = [folder / "step_00000005.pt.tmp", folder / "notes.1.deadbeef.tmp", run / "step_00000001.pt.1.deadbeef.tmp"]
    for path in others:
        path.write_text("keep")
    result = CliRunner().invoke(app, ["train", *overrides(base, run), "--resume", "latest"])
    assert result.exit_code == 0, result.output
    assert f"removed 2 partial checkpoint writes (0.6 MB) left in {folder} by an interrupted run" in result.output
    assert all(name in result.output for name in partial)
    assert not list(folder.glob("step_*.pt.*.*.tmp")) and all(p.exists() for p in others)
    assert [p.name for p in list_checkpoints(folder)] == ["step_00000004.pt", "step_00000006.pt"]  # keep=2


def test_resumed_checkpoint_is_mapped_and_not_held_while_training(base, tmp_path, monkeypatch):
    """The checkpoint is read with mmap (its tensors paged in as they are copied) and no reference
    to the loaded state survives into the training steps (the model holds copies)."""
    import gc
    import weakref

    from holiclip.training import checkpoint as ckpt_mod
    from holiclip.training.trainer import Trainer

    run = copy_run(base, tmp_path)
    loads, held = [], []
    real_load, real_load_ckpt, real_step = torch.load, ckpt_mod.load_checkpoint, Trainer._train_step

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("mmap"))
        return real_load(*args, **kwargs)

    def recording_load_checkpoint(path):
        state = real_load_ckpt(path)
        held.extend(weakref.ref(t) for t in state["model"].values())
        return state

    def step(self, micro_batches):
        gc.collect()
        assert held and not [r for r in held if r() is not None], "the loaded checkpoint is still referenced"
        return real_step(self, micro_batches)

    monkeypatch.setattr(torch, "load", recording_load)
    monkeypatch.setattr(ckpt_mod, "load_checkpoint", recording_load_checkpoint)
    monkeypatch.setattr(Trainer, "_train_step", step)
    assert train(cfg(base, run), resume="latest")["step"] == 6
    assert loads == [True]

"""The speed the log reports: samples/s per device and the fraction of the step spent waiting for data."""
from __future__ import annotations

import time

import torch

from holiclip.data import loader as loader_mod
from holiclip.training import trainer as trainer_mod
from holiclip.training.trainer import read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.training import cfg_for


def _run(tmp_path, name, *extra):
    data = make_dataset(tmp_path, n=8)
    result = train(cfg_for(tmp_path, data, tmp_path / name, "optim.steps=2", "optim.warmup_steps=1",
                           "optim.batch_size=4", *extra))
    rows = read_metrics(tmp_path / name)
    assert len(rows) == 2
    for row in rows:
        assert row["samples_per_s_per_device"] == row["samples_per_s"] > 0  # one process: one device
    return result, rows


def test_slow_data_shows_as_waiting(tmp_path, monkeypatch, capsys):
    real = loader_mod.Collate.__call__

    def slow(self, items):  # every batch (map-style or streamed) passes through Collate
        time.sleep(0.5)
        return real(self, items)

    def instant_step(self, micro_batches):  # the step's own time, which varies with the machine's load, is ~0
        return {"contrastive_loss": torch.tensor(1.0)}  # the step's loss terms, on the device

    monkeypatch.setattr(loader_mod.Collate, "__call__", slow)
    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", instant_step)
    _, rows = _run(tmp_path, "slow", "run.progress=true")
    for row in rows:
        assert 0.8 < row["data_wait"] <= 1.0, row
        assert row["samples_per_s"] < 4 / 0.5  # at most one batch per 0.5 s of loading
    bar = capsys.readouterr().err
    assert "data_wait=" in bar and "ips_per_device=" in bar


def test_slow_step_shows_as_not_waiting(tmp_path, monkeypatch):
    real = trainer_mod.Trainer._train_step

    def slow(self, micro_batches):
        time.sleep(1.0)
        return real(self, micro_batches)

    monkeypatch.setattr(trainer_mod.Trainer, "_train_step", slow)
    _, rows = _run(tmp_path, "fast", "data.cache_images=true")
    for row in rows:
        assert 0.0 <= row["data_wait"] < 0.2, row
        assert row["samples_per_s"] < 4 / 1.0

"""run.report_to=[wandb]: an offline wandb run holds the metrics and the config; --resume latest goes on in it."""
from __future__ import annotations

import json

import pytest

from holiclip.training.config import ConfigError, load_config, reporters
from holiclip.training.logger import WANDB_ID_FILE
from holiclip.training.trainer import read_metrics, train
from tests.helpers.datasets import make_dataset
from tests.helpers.training import cfg_for

wandb = pytest.importorskip("wandb")  # the dev extra installs it


def _records(path):
    """The protobuf records of a wandb run file: LevelDB's log format (32 KiB blocks, each record piece with a
    7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte file header (":W&B", magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: zero padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _read_run(run_dir) -> tuple[list[dict], dict]:
    """The history rows and the config of an offline wandb run folder."""
    rows, config = [], {}
    for record in _records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return rows, config


def test_wandb_offline_run_holds_metrics_and_config_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    data = make_dataset(tmp_path, n=8)
    out = tmp_path / "run"
    extra = ["run.report_to=[wandb]", "run.name=tiny-wandb", "run.wandb_project=holiclip-tests"]
    train(cfg_for(tmp_path, data, out, *extra, "run.max_steps_this_run=3"))
    run_id = (out / WANDB_ID_FILE).read_text().strip()
    train(cfg_for(tmp_path, data, out, *extra), resume="latest")
    assert (out / WANDB_ID_FILE).read_text().strip() == run_id  # the resumed run went on in the same wandb run

    runs = sorted((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs), runs
    read = [_read_run(r) for r in runs]
    history = [row for rows, _ in read for row in rows]
    logged = {row["_step"]: row for row in history}
    expected = {row["step"]: row for row in read_metrics(out)}
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step, row in expected.items():
        assert logged[step]["loss"] == pytest.approx(row["loss"]) and logged[step]["lr"] == pytest.approx(row["lr"])
    config = read[0][1]
    assert config["optim"]["steps"] == 6 and config["model"]["name"] == "holi-tiny"
    assert config["data"]["train"] == str(data) and config["run"]["report_to"] == ["wandb"]


def test_report_to_defaults_to_run_tensorboard_and_rejects_a_contradiction():
    assert reporters(load_config(None, [])) == ["tensorboard"]
    assert reporters(load_config(None, ["run.tensorboard=false"])) == []
    assert reporters(load_config(None, ["run.report_to=[wandb, tensorboard]"])) == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="run.report_to must be a list of tensorboard|wandb"):
        load_config(None, ["run.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match="run.tensorboard=false"):
        load_config(None, ["run.tensorboard=false", "run.report_to=[tensorboard]"])

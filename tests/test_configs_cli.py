"""Shipped configs (baselines, demo variants) load; the CLI lists its commands and reports a bad override."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.training.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
EXPECTED_H = {"clip": 1, "o2m": 1, "holistic_cls": 5, "holistic_mlp": 5, "holistic_hybrid": 5, "smoke": 2}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert len(cfg.branches) == EXPECTED_H[path.stem]
    if path.stem == "clip":
        assert cfg.data.slots == ["web"]
    if path.stem == "holistic_hybrid":
        assert cfg.loss.fused_weight == 0.5
    if path.stem == "holistic_mlp":
        assert cfg.model.encoder == "mlp"


def test_cli_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "caption", "eval", "explain", "data", "demo", "models"):
        assert command in result.output


def test_train_cli_reports_bad_override(tmp_path):
    result = CliRunner().invoke(app, ["train", "optim.nope=1"])
    assert result.exit_code == 2 and "optim.nope" in result.output

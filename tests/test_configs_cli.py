"""Shipped configs (baselines, demo variants) load; the CLI lists its commands; the quick demo runs end to end."""
from __future__ import annotations

import json
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


def test_demo_variants_are_yaml_files_that_differ_only_in_the_variant_keys(tmp_path, monkeypatch):
    from holiclip import demo

    monkeypatch.chdir(tmp_path)  # found from the package, whatever the working directory
    demo.load_variant.cache_clear()
    folder = Path(__file__).parent.parent / "configs" / "demo"
    assert sorted(demo.VARIANTS) == sorted(p.stem for p in folder.glob("*.yaml"))
    flat = {}
    for name in demo.VARIANTS:
        variant = demo.load_variant(name)
        assert variant.config == folder / f"{name}.yaml" and variant.label
        cfg = load_config(variant.config)  # standalone; the demo: section is no training setting
        flat[name] = {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}
        quick = demo.variant_config(demo.MODES["quick"], name, tmp_path, tmp_path / name, 1, tmp_path)
        assert (quick.optim.steps, quick.optim.batch_size, quick.run.seed) == (4, 8, 1)
        assert quick.data.train == str(tmp_path / "train.jsonl")
        assert {k: v for k, v in flat[name].items() if not k.startswith(("optim.", "run.", "data.train"))} == {
            f"{s}.{k}": v for s, section in quick.to_dict().items() for k, v in section.items()
            if not f"{s}.{k}".startswith(("optim.", "run.", "data.train"))}
    differing = {k for k in flat["clip"] if len({json.dumps(f[k]) for f in flat.values()}) > 1}
    assert differing == {"model.encoder", "model.branches", "data.slots", "loss.fused_weight", "run.out"}
    assert [len(load_config(folder / f"{n}.yaml").branches) for n in demo.VARIANTS] == [1, 1, 5, 5, 5]
    assert [demo.load_variant(n).ours for n in demo.VARIANTS] == [False, False, False, False, True]


def test_cli_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "caption", "eval", "explain", "data", "demo", "models"):
        assert command in result.output


def test_train_cli_reports_bad_override(tmp_path):
    result = CliRunner().invoke(app, ["train", "optim.nope=1"])
    assert result.exit_code == 2 and "optim.nope" in result.output


def test_demo_quick_end_to_end(tmp_path):
    from holiclip.demo import HEADLINE, run_demo

    out = tmp_path / "demo"
    summary = run_demo("quick", out=out, log=lambda *_: None)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["variants"]) == {"clip", "o2m", "holistic_cls", "holistic_mlp", "holistic_hybrid"}
    for name, v in saved["variants"].items():
        assert set(HEADLINE) <= set(v["metrics"])
        assert all(0.0 <= v["metrics"][m] <= 100.0 for m in HEADLINE)
        assert bool(v.get("per_branch")) == name.startswith("holistic")
    for png in ("metrics_bars.png", "training_curves.png", "branch_task_heatmap.png", "attention_maps.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "CLIP (one web text) < O2M" in report and "beyond the paper" in report
    assert summary["timing"]["total_seconds"] > 0

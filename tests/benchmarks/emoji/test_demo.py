"""The demo: its variants are the YAML files in configs/demo; the quick mode runs end to end."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from holiclip.benchmarks.emoji import demo
from holiclip.benchmarks.emoji.demo import run_demo
from holiclip.benchmarks.emoji.report import HEADLINE
from holiclip.training.config import load_config


def test_demo_variants_are_yaml_files_that_differ_only_in_the_variant_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from the package, whatever the working directory
    demo.load_variant.cache_clear()
    folder = Path(__file__).parents[3] / "configs" / "demo"
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


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo("quick", out=out)
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
    # the machine is described as measured where the demo ran, with the command that ran it
    machine = saved["machine"]
    assert machine["logical_cpus"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert machine["command"] == f"run_demo('quick', out={str(out)!r})"
    assert f"{os.cpu_count()} logical CPUs" in report and f"command: `{machine['command']}`" in report
    assert "On this 2-core" not in report


def test_cli_passes_its_command_to_the_report(monkeypatch):
    from typer.testing import CliRunner

    from holiclip.cli.app import app

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: seen.update(kwargs))
    res = CliRunner().invoke(app, ["demo", "--quick", "--variants", "clip,o2m", "--out", "/tmp/my runs"])
    assert res.exit_code == 0, res.output
    assert seen["command"] == "holiclip demo --quick --variants clip,o2m --out '/tmp/my runs'"

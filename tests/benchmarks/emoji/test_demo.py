"""The demo: its variants are the shipped YAML files demo/*; the quick mode runs end to end;
`holiclip demo --data DIR` uses the dataset in DIR as it is, never rebuilt over."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from holiclip.benchmarks.emoji import demo
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.benchmarks.emoji.demo import run_demo
from holiclip.benchmarks.emoji.report import HEADLINE
from holiclip.data.records import DataError
from holiclip.training.config import load_config

TINY = B.preset("tiny")
VARIANT = replace(TINY, seed=5, train=24)  # a user's own build, not the demo's preset


def test_demo_variants_are_yaml_files_that_differ_only_in_the_variant_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found from the package, whatever the working directory
    demo.load_variant.cache_clear()
    folder = demo.VARIANT_DIR  # shipped with the package; a checkout's configs/demo is the same folder
    assert folder.resolve() == (Path(__file__).parents[3] / "configs" / "demo").resolve()
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


# -- --data DIR --------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _digest(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_data_part(monkeypatch, data_dir):
    """run_demo up to the first step after the data: the demo stops there."""
    seen = []

    def stop(model_name, data, cache_dir):
        seen.append(data)
        raise _Stop

    monkeypatch.setattr(demo, "warm_text_cache", stop)
    with pytest.raises(_Stop):
        demo.run_demo("quick", ["clip"], out=data_dir.parent / "runs", data_dir=data_dir)
    return seen[0]


def test_demo_uses_a_users_variant_as_it_is(tmp_path, monkeypatch, caplog):
    sources = S.require_sources(styles=VARIANT.heldout_styles)
    root = tmp_path / "mine"
    B.build(root, VARIANT, sources=sources)
    before = _digest(root)
    caplog.set_level("INFO", logger="holiclip")
    used = _run_data_part(monkeypatch, root)
    assert used == root and _digest(root) == before  # nothing rebuilt or replaced
    assert json.loads((root / "meta.json").read_text())["params"]["seed"] == 5
    said = caplog.text
    assert f"using the emoji dataset in {root} as it is" in said and "seed=5" in said and "train=24" in said


@pytest.mark.parametrize("content", ["foreign", "broken-meta"])
def test_demo_refuses_a_folder_without_a_complete_dataset(tmp_path, monkeypatch, content):
    root = tmp_path / "data"
    root.mkdir()
    if content == "foreign":
        (root / "notes.txt").write_text("my files")
    else:
        (root / "meta.json").write_text("{ torn")
        (root / "train.jsonl").write_text("{}\n")
    before = _digest(root)
    monkeypatch.setattr(demo, "warm_text_cache", lambda *a: pytest.fail("the demo went on"))
    with pytest.raises(DataError, match=rf"{root}: holds no complete emoji dataset"):
        demo.run_demo("quick", ["clip"], out=tmp_path / "runs", data_dir=root)
    assert _digest(root) == before

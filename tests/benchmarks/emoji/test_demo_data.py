"""`holiclip demo --data DIR`: the dataset in DIR is used as it is, never rebuilt over."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import pytest

from holiclip.benchmarks.emoji import demo
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.data.records import DataError

TINY = B.preset("tiny")
VARIANT = replace(TINY, seed=5, train=24)  # a user's own build, not the demo's preset


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


def test_use_or_build_builds_into_a_new_folder(tmp_path):
    sources = S.require_sources(styles=TINY.heldout_styles)
    meta = B.use_or_build(tmp_path / "new", VARIANT, sources=sources)
    assert meta["cached"] is False and B.is_complete(tmp_path / "new", meta["key"])

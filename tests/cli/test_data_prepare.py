"""`holiclip data sizes` and `holiclip data cache-texts`: what a multi-GPU launch needs, prepared
before torchrun, so that the launch counts no shard and reads none for the text cache."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.data import shards
from holiclip.training.trainer import Trainer

from tests.helpers.shards import write_shards
from tests.helpers.training import SLOTS, cfg_for


def test_data_sizes_writes_sizes_json_that_training_reads_instead_of_counting(tmp_path, monkeypatch):
    paths = write_shards(tmp_path / "shards", [3, 5, 2], sizes_file=False)
    (tmp_path / "shards" / "sizes.json").write_text(json.dumps({"other.tar": 7, paths[0].name: 99}))
    result = CliRunner().invoke(app, ["data", "sizes", str(tmp_path / "shards"), "--workers", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{tmp_path / 'shards' / 'sizes.json'}: 3 shards, 10 samples"
    table = json.loads((tmp_path / "shards" / "sizes.json").read_text())
    assert table == {"other.tar": 7, paths[0].name: 3, paths[1].name: 5, paths[2].name: 2}  # others kept
    monkeypatch.setattr(shards, "count_samples", lambda url: (_ for _ in ()).throw(AssertionError("counted")))
    assert shards.shard_sizes([str(p) for p in paths]) == [3, 5, 2]


def test_data_sizes_refuses_what_it_cannot_write_with_one_line(tmp_path):
    for args in (["s3://bucket/a-{0..1}.tar"], [str(tmp_path)]):
        result = CliRunner().invoke(app, ["data", "sizes", *args])
        assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


MINILM = ("model.name=holi-small-minilm", "model.lock_text=true", "optim.batch_size=4")


def test_cache_texts_before_training_leaves_the_launch_nothing_to_read(tmp_path, monkeypatch):
    write_shards(tmp_path / "shards", [3, 5])
    overrides = [f"data.train={tmp_path / 'shards'}", f"data.slots={SLOTS}", *MINILM,
                 f"run.cache_dir={tmp_path / 'cache'}", "run.progress=false"]
    result = CliRunner().invoke(app, ["data", "cache-texts", *overrides])
    assert result.exit_code == 0, result.output
    assert "2 sources (0 complete already, 2 read), 24 texts read" in result.output
    opened = []
    for name in ("tar_members", "_open"):
        def counted(url, *args, _real=getattr(shards, name), **kwargs):
            opened.append(url)
            return _real(url, *args, **kwargs)
        monkeypatch.setattr(shards, name, counted)
    trainer = Trainer(cfg_for(tmp_path, tmp_path / "shards", tmp_path / "run", *MINILM))
    trainer._build()
    assert opened == [] and trainer.text_cache_filled["complete"] == 2
    assert len(trainer.text_cache) == trainer.text_cache_filled["rows"] > 0
    result = CliRunner().invoke(app, ["data", "cache-texts", *overrides, "model.lock_text=false"])
    assert result.exit_code == 2 and "model.lock_text=true" in result.output and "Traceback" not in result.output

"""One cache root for what holiclip builds, downloads and caches: $HOLICLIP_CACHE, else
$XDG_CACHE_HOME/holiclip, else ~/.cache/holiclip; never the working folder."""
from __future__ import annotations

import os
from pathlib import Path

from holiclip.io import cache_root


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HOLICLIP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "holiclip"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "holiclip"
    monkeypatch.setenv("HOLICLIP_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_the_tests_never_use_the_real_cache():
    assert Path(os.environ["HOLICLIP_CACHE"]) == cache_root()
    assert not cache_root().is_relative_to(Path.home() / ".cache")


def test_everything_defaults_under_the_root(monkeypatch, tmp_path):
    from holiclip.benchmarks.emoji.data.sources import default_cache_dir
    from holiclip.training.config import TrainConfig, load_config

    monkeypatch.setenv("HOLICLIP_CACHE", str(tmp_path / "root"))
    monkeypatch.delenv("HOLICLIP_EMOJI_SOURCES")
    (tmp_path / "root" / "emoji-sources").mkdir(parents=True)  # installed there by make emoji-sources
    assert default_cache_dir() == tmp_path / "root" / "emoji-sources"
    assert TrainConfig().run.cache_dir == str(tmp_path / "root" / "text-features")  # text-feature caches
    # the shipped demo configs name the data the demo builds in the root
    assert load_config("demo/clip").data.train == str(tmp_path / "root" / "emoji-default" / "train.jsonl")


def test_data_emoji_builds_into_the_cache_root_by_default(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import holiclip.benchmarks.emoji.data.build as B
    from holiclip.cli.app import app

    seen = {}

    def fake_build(root, params, cache_dir=None, force=False):
        seen["root"] = root
        raise ValueError("stop here")

    monkeypatch.setattr(B, "build", fake_build)
    monkeypatch.chdir(tmp_path)
    CliRunner().invoke(app, ["data", "emoji", "--preset", "tiny"])
    assert seen["root"] == cache_root() / "emoji-tiny"
    assert list(tmp_path.iterdir()) == []  # nothing in the working folder

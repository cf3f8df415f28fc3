"""Emoji sources: a missing one is named with its exact install command; `holiclip data sources`."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from holiclip.benchmarks.emoji.data import sources as S
from holiclip.cli.data import app


def test_missing_sources_error_names_exact_installs(tmp_path):
    empty = S.Sources(cache_dir=tmp_path)
    missing, commands = S.install_commands(empty, ("twemoji", "openmoji"))
    assert {"Noto Color Emoji font", "emoji-test.txt", "CLDR annotations", "twemoji artwork",
            "openmoji artwork"} <= set(missing)
    assert commands[0].startswith("apt-get update && apt-get install -y ")
    assert commands[0].endswith("fonts-noto-color-emoji unicode-data unicode-cldr-core")
    assert any(c.startswith("npm pack @twemoji/svg@15.0.0") for c in commands)
    assert any(c.startswith("npm pack openmoji@17.0.0") for c in commands)
    err = S.MissingSourcesError(missing, commands)
    assert "fonts-noto-color-emoji" in str(err) and "install_emoji_sources.sh" in str(err)
    assert "make emoji-sources" in str(err)


def test_require_sources_raises_for_missing_artwork(tmp_path, sources):
    # An empty cache has no held-out artwork: this must raise, naming npm pack (it installs nothing).
    with pytest.raises(S.MissingSourcesError, match="npm pack @twemoji/svg"):
        S.require_sources(tmp_path, styles=("twemoji",))
    assert not any(tmp_path.iterdir())


def test_cli_sources_reports_and_rejects_an_unknown_style(sources):
    res = CliRunner().invoke(app, ["sources"])
    assert res.exit_code == 0, res.output
    assert "noto" in res.output and "openmoji" in res.output
    res = CliRunner().invoke(app, ["sources", "--styles", "nope"])
    assert res.exit_code == 2 and "unknown artwork style(s) ['nope']" in res.output

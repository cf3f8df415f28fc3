"""Option values the commands share: comma-separated lists, the torchrun shard split."""
import pytest
from typer.testing import CliRunner

from holiclip.cli._options import comma_list
from holiclip.cli.caption import app as caption_app


def test_comma_list_strips_names_and_drops_blanks():
    assert comma_list(" web, detail,,main ") == ["web", "detail", "main"]
    assert comma_list("main") == ["main"]
    assert comma_list(None) is None and comma_list("") is None and comma_list(" , ") is None


@pytest.mark.parametrize("shard, world, message", [
    ("0/1", "two", "error: environment variable WORLD_SIZE='two' is not an integer"),
    ("abc", "1", "error: --shard 'abc': expected i/n, e.g. 0/4"),
])
def test_caption_run_names_a_bad_shard_once(tmp_path, monkeypatch, shard, world, message):
    (tmp_path / "imgs").mkdir()
    monkeypatch.setenv("WORLD_SIZE", world)
    res = CliRunner().invoke(caption_app, ["run", "--images", str(tmp_path / "imgs"), "--backend", "openai",
                                           "--model", "m", "--out", str(tmp_path / "out"), "--shard", shard])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [message]

"""Option values the commands share: comma-separated lists, the torchrun shard split."""
from typer.testing import CliRunner

from holiclip.cli._options import comma_list
from holiclip.cli.caption import app as caption_app


def test_comma_list_strips_names_and_drops_blanks():
    assert comma_list(" web, detail,,main ") == ["web", "detail", "main"]
    assert comma_list("main") == ["main"]
    assert comma_list(None) is None and comma_list("") is None and comma_list(" , ") is None


def test_caption_run_names_a_bad_torchrun_variable(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "two")
    res = CliRunner().invoke(caption_app, ["run", "--images", str(tmp_path / "imgs"), "--backend", "openai",
                                           "--model", "m", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "WORLD_SIZE='two' is not an integer" in res.output

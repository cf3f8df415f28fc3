"""The emoji benchmark's ``scene`` captioning backend, found by name, through the caption CLI
(its shape as mounted by holiclip.cli.app)."""
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from holiclip.benchmarks.emoji.caption_backend import SceneBackend
from holiclip.captioning.backends import backend_names, make_backend
from holiclip.cli.caption import app as caption_app

from tests.helpers.captioning import make_images, read_jsonl


def _main_app() -> typer.Typer:
    # Mounted exactly as holiclip/cli/app.py does, without importing the other groups.
    main = typer.Typer()
    main.add_typer(caption_app, name="caption")

    @main.command()
    def other() -> None:  # a second command so that "caption" stays a group
        pass

    return main


def _emoji_like(tmp: Path) -> Path:
    imgs = make_images(tmp / "scenes", 3)
    # shaped like holiclip.benchmarks.emoji.data's <split>.jsonl rows (extra fields are ignored)
    rows = [{"id": f"train/{i:06d}", "image": f"scenes/{p.name}", "mask": f"masks/{i:06d}.png",
             "captions": {"web": f"web {i}", "detail": f"a {i} emoji on a grid", "background": f"plain {i}"},
             "objects": [{"class": 3, "name": "cat", "bbox": [0, 0, 4, 4]}], "main": 3} for i, p in enumerate(imgs)]
    rows[2]["captions"].pop("background")
    f = tmp / "emoji.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_scene_backend_is_found_by_name_through_its_entry_point():
    # captioning/ never names the benchmark: the name comes from the entry point in pyproject.toml
    assert backend_names() == ["openai", "hf", "scene"]
    backend = make_backend("scene", "scene", caption_fn=lambda image, perspective: f"{perspective} of {image}")
    assert isinstance(backend, SceneBackend) and backend.model == "scene"
    with pytest.raises(ValueError, match="unknown backend 'gpt'; choose one of openai, hf, scene"):
        make_backend("gpt", "m")


def test_caption_group_shape_and_scene_backend(tmp_path: Path):
    data = _emoji_like(tmp_path)
    runner, main = CliRunner(), _main_app()
    res = runner.invoke(main, ["caption", "run", "--images", str(data), "--backend", "scene", "--perspectives",
                               "detail,background", "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 1, res.output  # one look-up fails: reported, exit code says so
    assert "5 rows written" in res.output and "1 requests failed" in res.output
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    by = {(Path(r["image"]).name, r["perspective"]): r["text"] for r in rows}
    assert by[("img000.png", "detail")] == "a 0 emoji on a grid" and by[("img001.png", "background")] == "plain 1"
    assert {r["model"] for r in rows} == {"scene"}
    fail = read_jsonl(tmp_path / "out" / "failures.jsonl")[0]
    assert f"{data}:3: field 'captions' has no 'background'" in fail["error"]

    res = runner.invoke(main, ["caption", "merge", str(tmp_path / "out"), "--out", str(tmp_path / "t.jsonl"),
                               "--web-captions", str(data), "--slots", "web,detail@scene,detail", "--missing", "error"])
    assert res.exit_code == 0, res.output
    # the file's own 'detail' slot keeps its name; the scene backend's rows get '@scene'
    assert "slots: web, detail@scene, detail" in res.output
    first = read_jsonl(tmp_path / "t.jsonl")[0]
    assert first == {"image": "scenes/img000.png", "captions": {"web": "web 0", "detail@scene": "a 0 emoji on a grid",
                                                                "detail": "a 0 emoji on a grid"}}
    res = runner.invoke(main, ["caption", "stats", str(tmp_path / "out"), "--no-diversity"])
    assert res.exit_code == 0 and "detail" in res.output


def test_caption_without_images_is_an_error_with_help():
    res = CliRunner().invoke(_main_app(), ["caption"])  # the group alone: its help lists the commands
    assert res.exit_code == 2 and "merge" in res.output and "stats" in res.output
    res = CliRunner().invoke(_main_app(), ["caption", "run"])
    assert res.exit_code == 2 and "--images is required" in res.output
    res = CliRunner().invoke(caption_app, ["run", "--images", "x", "--out", "o", "--backend", "gpt"])
    assert res.exit_code == 2 and "--backend 'gpt': choose one of openai, hf, scene" in res.output
    res = CliRunner().invoke(caption_app, ["run", "--images", "x", "--out", "o", "--model", "m", "--shard", "3/2"])
    assert res.exit_code == 2 and "--shard '3/2'" in res.output


def test_torchrun_ranks_split_the_shard(tmp_path: Path, monkeypatch):
    data = _emoji_like(tmp_path)
    got = {}
    for rank in (0, 1):  # what two torchrun ranks would run, one after the other
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        res = CliRunner().invoke(caption_app, ["run", "--images", str(data), "--backend", "scene", "--perspectives", "detail",
                                               "--out", str(tmp_path / "out"), "--no-progress"])
        assert res.exit_code == 0, res.output
        got[rank] = read_jsonl(tmp_path / "out" / f"captions.{rank:05d}-of-00002.jsonl")
    assert [Path(r["image"]).name for r in got[0]] == ["img000.png", "img002.png"]
    assert [Path(r["image"]).name for r in got[1]] == ["img001.png"]
    # a later unsharded re-run sees every shard file and has nothing left to do
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    res = CliRunner().invoke(caption_app, ["run", "--images", str(data), "--backend", "scene", "--perspectives", "detail",
                                           "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0 and "0 rows written" in res.output and "(3 already done)" in res.output


def test_scene_index_given_as_a_backend_option(tmp_path: Path):
    # --images is a folder here: the index comes from --backend-option, the CLI knows no scene option
    data = _emoji_like(tmp_path)
    res = CliRunner().invoke(caption_app, ["run", "--images", str(tmp_path / "scenes"), "--backend", "scene",
                                           "--perspectives", "detail", "--backend-option", f"index={data}",
                                           "--out", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = read_jsonl(tmp_path / "out" / "captions.jsonl")
    assert sorted(r["text"] for r in rows) == [f"a {i} emoji on a grid" for i in range(3)]
    res = CliRunner().invoke(caption_app, ["run", "--images", str(tmp_path / "scenes"), "--backend", "scene",
                                           "--out", str(tmp_path / "o2"), "--no-progress"])
    assert res.exit_code == 2 and "--backend-option index=FILE" in res.output


@pytest.mark.parametrize("option, message", [("index", "--backend-option 'index': expected KEY=VALUE"),
                                             ("colour=red", "unexpected keyword argument 'colour'")])
def test_bad_backend_option_is_a_clear_error(tmp_path: Path, option: str, message: str):
    data = _emoji_like(tmp_path)
    res = CliRunner().invoke(caption_app, ["run", "--images", str(data), "--backend", "scene",
                                           "--backend-option", option, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and message in res.output, res.output  # an uncaught exception would exit 1

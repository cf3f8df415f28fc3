"""merge: slot naming, missing-slot reporting and policies, research-format input, output as shards."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holiclip.captioning.merge import MergeError, assign_slot_names, merge_captions
from holiclip.cli.caption import app
from holiclip.data.readers import read_jsonl as trainer_read_jsonl
from holiclip.data.readers import read_webdataset as trainer_read_webdataset

from tests.helpers.captioning import make_images, read_jsonl

QWEN, LLAVA = "Qwen/Qwen2-VL-7B-Instruct", "llava-hf/llava-1.5-7b-hf"


def _write_rows(folder: Path, rows: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.jsonl", "w") as f:
        for image, persp, model, text, *fin in rows:
            f.write(json.dumps({"image": image, "perspective": persp, "model": model, "prompt": "p", "text": text,
                                "finish_reason": fin[0] if fin else "stop"}) + "\n")


@pytest.fixture
def data(tmp_path: Path):
    imgs = [str(tmp_path / "imgs" / f"{k}.jpg") for k in "abc"]
    _write_rows(tmp_path / "qwen", [
        (imgs[0], "detail", QWEN, "qwen detail a"), (imgs[0], "background", QWEN, "qwen bg a"),
        (imgs[1], "detail", QWEN, "qwen detail b"), (imgs[1], "background", QWEN, "qwen bg b"),
        (imgs[2], "detail", QWEN, "qwen detail c"),  # c has no background
    ])
    _write_rows(tmp_path / "llava", [
        (imgs[0], "detail", LLAVA, "llava detail a"), (imgs[1], "detail", LLAVA, "llava detail b"),
        (imgs[2], "detail", LLAVA, "I'm sorry, I cannot describe this image."),  # a refusal
    ])
    web = tmp_path / "web.jsonl"  # research format, relative paths
    web.write_text("".join(json.dumps({"image": f"imgs/{k}.jpg", "caption": [f"web {k}", f"nouns {k}"]}) + "\n"
                           for k in "abc"))
    return tmp_path, imgs, web


def test_slot_names():
    keys = {("detail", QWEN), ("detail", LLAVA), ("background", QWEN), ("web", None)}
    assert assign_slot_names(keys, {QWEN: "qwen2-vl"}) == {
        ("detail", QWEN): "detail@qwen2-vl", ("detail", LLAVA): "detail@llava-1.5-7b-hf",
        ("background", QWEN): "background", ("web", None): "web"}
    assert assign_slot_names({("background", QWEN)}, model_suffix="always") == {("background", QWEN): "background@qwen2-vl-7b-instruct"}
    # a VLM perspective named like a file slot is suffixed, never merged into it
    assert assign_slot_names({("web", QWEN), ("web", None)})[("web", QWEN)] == "web@qwen2-vl-7b-instruct"
    with pytest.raises(MergeError, match="--alias"):
        assign_slot_names({("detail", "a/m"), ("detail", "b/m")})


def test_merge_named_slots_research_input_and_fill(data):
    tmp, imgs, web = data
    out = tmp / "train" / "train.jsonl"
    rep = merge_captions([tmp / "qwen", tmp / "llava"], out, web_captions=web, list_slots=["web", "nouns"],
                         aliases={QWEN: "qwen2-vl"}, missing="fill:web")
    assert rep.slots == ["web", "detail@llava-1.5-7b-hf", "detail@qwen2-vl", "nouns", "background"]
    assert (rep.images, rep.written, rep.dropped, rep.filled) == (3, 3, 0, 1)
    assert rep.missing == {"background": 1, "detail@llava-1.5-7b-hf": 1}
    assert rep.flagged_as_missing == {"detail@llava-1.5-7b-hf": 1}  # the refusal
    rows = read_jsonl(out)
    assert [r["image"] for r in rows] == ["../imgs/a.jpg", "../imgs/b.jpg", "../imgs/c.jpg"]  # relative to out
    assert rows[0]["captions"] == {"web": "web a", "detail@llava-1.5-7b-hf": "llava detail a",
                                   "detail@qwen2-vl": "qwen detail a", "nouns": "nouns a", "background": "qwen bg a"}
    assert rows[2]["captions"]["background"] == "web c" and rows[2]["captions"]["detail@llava-1.5-7b-hf"] == "web c"
    # the trainer's own reader takes the file and finds the images
    samples = list(trainer_read_jsonl(out))
    assert [str(Path(s.image).resolve()) for s in samples] == [str(Path(p).resolve()) for p in imgs]


def test_missing_slot_error_names_place_and_counts(data):
    tmp, _, web = data
    with pytest.raises(MergeError) as e:
        merge_captions([tmp / "qwen", tmp / "llava"], tmp / "t.jsonl", web_captions=web, list_slots=["web", "nouns"])
    msg = str(e.value)
    assert f"{web}:3" in msg and "c.jpg" in msg and "'detail@llava-1.5-7b-hf'" in msg
    assert "1 of 3 images miss a slot" in msg and "background: 1" in msg
    assert not (tmp / "t.jsonl").exists()  # nothing half-written

    rep = merge_captions([tmp / "qwen", tmp / "llava"], tmp / "t.jsonl", web_captions=web,
                         list_slots=["web", "nouns"], missing="drop")
    assert (rep.written, rep.dropped) == (2, 1)
    rep = merge_captions([tmp / "qwen", tmp / "llava"], tmp / "t.jsonl", slots=["detail@llava-1.5-7b-hf"],
                         missing="drop", keep_flagged=True)
    assert rep.written == 3 and read_jsonl(tmp / "t.jsonl")[2]["captions"]["detail@llava-1.5-7b-hf"].startswith("I'm sorry")


def test_merge_failing_while_writing_keeps_the_old_output_and_no_temp_file(data):
    tmp, _, _ = data
    out = tmp / "out" / "t.jsonl"
    out.parent.mkdir()
    out.write_text("previous\n")
    with pytest.raises(ValueError, match=r"slot 'background' missing and fill source 'background' missing too"):
        merge_captions([tmp / "qwen"], out, missing="fill:background")  # c.jpg has no background
    assert [p.name for p in out.parent.iterdir()] == ["t.jsonl"] and out.read_text() == "previous\n"


def test_merge_input_errors(data):
    tmp, _, web = data
    with pytest.raises(MergeError, match=r"--slots \['colour'\] not found.*available slots: web"):
        merge_captions([tmp / "qwen"], tmp / "t.jsonl", web_captions=web, list_slots=["web", "nouns"], slots=["colour"])
    with pytest.raises(ValueError, match=r"web\.jsonl:1: 2 captions but only 1 slot names"):
        merge_captions([tmp / "qwen"], tmp / "t.jsonl", web_captions=web, list_slots=["web"])
    with pytest.raises(ValueError, match="missing-slot policy"):
        merge_captions([tmp / "qwen"], tmp / "t.jsonl", missing="skip")
    with pytest.raises(MergeError, match="no captions"):
        (tmp / "empty").mkdir()
        merge_captions([tmp / "empty"], tmp / "t.jsonl")


def test_merge_cli(data):
    tmp, _, web = data
    res = CliRunner().invoke(app, ["merge", str(tmp / "qwen"), str(tmp / "llava"), "--out", str(tmp / "t.jsonl"),
                                   "--web-captions", str(web), "--research-slots", "web,nouns", "--alias",
                                   f"{QWEN}=qwen2-vl", "--alias", f"{LLAVA}=llava", "--missing", "drop"])
    assert res.exit_code == 0, res.output
    assert "slots: web, detail@llava, detail@qwen2-vl, nouns, background" in res.output
    assert "written: 2  dropped: 1" in res.output and "missing background: 1 images" in res.output
    assert len(read_jsonl(tmp / "t.jsonl")) == 2
    res = CliRunner().invoke(app, ["merge", str(tmp / "qwen"), "--out", str(tmp / "t2.jsonl")])
    assert res.exit_code == 2 and "has no usable caption for slot 'background'" in res.output


# -- merged rows written as shards -----------------------------------------------------------------
@pytest.fixture
def mixed(tmp_path: Path):
    """Captions for two image files and two images inside a webdataset shard (keys as `caption run` gives them)."""
    import webdataset as wds

    from holiclip.captioning.sources import ImageSource

    files = make_images(tmp_path / "imgs", 2, ext="jpg")
    src = tmp_path / "src" / "part-000.tar"
    src.parent.mkdir()
    with wds.TarWriter(str(src)) as sink:
        for i, p in enumerate(make_images(tmp_path / "tmp", 2, size=14)):
            sink.write({"__key__": f"sub/s{i}", "png": p.read_bytes(), "txt": "x"})
    items = list(ImageSource(str(src)))
    keys = [str(p) for p in files] + [it.key for it in items]
    images = [p.read_bytes() for p in files] + [it.data for it in items]
    _write_rows(tmp_path / "qwen", [(k, persp, QWEN, f"{persp} {n}") for n, k in enumerate(keys)
                                    for persp in ("detail", "main")])
    return tmp_path, keys, images


def test_merge_into_shards_reads_back_with_images_from_files_and_shards(mixed):
    tmp, keys, images = mixed
    rep = merge_captions([tmp / "qwen"], shards=tmp / "shards", shard_size=3)
    assert (rep.images, rep.written, rep.shards.shards, rep.shards.missing_images) == (4, 4, 2, 0)
    assert json.loads((tmp / "shards" / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 1}
    got = list(trainer_read_webdataset(str(tmp / "shards" / "shard-{000000..000001}.tar")))
    order = sorted(range(4), key=lambda n: keys[n])  # merge writes rows sorted by image key
    assert [g.image for g in got] == [images[n] for n in order]
    assert [g.captions for g in got] == [{"detail": f"detail {n}", "main": f"main {n}"} for n in order]
    # a re-run with the same captions keeps every shard
    again = merge_captions([tmp / "qwen"], shards=tmp / "shards", shard_size=3)
    assert (again.shards.kept, again.shards.written) == (2, 0)


def test_merge_to_jsonl_refuses_images_inside_shards(mixed):
    tmp, keys, _ = mixed
    with pytest.raises(MergeError, match=r"captions\.jsonl:\d+: image '.*part-000\.tar::sub/s0' is inside a webdataset "
                                         r"shard, like 2 of the 4 images.*--shards DIR"):
        merge_captions([tmp / "qwen"], tmp / "t.jsonl")
    assert not (tmp / "t.jsonl").exists()
    with pytest.raises(MergeError, match="give one output"):
        merge_captions([tmp / "qwen"], tmp / "t.jsonl", shards=tmp / "s")


def test_merge_cli_writes_shards(mixed):
    tmp, _, _ = mixed
    res = CliRunner().invoke(app, ["merge", str(tmp / "qwen"), "--shards", str(tmp / "s"), "--shard-size", "2",
                                   "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "written: 4" in res.output and "4 samples in 2 shards" in res.output
    assert len(list(trainer_read_webdataset(str(tmp / "s" / "shard-{000000..000001}.tar")))) == 4
    res = CliRunner().invoke(app, ["merge", str(tmp / "qwen"), "--out", str(tmp / "t.jsonl")])
    assert res.exit_code == 2 and "replace --out FILE with --shards DIR" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["merge", str(tmp / "qwen")])
    assert res.exit_code == 2 and "give one output: --out train.jsonl or --shards DIR" in res.output


def test_web_captions_read_from_the_source_shards(mixed):
    """img2dataset shards -> caption run -> merge: the web caption comes from the shards' own txt member."""
    tmp, keys, images = mixed
    rep = merge_captions([tmp / "qwen"], shards=tmp / "shards", web_captions=tmp / "src", slots=["web", "detail"],
                         missing="drop")
    got = list(trainer_read_webdataset(str(tmp / "shards" / "shard-000000.tar")))
    assert rep.written == 2 and [g.image for g in got] == images[2:]  # the two files have no web caption
    assert [g.captions for g in got] == [{"web": "x", "detail": "detail 2"}, {"web": "x", "detail": "detail 3"}]

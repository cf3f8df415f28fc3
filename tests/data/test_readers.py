"""Manifest readers: JSONL with named slots or the research list format, CSV, webdataset shards;
malformed lines and bytes that are not UTF-8 are named by file and line (or skipped and counted)."""
from __future__ import annotations

import json

import pytest

from holiclip.data.readers import read_csv, read_samples, read_webdataset
from holiclip.data.records import DataError

from tests.helpers.datasets import make_dataset, with_latin1_line


def test_jsonl_named_slots_and_relative_paths(tmp_path):
    path = make_dataset(tmp_path, n=3)
    samples = list(read_samples(path))
    assert [s.where for s in samples] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert samples[0].image == str(tmp_path / "img" / "0.png")
    assert set(samples[0].captions) == {"web", "detail", "main"}


def test_research_list_format_maps_positions_to_names(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "caption": ["web text", "long text"]}) + "\n")
    (s,) = read_samples(path, list_slots=["web", "detail"])
    assert s.captions == {"web": "web text", "detail": "long text"}
    with pytest.raises(DataError, match=r"r.jsonl:1: 2 captions but only 1 slot"):
        list(read_samples(path, list_slots=["web"]))


def test_malformed_line_names_file_and_line(tmp_path):
    path = make_dataset(tmp_path, n=3)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]  # torn JSON
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path.name}:2: malformed JSON"):
        list(read_samples(path))
    stats = {}
    assert len(list(read_samples(path, on_error="skip", stats=stats))) == 2 and stats["bad_rows"] == 1


def test_csv_and_webdataset(tmp_path):
    make_dataset(tmp_path, n=2)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("image,web,detail\nimg/0.png,a,b\nimg/1.png,c,d\n")
    rows = list(read_csv(csv_path))
    assert rows[1].captions == {"web": "c", "detail": "d"} and rows[1].where.endswith("d.csv:3")
    import webdataset as wds

    shard = tmp_path / "s-000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(2):
            sink.write({"__key__": f"{i:04d}", "png": (tmp_path / "img" / f"{i}.png").read_bytes(),
                        "json": json.dumps({"captions": {"web": f"w{i}"}}).encode()})
    got = list(read_webdataset(str(shard)))
    assert [g.captions["web"] for g in got] == ["w0", "w1"] and isinstance(got[0].image, bytes)


def test_non_utf8_byte_names_file_and_line_and_can_be_skipped(tmp_path):
    path = make_dataset(tmp_path, n=6)
    with_latin1_line(path, 4)
    with pytest.raises(DataError, match=rf"{path.name}:4: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        list(read_samples(path))
    stats = {}
    got = list(read_samples(path, on_error="skip", stats=stats))
    assert [s.where.rsplit(":", 1)[1] for s in got] == ["1", "2", "3", "5", "6"]
    assert stats["bad_rows"] == 1 and "4: not valid UTF-8" in stats["bad_examples"][0]


def test_non_utf8_byte_in_csv_names_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"image,web\na.png,fine\nb.png,caf\xe9\n")
    with pytest.raises(DataError, match=r"d\.csv:3: not valid UTF-8"):
        list(read_samples(path))


@pytest.mark.parametrize("row, message", [
    ("img/1.png,a cat on a mat", "d.csv:3: a short row of 2 fields (image='img/1.png', web='a cat on a mat') under a "
                                 "header of 3 (image,web,detail), no field for detail; an empty caption is an empty "
                                 "field (',' twice), a field holding ',' needs double quotes"),
    ("img/1.png,a cat, on a mat,a mat", "d.csv:3: a row of 4 fields (image='img/1.png', web='a cat', "
                                        "detail=' on a mat', 'a mat') under a header of 3 (image,web,detail); a "
                                        "field holding ',' needs double quotes"),
])
def test_a_ragged_csv_row_is_named_with_its_fields(tmp_path, row, message):
    path = tmp_path / "d.csv"
    path.write_text(f"image,web,detail\nimg/0.png,a,b\n{row}\nimg/2.png,e,f\n")
    with pytest.raises(DataError) as err:
        list(read_csv(path))
    assert str(err.value) == f"{path.parent}/{message}"
    path.write_text("image,web,detail\nimg/0.png,a,\n")  # an empty field is a caption the slot policy judges
    assert list(read_csv(path))[0].captions == {"web": "a", "detail": ""}


def test_a_short_csv_row_on_the_command_line_is_one_line(tmp_path):
    from tests.helpers.cli import invoke, one_line_error
    from tests.helpers.datasets import draw

    for i in range(2):
        draw(i).save(tmp_path / f"{i}.png")
    (tmp_path / "d.csv").write_text("image,web,detail\n0.png,a,b\n1.png,c\n")
    line = one_line_error(invoke("train", f"data.train={tmp_path / 'd.csv'}", "data.slots=[web,detail]",
                                 "model.name=holi-tiny", "optim.batch_size=2", "optim.steps=1",
                                 f"run.out={tmp_path / 'run'}", "run.progress=false", "run.tensorboard=false"))
    assert f"{tmp_path / 'd.csv'}:3: a short row of 2 fields (image='1.png', web='c')" in line

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

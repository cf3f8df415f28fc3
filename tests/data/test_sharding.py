"""`holiclip data shard`: a manifest and its images -> webdataset shards read back by the trainer's
reader (same image bytes, same captions), sizes.json, problems named by file:line, parallel
writers giving the same bytes, and a re-run after a crash redoing only unfinished shards."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from holiclip.data import sharding
from holiclip.data.readers import read_webdataset
from holiclip.data.records import DataError
from holiclip.data.sharding import STATE_DIR, shard_manifest

from tests.helpers.datasets import make_dataset

runner = CliRunner()


def _dataset(root: Path, n: int = 12) -> Path:
    """make_dataset (PNG images) with row 1 a JPEG, row 2 a WebP under a .png name, row 3 a BMP,
    and an extra field on row 0."""
    path = make_dataset(root, n=n)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "img" / "1.jpg", quality=90)
    rows[1]["image"] = "img/1.jpg"
    Image.fromarray(pixels).save(root / "img" / "2.png", "WEBP")  # the format is read from the bytes
    Image.fromarray(pixels).save(root / "img" / "3.bmp")
    rows[3]["image"] = "img/3.bmp"
    rows[0]["url"] = "https://example.org/0.png"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def test_shards_read_back_with_the_same_images_and_captions(tmp_path):
    path = _dataset(tmp_path, n=12)
    out = tmp_path / "shards"
    rep = shard_manifest(path, out, shard_size=5, progress=False)
    assert (rep.samples, rep.shards, rep.written, rep.kept, rep.converted) == (12, 3, 3, 0, 1)
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 2} == rep.sizes
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    got = list(read_webdataset(sorted(str(p) for p in out.glob("shard-*.tar"))))
    assert len(got) == 12 and len({g.where.rsplit(":", 1)[1] for g in got}) == 12  # unique keys
    for i, (row, sample) in enumerate(zip(rows, got)):
        assert sample.captions == row["captions"]
        source = (tmp_path / row["image"]).read_bytes()
        if i == 3:  # BMP: stored as PNG, the same pixels
            assert sample.image[:8] == b"\x89PNG\r\n\x1a\n"
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample.image))), np.asarray(Image.open(tmp_path / row["image"])))
        else:
            assert sample.image == source  # the file's own bytes
    import webdataset as wds

    first = [s for s in wds.WebDataset(str(out / "shard-000000.tar"), shardshuffle=False)]
    assert [sorted(k for k in s if not k.startswith("__")) for s in first[:4]] == [
        ["json", "png"], ["jpg", "json"], ["json", "webp"], ["json", "png"]]
    meta = json.loads(first[0]["json"])
    assert meta == {"url": "https://example.org/0.png", "image": "img/0.png", "captions": rows[0]["captions"]}


def test_missing_and_unreadable_images_bad_rows_and_dropped_rows_are_named_and_counted(tmp_path):
    path = make_dataset(tmp_path, n=8)
    (tmp_path / "img" / "2.png").unlink()
    (tmp_path / "img" / "5.png").write_bytes(b"not an image")
    lines = path.read_text().splitlines()
    lines[6] = lines[6][:30]  # torn JSON on line 7
    row = json.loads(lines[3])
    del row["captions"]["main"]
    lines[3] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{path.name}:7: malformed JSON"):
        shard_manifest(path, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match=rf"{path.name}:4: caption slot 'main' is missing"):
        shard_manifest(path, tmp_path / "b", slots=["web", "main"], on_bad_row="skip", progress=False)
    rep = shard_manifest(path, tmp_path / "c", shard_size=3, slots=["web", "main"], missing_slot_policy="drop",
                         on_bad_row="skip", progress=False)
    assert (rep.bad_rows, rep.dropped, rep.missing_images, rep.unreadable_images, rep.samples) == (1, 1, 1, 1, 4)
    assert f"{path.name}:7: malformed JSON" in rep.bad_row_examples[0]
    assert rep.dropped_examples == [f"{path}:4 (no 'main')"]
    assert rep.problems == [f"{path}:3: image not found: {tmp_path / 'img' / '2.png'}",
                            f"{path}:6: {tmp_path / 'img' / '5.png'}: not an image in a format PIL reads"]
    text = "\n".join(rep.lines())
    assert "malformed rows skipped: 1" in text and "1 images missing, 1 unreadable" in text and ":6: " in text
    got = list(read_webdataset(str(tmp_path / "c" / "shard-{000000..000001}.tar")))
    assert [g.captions for g in got] == [{"web": f"{c}", "main": m} for c, m in [
        (json.loads(lines[i])["captions"]["web"], json.loads(lines[i])["captions"]["main"]) for i in (0, 1, 4, 7)]]
    (tmp_path / "img" / "0.png").unlink()
    (tmp_path / "img" / "1.png").unlink()
    one = tmp_path / "one.jsonl"
    one.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(DataError, match=r"none of the 2 images could be read; first: .*one\.jsonl:1: image not found"):
        shard_manifest(one, tmp_path / "d", progress=False)


def test_parallel_writers_give_the_same_shards(tmp_path):
    path = make_dataset(tmp_path, n=14)
    shard_manifest(path, tmp_path / "one", shard_size=3, progress=False)
    rep = shard_manifest(path, tmp_path / "two", shard_size=3, workers=2, progress=False)
    assert rep.written == 5 and _tars(tmp_path / "one") == _tars(tmp_path / "two")
    assert (tmp_path / "one" / "sizes.json").read_text() == (tmp_path / "two" / "sizes.json").read_text()


def test_rerun_after_a_crash_redoes_only_unfinished_shards(tmp_path, monkeypatch):
    path = make_dataset(tmp_path, n=10)
    out = tmp_path / "shards"
    shard_manifest(path, out, shard_size=3, progress=False)
    want, want_sizes = _tars(out), (out / "sizes.json").read_text()
    # a kill -9 while writing shard 1: its temporary file half written, its tar and record not yet there;
    # shard 2's tar under its final name but without a record (e.g. copied in, or a crash before the record)
    (out / "shard-000001.tar").unlink()
    (out / STATE_DIR / "shard-000001.tar.json").unlink()
    (out / "shard-000001.tar.4242.deadbeef.tmp").write_bytes(want["shard-000001.tar"][:700])
    (out / "shard-000002.tar").write_bytes(want["shard-000002.tar"][:1000])
    (out / STATE_DIR / "shard-000002.tar.json").unlink()
    (out / "sizes.json").unlink()
    written = []
    real = sharding._write_shard
    monkeypatch.setattr(sharding, "_write_shard", lambda out, index, *a: written.append(index) or real(out, index, *a))
    rep = shard_manifest(path, out, shard_size=3, progress=False)
    assert written == [1, 2] and (rep.written, rep.kept, rep.samples) == (2, 2, 10)
    assert _tars(out) == want and (out / "sizes.json").read_text() == want_sizes
    assert not list(out.glob("*.tmp")) and not list((out / STATE_DIR).glob("*.tmp"))
    written.clear()
    assert shard_manifest(path, out, shard_size=3, progress=False).kept == 4 and written == []  # all finished


def test_rerun_on_a_changed_manifest_rewrites_changed_shards_and_removes_those_past_the_end(tmp_path):
    path = make_dataset(tmp_path, n=10)
    out = tmp_path / "shards"
    shard_manifest(path, out, shard_size=3, progress=False)
    before = _tars(out)
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace("#4", "#four")  # shard 1 changes
    path.write_text("\n".join(lines[:7]) + "\n")  # 7 rows: shards 0-2, shard 3 past the end
    rep = shard_manifest(path, out, shard_size=3, progress=False)
    assert (rep.written, rep.kept, rep.removed) == (2, 1, ["shard-000003.tar"])  # 1 changed, 2 got shorter
    after = _tars(out)
    assert set(after) == {"shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}
    assert after["shard-000000.tar"] == before["shard-000000.tar"] and after["shard-000001.tar"] != before["shard-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": 3, "shard-000001.tar": 3,
                                                            "shard-000002.tar": 1}
    got = list(read_webdataset(str(out / "shard-000001.tar")))
    assert got[1].captions["web"].endswith("#four")


def test_data_shard_command(tmp_path):
    from holiclip.cli.app import app

    path = make_dataset(tmp_path, n=5)
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("image,web,detail\nimg/0.png,a,b\nimg/1.png,c,d\nimg/9.png,e,f\n")
    res = runner.invoke(app, ["data", "shard", str(csv_path), "--out", str(tmp_path / "s"), "--shard-size", "2",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "2 samples in 1 shards" in res.output and f"{csv_path}:4: image not found" in res.output
    assert [g.captions for g in read_webdataset(str(tmp_path / "s" / "shard-000000.tar"))] == [
        {"web": "a", "detail": "b"}, {"web": "c", "detail": "d"}]
    res = runner.invoke(app, ["data", "shard", str(path), "--out", str(tmp_path / "t"), "--slots", "web,main",
                              "--workers", "2", "--no-progress"])
    assert res.exit_code == 0 and "5 samples in 1 shards" in res.output
    for args, message in [
        ([str(tmp_path / "nope.jsonl")], "no such manifest file"),
        ([str(tmp_path / "s" / "shard-000000.tar")], "is already webdataset shards"),
        ([str(path), "--missing", "maybe"], "missing-slot policy must be one of"),
        ([str(path), "--on-bad-row", "ignore"], "--on-bad-row must be error or skip"),
        ([str(path), "--slots", "web,nope"], "train.jsonl:1: caption slot 'nope' is missing"),
    ]:
        res = runner.invoke(app, ["data", "shard", *args, "--out", str(tmp_path / "e"), "--no-progress"])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output

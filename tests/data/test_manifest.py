"""Compact manifests: the same rows, counts and messages as reading every row into Python lists,
held in a few numpy buffers that forked DataLoader workers share instead of copying."""
from __future__ import annotations

import json
import multiprocessing
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from holiclip.data.loader import Collate, LoadedManifest, MultiTextDataset, ResumableBatchSampler, load_manifest
from holiclip.data.manifest import StringColumn, head_column, string_column
from holiclip.data.readers import read_samples
from holiclip.data.records import DataError, apply_missing_slot_policy
from holiclip.models.registry import get_tokenizer

from tests.helpers.datasets import make_dataset, with_latin1_line


def _lists(path, slots, policy="error", list_slots=None, on_bad_row="error"):
    """The rows as plain lists, straight from the reader (what load_manifest held before)."""
    images, texts, where = [], [], []
    for s in read_samples(path, list_slots=list_slots, on_error=on_bad_row, stats={}):
        t = apply_missing_slot_policy(s.captions, slots, policy, s.where)
        if t is not None:
            images.append(s.image), texts.append(t), where.append(s.where)
    return images, texts, where


def _same(m: LoadedManifest, images, texts, where):
    assert len(m) == len(m.images) == len(m.texts) == len(m.where) == len(images)
    assert list(m.images) == images and list(m.texts) == texts and list(m.where) == where
    assert [m.images[i] for i in range(len(m))] == images and [m.texts[i] for i in range(len(m))] == texts
    assert m.images[-1] == images[-1] and m.texts[-1] == texts[-1] and m.where[-1] == where[-1]
    assert m.images[1:3] == images[1:3] and m.texts[::2] == texts[::2]
    for column in (m.images, m.texts, m.where):
        with pytest.raises(IndexError):
            column[len(images)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("policy", ["error", "drop", "fill:web"])
def test_compact_manifest_equals_the_lists_under_each_missing_slot_policy(tmp_path, policy):
    path = make_dataset(tmp_path, n=7)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[2]["captions"]["detail"] = "  "  # blank: missing
    del rows[5]["captions"]["detail"]
    rows[3]["captions"]["web"] = "caf\u00e9 \U0001f600 \ud800 \u00e9t\u00e9"  # non-ASCII, emoji, a lone surrogate
    rows[4]["image"] = str(tmp_path / "elsewhere" / "abs.png")  # an absolute path in another folder
    rows[6]["image"] = "noslash.png"
    _jsonl(path, rows)
    slots = ["web", "detail", "main"]
    if policy == "error":
        with pytest.raises(DataError, match=rf"{path.name}:3: caption slot 'detail' is empty"):
            load_manifest(path, slots, policy)
        return
    m = load_manifest(path, slots, policy)
    _same(m, *_lists(path, slots, policy))
    by_line = {w.rsplit(":", 1)[1]: (image, texts) for image, texts, w in zip(m.images, m.texts, m.where)}
    assert by_line["4"][1][0] == rows[3]["captions"]["web"]
    assert by_line["5"][0] == rows[4]["image"] and by_line["7"][0] == str(tmp_path / "noslash.png")
    if policy == "drop":
        assert m.counts() == {"rows": 7, "bad_rows": 0, "dropped": 2}
        assert "2 samples dropped" in m.summary() and f"{path}:3 (no 'detail')" in m.summary()
    else:
        assert m.counts() == {"rows": 7, "bad_rows": 0, "dropped": 0} and m.summary() is None
        assert by_line["3"][1][1] == by_line["3"][1][0]  # filled from web


def test_compact_manifest_equals_the_lists_with_bad_rows_csv_research_format_and_shards(tmp_path):
    path = make_dataset(tmp_path, n=6)
    with_latin1_line(path, 2)
    lines = path.read_text(encoding="latin-1").splitlines()
    lines[4] = '{"image": "img/4.png", "captions": '  # torn JSON
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")
    m = load_manifest(path, ["web", "main"], on_bad_row="skip")
    _same(m, *_lists(path, ["web", "main"], on_bad_row="skip"))
    assert m.counts() == {"rows": 6, "bad_rows": 2, "dropped": 0}
    assert re.search(rf"2 malformed rows skipped .*{path.name}:2: not valid UTF-8.*{path.name}:5: malformed JSON",
                     m.summary())
    with pytest.raises(DataError, match=rf"{path.name}:2: not valid UTF-8"):
        load_manifest(path, ["web"])

    research = _jsonl(tmp_path / "research.jsonl", [{"image": f"img/{i}.png", "caption": [f"w{i}", f"d{i}"]}
                                                    for i in range(3)])
    m = load_manifest(research, ["web", "detail"], list_slots=["web", "detail"])
    _same(m, *_lists(research, ["web", "detail"], list_slots=["web", "detail"]))

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("image,web,detail\nimg/0.png,a,b\nimg/1.png,c,d\nimg/2.png,e,\n")
    m = load_manifest(csv_path, ["web", "detail"], "drop")
    _same(m, *_lists(csv_path, ["web", "detail"], "drop"))
    assert m.dropped == 1 and m.where[1] == f"{csv_path}:3"

    import webdataset as wds

    shard = tmp_path / "s-000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:04d}", "png": (tmp_path / "img" / f"{i}.png").read_bytes(),
                        "json": json.dumps({"captions": {"web": f"w{i}"}}).encode()})
    m = load_manifest(str(shard), ["web"])
    _same(m, *_lists(str(shard), ["web"]))
    assert isinstance(m.images[0], bytes) and m.images[2] == (tmp_path / "img" / "2.png").read_bytes()


def test_columns_are_a_few_numpy_buffers_not_objects_per_row(tmp_path):
    n = 2000
    path = _jsonl(tmp_path / "m.jsonl", [{"image": f"img/{i}.png", "captions": {"web": f"web text {i}",
                                                                               "main": f"main text {i}"}}
                                         for i in range(n)])
    m = load_manifest(path, ["web", "main"])
    arrays = [m.images.codes, m.images.heads.data, m.images.heads.ends, m.images.tails.data, m.images.tails.ends,
              m.texts.flat.data, m.texts.flat.ends, m.where.codes, m.where.heads.data, m.where.tails.data]
    assert all(isinstance(a, np.ndarray) for a in arrays)
    assert len(m.images.heads) == 1 and len(m.where.heads) == 1  # the folder and the file stored once
    text_bytes = sum(len(t.encode()) for row in m.texts for t in row)
    assert m.nbytes < text_bytes + n * 60  # texts + ~8 bytes per offset/code, image names and line numbers


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as fh:
        return sum(int(line.split()[1]) for line in fh if line.startswith("Private_Dirty:"))


def _read_every_row(manifest, queue) -> None:
    before = _private_dirty_kb()
    total = 0
    for i in range(len(manifest.images)):  # what a DataLoader worker does over an epoch
        total += len(manifest.images[i]) + sum(map(len, manifest.texts[i])) + len(manifest.where[i])
    queue.put((_private_dirty_kb() - before, total))


def _dirty_after_reading_in_a_forked_worker(manifest) -> tuple[int, int]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_read_every_row, args=(manifest, queue))
    worker.start()
    got = queue.get(timeout=60)
    worker.join(timeout=60)
    return got


def test_a_forked_worker_reading_every_row_does_not_copy_the_manifest(tmp_path):
    n = 25_000
    rows = [{"image": f"images/{i // 1000:05d}/{i:09d}.jpg",
             "captions": {s: f"{s} caption number {i} with some more words to be about sixty chars"
                          for s in ("web", "detail", "main")}} for i in range(n)]
    path = _jsonl(tmp_path / "big.jsonl", rows)
    slots = ["web", "detail", "main"]
    compact = load_manifest(path, slots)
    dirty_kb, total = _dirty_after_reading_in_a_forked_worker(compact)
    images, texts, where = _lists(path, slots)
    assert total == sum(len(a) + sum(map(len, t)) + len(w) for a, t, w in zip(images, texts, where))
    # the same rows as Python lists: the worker's reads touch every object's reference count, and
    # the kernel copies each page it writes (this is what the measurement detects)
    lists_kb, _ = _dirty_after_reading_in_a_forked_worker(LoadedManifest(images, texts, where))
    assert lists_kb > 4 * 1024  # > 4 MB copied for 25k rows of lists
    assert dirty_kb < 1024 and dirty_kb * 8 < lists_kb, (dirty_kb, lists_kb)


def test_dataloader_workers_read_the_compact_manifest(tmp_path):
    path = make_dataset(tmp_path, n=12)
    m = load_manifest(path, ["web", "main"])
    ds = MultiTextDataset(m, lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float())
    collate = Collate(get_tokenizer("holi-tiny"), 32)

    def epoch(workers):
        sampler = ResumableBatchSampler(len(ds), 4, seed=3)
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                            multiprocessing_context="fork" if workers else None)
        return [(b["index"].tolist(), b["texts"], b["images"]) for b in loader]

    inline, forked = epoch(0), epoch(2)
    assert len(inline) == 3
    for (i0, t0, x0), (i1, t1, x1) in zip(inline, forked):
        assert i0 == i1 and torch.equal(t0, t1) and torch.equal(x0, x1)


def test_column_helpers_round_trip_and_check_rows(tmp_path):
    values = ["", "a", "/abs/dir/file.png", "dir\\x", "\u00e9\U0001f600", "x:1", "trailing/"]
    assert list(head_column(values, "/")) == values and list(head_column(values, ":")) == values
    assert list(string_column(values)) == values
    blobs = [b"", b"\x00\xff", b"png bytes"]
    col = string_column(blobs, binary=True)
    assert isinstance(col, StringColumn) and list(col) == blobs
    empty = string_column([])
    assert len(empty) == 0 and list(empty) == []
    with pytest.raises(ValueError, match="every row needs 2 texts, got 1"):
        LoadedManifest.from_lists(["a", "b"], [["x", "y"], ["z"]], ["f:1", "f:2"])
    m = LoadedManifest.from_lists(["a.png", "d/b.png"], [["x", "y"], ["z", "\ud800"]], ["f:1", "f:2"], path="f")
    assert m.texts[0] == ["x", "y"] and m.where[0] == "f:1"
    import pickle  # spawned DataLoader workers get the dataset pickled

    again = pickle.loads(pickle.dumps(m))
    assert (list(again.images), list(again.texts), list(again.where), again.path) == (
        ["a.png", "d/b.png"], [["x", "y"], ["z", "\ud800"]], ["f:1", "f:2"], "f")

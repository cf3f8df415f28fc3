"""One webdataset reader: the training stream, the evaluation reader, search's embed source,
captioning's image source, caption merge's web captions and the shard writer read the same
shards into the same slots and the same sample ids."""
from __future__ import annotations

import json
import os

import pytest

from holiclip.captioning.merge import CaptionTable, read_web_captions
from holiclip.captioning.sources import ImageSource
from holiclip.data import sharding
from holiclip.data.records import DataError
from holiclip.data.shards import ShardStream
from holiclip.data.webdataset import sample_captions, sample_id, shard_urls, split_sample_id
from holiclip.evaluation.datasets import load_retrieval
from holiclip.integrations.search import _open_source

from tests.helpers.shards import png, to_tensor, write_shards


def _kind(n: int, kinds: int) -> dict:
    """The ways shards carry a web caption: a txt member alone (the case that drifted), img2dataset's
    txt + metadata json, our json of named slots, the research format's caption string."""
    web = f"web caption {n}"
    return [
        {"png": png(n), "txt": web.encode()},
        {"jpg": png(n), "txt": web.encode(), "json": json.dumps({"key": f"{n:06d}", "status": "success"}).encode()},
        {"png": png(n), "json": json.dumps({"captions": {"web": web}}).encode()},
        {"webp": png(n), "json": json.dumps({"caption": web}).encode()},
    ][n % kinds]


@pytest.mark.parametrize("list_slots,kinds", [(None, 3), (["web"], 4)])
@pytest.mark.parametrize("spelling", ["folder", "pattern"])
def test_every_path_reads_the_same_slots_and_ids(tmp_path, list_slots, kinds, spelling):
    paths = write_shards(tmp_path / "s", [5, 4], members=lambda n, _: _kind(n, kinds))
    source = str(tmp_path / "s") if spelling == "folder" else str(tmp_path / "s" / "shard-{000000..000001}.tar")
    ids = [sample_id(str(paths[0 if n < 5 else 1]), f"{n:06d}") for n in range(9)]
    expected = {ids[n]: {"web": f"web caption {n}"} for n in range(9)}
    assert ids[0] == f"{os.path.abspath(paths[0])}::000000"

    # training: the stream's index is the sample's place in the shard list
    stream = ShardStream(source, ["web"], 1, to_tensor, lambda items: {"items": items}, shuffle_buffer=0,
                         list_slots=list_slots)
    trained = {ids[it["index"]]: dict(zip(["web"], it["texts"])) for b in stream.loader() for it in b["items"]}
    assert trained == expected

    # evaluation (no list slots there: the research format's string is text0 as in a JSONL); image ids = sample ids
    ev = load_retrieval(source)
    got = {}
    for text, row, slot in zip(ev.texts, ev.text_to_image, ev.text_slots):
        got.setdefault(ev.image_ids[row], {})[slot] = text
    assert got == {i: ({"text0": c["web"]} if n % kinds == 3 else c) for n, (i, c) in enumerate(expected.items())}
    images = dict(zip(ev.image_ids, ev.images))
    assert images[ids[0]] == png(0)
    # search's embed source and captioning's image source: the same ids, the same image bytes
    for src in (_open_source(source), ImageSource(source)):
        items = list(src)
        assert [it.key for it in items] == ids
        assert all(it.data == images[it.key] for it in items)
    # caption merge's web captions: keyed by sample id, the same slots
    table = CaptionTable()
    read_web_captions(source, table, list_slots)
    assert {img: {slot: c.text for (slot, _), c in caps.items()} for img, caps in table.by_image.items()} == (
        expected if list_slots else got)
    # the shard writer finds each image by its id as the readers do
    tars = sharding._TarImages()
    for n, i in enumerate(ids):
        assert tars.read(*split_sample_id(i)) == png(n)


def test_a_lone_txt_member_is_the_web_slot_or_the_first_list_slot():
    raw = {"__key__": "k", "txt": b"alt text"}
    assert sample_captions(raw, "s.tar:k") == {"web": "alt text"}
    assert sample_captions(raw, "s.tar:k", ["short", "long"]) == {"short": "alt text"}
    # named slots in the json win over the txt member; a json caption list keeps its positions' names
    raw["json"] = json.dumps({"captions": {"detail": "d"}}).encode()
    assert sample_captions(raw, "s.tar:k") == {"detail": "d"}
    raw["json"] = json.dumps({"caption": ["a", "b"]}).encode()
    assert sample_captions(raw, "s.tar:k") == {"text0": "a", "text1": "b"}
    with pytest.raises(DataError, match=r"^s.tar:k: no json or txt member with captions \(members: png\)"):
        sample_captions({"__key__": "k", "png": b""}, "s.tar:k")
    with pytest.raises(DataError, match=r"^s.tar:k: txt member is not valid UTF-8 \(byte 0\)"):
        sample_captions({"txt": b"\xff"}, "s.tar:k")


def test_ids_and_sources():
    assert sample_id("pipe:cat a.tar", "k") == "pipe:cat a.tar::k"  # a URL or command stays as given
    assert sample_id("s3://b/a.tar", "x/y") == "s3://b/a.tar::x/y"
    assert split_sample_id(sample_id("d/a.tar.gz", "k::1")) == (os.path.abspath("d/a.tar.gz"), "k::1")
    assert split_sample_id("/images/a::b.jpg") is None  # a file path
    assert shard_urls("d/part-{0..1}.tgz") == ["d/part-0.tgz", "d/part-1.tgz"]
    assert shard_urls("images.txt") is None and shard_urls("train.jsonl") is None

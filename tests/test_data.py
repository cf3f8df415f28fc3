"""Readers, the missing-slot policy, bad images and the resumable sampler."""
from __future__ import annotations

import json

import pytest
import torch

from holiclip.data.loader import (
    Collate, MultiTextDataset, ResumableBatchSampler, check_bad_fraction, load_manifest, token_lengths,
)
from holiclip.data.readers import read_csv, read_samples, read_webdataset
from holiclip.data.records import DataError, apply_missing_slot_policy
from holiclip.models.registry import get_tokenizer, get_transforms, create_model

from tests.helpers.datasets import make_dataset


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


def test_missing_slot_policies(tmp_path):
    caps = {"web": "a dog", "detail": ""}
    with pytest.raises(DataError, match=r"x.jsonl:7: caption slot 'detail' is empty"):
        apply_missing_slot_policy(caps, ["web", "detail"], "error", "x.jsonl:7")
    with pytest.raises(DataError, match=r"slot 'main' is missing"):
        apply_missing_slot_policy(caps, ["main"], "error", "x.jsonl:7")
    assert apply_missing_slot_policy(caps, ["web", "detail"], "drop") is None
    assert apply_missing_slot_policy(caps, ["web", "detail"], "fill:web") == ["a dog", "a dog"]
    with pytest.raises(ValueError, match="policy"):
        apply_missing_slot_policy(caps, ["web"], "ignore")


def test_manifest_drop_policy_counts(tmp_path):
    path = make_dataset(tmp_path, n=4)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    del rows[2]["captions"]["main"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path.name}:3: caption slot 'main' is missing"):
        load_manifest(path, ["web", "main"])
    m = load_manifest(path, ["web", "main"], "drop")
    assert len(m.images) == 3 and m.dropped == 1


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


def test_bad_images_are_substituted_and_counted(tmp_path):
    path = make_dataset(tmp_path, n=6)
    (tmp_path / "img" / "1.png").write_bytes(b"not a png at all")
    (tmp_path / "img" / "4.png").unlink()
    m = load_manifest(path, ["web"])
    model = create_model("holi-tiny", branches=["web"])
    ds = MultiTextDataset(m, get_transforms(model))
    items = [ds[i] for i in range(len(ds))]
    assert all(it["image"].shape == (3, 64, 64) for it in items)
    # each bad image is replaced by a readable sample other than itself
    assert items[1]["index"] in {0, 2, 3, 5} and "1.png" in items[1]["bad"][0]
    assert items[4]["index"] in {0, 2, 3, 5} and "4.png" in items[4]["bad"][0]
    assert sum(len(it["bad"]) for it in items) == 2
    with pytest.raises(DataError, match=r"(?s)2 of 6 images unreadable .*1.png"):
        check_bad_fraction(2, 6, 0.1, [b for it in items for b in it["bad"]])
    check_bad_fraction(2, 6, 0.5, [])  # under the threshold: no error


def test_truncation_is_counted(tmp_path):
    tok = get_tokenizer("holi-tiny")  # context 32
    texts = ["short", "word " * 50]
    assert token_lengths(tok, texts)[1] > 32 >= token_lengths(tok, texts)[0]
    collate = Collate(tok, 32)
    item = {"image": torch.zeros(3, 4, 4), "texts": texts, "index": 0, "bad": []}
    batch = collate([item])
    assert batch["texts"].shape == (1, 2, 32) and batch["truncated"] == 1


def test_sampler_splits_global_batch_and_resumes():
    one = ResumableBatchSampler(20, 8, seed=3)
    ranks = [ResumableBatchSampler(20, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(1)
    for full, a, b in zip(one, *ranks):
        assert full == a + b
    s = ResumableBatchSampler(20, 8, seed=3)
    s.set_epoch(1)
    all_batches = list(s)
    s.set_epoch(1, start_batch=1)
    assert list(s) == all_batches[1:]
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 4)

"""Readers for COCO, Karpathy, long-caption files, Urban1k, our manifests, ImageFolder, masks."""
from __future__ import annotations

import json

import pytest

from holiclip.data.records import DataError
from holiclip.evaluation.datasets import (
    detect_format,
    load_retrieval,
    load_segmentation,
    load_templates,
    read_image_folder,
)


def test_coco_captions(tmp_path):
    doc = {
        "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 9, "caption": " b1 "}, {"image_id": 7, "caption": "a1"}, {"image_id": 9, "caption": "b2"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    d = load_retrieval(tmp_path / "captions.json", image_root=tmp_path / "imgs")
    assert d.images == [str(tmp_path / "imgs" / "a.jpg"), str(tmp_path / "imgs" / "b.jpg")]
    assert d.texts == ["b1", "a1", "b2"] and d.text_to_image == [1, 0, 1]
    doc["annotations"].append({"image_id": 3, "caption": "x"})
    (tmp_path / "captions.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"captions.json: annotations\[3\]"):
        load_retrieval(tmp_path / "captions.json")


def test_karpathy_split(tmp_path):
    doc = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "cocoid": 1, "sentences": [{"raw": "s1"}, {"raw": "s2"}]},
        {"filepath": "val2014", "filename": "y.jpg", "split": "val", "sentences": [{"raw": "v"}]},
        {"filename": "z.jpg", "split": "test", "sentences": [{"raw": "s3"}]},
    ]}
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(doc))
    assert detect_format(p) == "karpathy"
    d = load_retrieval(p)
    assert d.name == "coco-test" and d.texts == ["s1", "s2", "s3"] and d.text_to_image == [0, 0, 1]
    assert d.images[0].endswith("val2014/x.jpg")
    with pytest.raises(DataError, match="no images with split 'restval'"):
        load_retrieval(p, split="restval")


def test_long_caption_formats(tmp_path):
    share = [
        {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nDescribe"}, {"from": "gpt", "value": "Long a."}]},
        {"image_path": "b.jpg", "long_caption": "Long b."},
    ]
    (tmp_path / "share.json").write_text(json.dumps(share))
    d = load_retrieval(tmp_path / "share.json")
    assert d.texts == ["Long a.", "Long b."] and d.text_to_image == [0, 1]
    (tmp_path / "dci.jsonl").write_text(json.dumps({"file_name": "c.jpg", "text": "t"}) + "\n" + json.dumps({"file_name": "d.jpg"}) + "\n")
    assert detect_format(tmp_path / "dci.jsonl") == "long"
    with pytest.raises(DataError, match=r"dci.jsonl:2: no long caption"):
        load_retrieval(tmp_path / "dci.jsonl")


def test_format_detection_names_the_line_of_a_malformed_first_row(tmp_path):
    (tmp_path / "x.jsonl").write_text('\n{"image": "a.jpg", "caption": \n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: malformed JSON"):
        detect_format(tmp_path / "x.jsonl")


def test_urban1k_folder(tmp_path, solid_image):
    (tmp_path / "image").mkdir()
    (tmp_path / "caption").mkdir()
    for name in ("1", "2"):
        solid_image(tmp_path / "image" / f"{name}.jpg", (10, 20, 30))
        (tmp_path / "caption" / f"{name}.txt").write_text(f"caption {name}\n")
    d = load_retrieval(tmp_path)
    assert d.texts == ["caption 1", "caption 2"] and len(d) == 2


def test_our_manifest_slots_and_limit(tmp_path):
    rows = [{"image": f"{i}.png", "captions": {"web": f"w{i}", "detail": f"d{i}"}} for i in range(3)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    d = load_retrieval(tmp_path / "m.jsonl")
    assert d.texts == ["w0", "d0", "w1", "d1", "w2", "d2"] and d.text_slots[:2] == ["web", "detail"]
    d = load_retrieval(tmp_path / "m.jsonl", slots=["detail"], limit=2)
    assert d.texts == ["d0", "d1"] and d.text_to_image == [0, 1]
    with pytest.raises(DataError, match=r"m.jsonl:1: caption slot 'style'"):
        load_retrieval(tmp_path / "m.jsonl", slots=["style"])


def test_image_folder_and_names(tmp_path, solid_image):
    for cls in ("n02", "n01"):
        (tmp_path / cls).mkdir()
        solid_image(tmp_path / cls / "0.png", (0, 0, 0))
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    d = read_image_folder(tmp_path)
    assert d.classnames == ["n01", "n02"] and d.labels == [0, 1]
    assert read_image_folder(tmp_path, ["cat", "dog"]).classnames == ["cat", "dog"]
    assert read_image_folder(tmp_path, {"n01": "fish", "n02": "eel"}).classnames == ["fish", "eel"]
    with pytest.raises(DataError, match="2 class folders but 3 class names"):
        read_image_folder(tmp_path, ["a", "b", "c"])


def test_templates(tmp_path):
    assert len(load_templates("openai")) == 80
    p = tmp_path / "t.txt"
    p.write_text("a photo of a {}.\n# comment\nan image of {c}\n")
    assert load_templates(str(p)) == ["a photo of a {}.", "an image of {}"]
    p.write_text("no placeholder\n")
    with pytest.raises(DataError, match=r"t.txt:1"):
        load_templates(str(p))


def test_mask_folder_and_manifest(tmp_path, solid_image):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    solid_image(tmp_path / "images" / "a.jpg", (1, 2, 3))
    solid_image(tmp_path / "masks" / "a.png", (0, 0, 0))
    (tmp_path / "classes.txt").write_text("sky\ngrass\n")
    d = load_segmentation(tmp_path)
    assert d.classnames == ["sky", "grass"] and d.masks == [str(tmp_path / "masks" / "a.png")]
    (tmp_path / "classes.json").write_text(json.dumps({"0": "bg", "1": "cat"}))
    (tmp_path / "test.jsonl").write_text(json.dumps({"image": "images/a.jpg", "mask": "masks/a.png", "main": 1}) + "\n")
    d = load_segmentation(tmp_path / "test.jsonl")
    assert d.classnames == ["bg", "cat"] and d.images == [str(tmp_path / "images" / "a.jpg")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "x.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: needs string fields 'image' and 'mask'"):
        load_segmentation(tmp_path / "bad.jsonl")

"""The emoji dataset build: files and fields, the cache, determinism, the held-out artwork style,
`holiclip data emoji`."""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from holiclip.benchmarks.emoji.data import backgrounds as bgs
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.benchmarks.emoji.data.captions import SLOTS
from holiclip.benchmarks.emoji.data.sprites import SpriteBank
from holiclip.cli.data import app

from tests.helpers.emoji import all_rows

TINY = B.preset("tiny")
VARIANT = replace(TINY, seed=5, train=24)  # a user's own build, not the demo's preset


def test_tiny_build_writes_every_split_and_field(tiny):
    root, meta = tiny
    expected = {"train": 40, "val": 8, "test": 12, "test_heldout": 12, "test_heldout_openmoji": 12}
    assert {s: v["n"] for s, v in meta["splits"].items()} == expected
    n_classes, n_bg = meta["n_classes"], meta["n_backgrounds"]
    assert (n_classes, n_bg) == (12, len(bgs.FAMILIES))
    for split, rows in all_rows(root).items():
        assert len(rows) == expected[split]
        for r in rows:
            assert set(r["captions"]) == set(SLOTS) and all(r["captions"][s].strip() for s in SLOTS)
            assert 0 <= r["main"] < n_classes and 0 <= r["background"] < n_bg
            assert r["objects"][0]["class"] == r["main"] and 1 <= len(r["objects"]) <= 4
            assert len({o["class"] for o in r["objects"]}) == len(r["objects"])
            img = Image.open(root / r["image"])
            assert img.size == (64, 64) and img.mode == "RGB"
            assert Image.open(root / r["mask"]).mode == "L" and Image.open(root / r["instance_mask"]).mode == "L"
    cj = B.load_classes(root)
    assert [o["id"] for o in cj["objects"]] == list(range(12))
    assert [b["name"] for b in cj["backgrounds"]] == bgs.FAMILY_NAMES
    assert "{}" in cj["templates"]["object"][0] and cj["slots"] == list(SLOTS)
    assert cj["mask_classes"] == [o["name"] for o in cj["objects"]] and cj["mask_background"] == 255
    assert "OpenMoji" in (root / "LICENSES.md").read_text() and "Apple" in (root / "LICENSES.md").read_text()


def test_web_groups_mark_identical_web_captions(tiny):
    root, meta = tiny
    for split, rows in all_rows(root).items():
        by_group = {}
        for r in rows:
            by_group.setdefault(r["web_group"], set()).add(r["captions"]["web"])
        assert all(len(v) == 1 for v in by_group.values())  # one caption per group
        assert len({next(iter(v)) for v in by_group.values()}) == len(by_group)  # one group per caption
        assert meta["splits"][split]["unique_web_captions"] == len(by_group)


def test_second_build_is_cached_and_params_change_the_key(tiny, sources):
    root, meta = tiny
    t = time.perf_counter()
    again = B.build(root, TINY, sources=sources)
    assert again["cached"] and again["key"] == meta["key"]
    assert time.perf_counter() - t < 1.0
    assert B.build_key(replace(TINY, seed=1), sources) != meta["key"]
    assert B.build_key(replace(TINY, size=48), sources) != meta["key"]


def test_build_is_deterministic(tiny, tmp_path, sources):
    root, meta = tiny
    params = replace(TINY, train=10, val=2, test=3, heldout=2)
    a = B.build(tmp_path / "a", params, sources=sources)
    b = B.build(tmp_path / "b", params, sources=sources)
    assert a["key"] == b["key"]
    for split in a["splits"]:
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
        ia, _ = B.load_split(tmp_path / "a", split)
        ib, _ = B.load_split(tmp_path / "b", split)
        assert np.array_equal(ia, ib)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path, sources):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        B.build(tmp_path, TINY, sources=sources)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_load_split_and_masks(tiny):
    root, _ = tiny
    images, rows = B.load_split(root, "train")
    assert images.dtype == np.uint8 and images.shape == (40, 64, 64, 3) and len(rows) == 40
    png = np.stack([np.asarray(Image.open(root / r["image"])) for r in rows])
    assert np.array_equal(images, png)
    inst = B.load_masks(root, "train", kind="instance")
    assert np.array_equal(inst, np.stack([np.asarray(Image.open(root / r["instance_mask"])) for r in rows]))
    cls = B.load_masks(root, "train")
    png = np.stack([np.asarray(Image.open(root / r["mask"])) for r in rows]).astype(np.int16)
    assert cls.dtype == np.int16 and np.array_equal(cls, np.where(png == 255, -1, png))
    for i, r in enumerate(rows):
        assert set(np.unique(cls[i])) == {-1} | {o["class"] for o in r["objects"]}  # -1 = background
        assert (cls[i] == -1).sum() == (inst[i] == 0).sum()
        for o in r["objects"]:
            assert (cls[i][inst[i] == o["instance"]] == o["class"]).all()
    # Without the cached arrays the loader decodes the PNGs and gets the same result.
    shutil.move(root / "arrays" / "val.images.npy", root / "val.backup")
    try:
        again, _ = B.load_split(root, "val")
        assert np.array_equal(again, np.load(root / "val.backup", allow_pickle=False))
    finally:
        (root / "val.backup").replace(root / "arrays" / "val.images.npy")


def test_heldout_style_shares_no_artwork_with_training(tiny, sources):
    root, _ = tiny
    rows = all_rows(root)
    assert {r["style"] for s in ("train", "val", "test") for r in rows[s]} == {"noto"}
    assert {r["style"] for r in rows["test_heldout"]} == {"twemoji"}
    assert {r["style"] for r in rows["test_heldout_openmoji"]} == {"openmoji"}
    train_family = S.STYLES["noto"].family
    assert all(S.STYLES[s].family != train_family for s in ("twemoji", "openmoji"))
    emojis = [o["emoji"] for o in B.load_classes(root)["objects"]]
    noto = SpriteBank("noto", sources, emojis)
    for style in ("twemoji", "openmoji"):
        bank = SpriteBank(style, sources, emojis)
        for c in range(len(emojis)):
            path = bank.svg_path(emojis[c])
            assert path is not None and path.is_relative_to(sources.art_dirs[style])
            a, b = noto.get(c, 32), bank.get(c, 32)
            # Same emoji, different artwork: the pictures differ clearly.
            diff = np.abs(np.dstack([a[0], a[1]]) - np.dstack([b[0], b[1]])).mean()
            assert diff > 0.04, (style, emojis[c], diff)
    hashes = lambda s: {hashlib.sha256(im.tobytes()).hexdigest() for im in B.load_split(root, s)[0]}
    train = hashes("train")
    assert not train & hashes("test_heldout") and not train & hashes("test_heldout_openmoji")


def test_build_rejects_a_heldout_style_from_the_training_artwork(tmp_path, sources, monkeypatch):
    # emoji-datasource-google is Noto's own artwork: it must never count as held out.
    fake = replace(S.STYLES["twemoji"], name="google", family=S.STYLES["noto"].family)
    monkeypatch.setitem(S.STYLES, "google", fake)
    with pytest.raises(ValueError, match="shares artwork"):
        B.build(tmp_path / "x", replace(TINY, heldout_styles=("google",)), sources=sources)


def test_unknown_heldout_style_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["emoji", "--preset", "tiny", "--heldout-styles", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown held-out style 'nope'; choose from twemoji, openmoji" in res.output, res.output
    assert not (tmp_path / "x").exists()


def test_cli_emoji_builds_and_summarises(tiny):
    root, _ = tiny
    res = CliRunner().invoke(app, ["emoji", "--preset", "tiny", "--out", str(root)])
    assert res.exit_code == 0, res.output
    assert "cached" in res.output and "test_heldout" in res.output and "train.jsonl" in res.output


def test_use_or_build_builds_into_a_new_folder(tmp_path):
    sources = S.require_sources(styles=TINY.heldout_styles)
    meta = B.use_or_build(tmp_path / "new", VARIANT, sources=sources)
    assert meta["cached"] is False and B.is_complete(tmp_path / "new", meta["key"])

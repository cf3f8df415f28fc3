"""Emoji benchmark data: sources, rendering, masks, captions, splits, held-out style, cache.

Uses the installed sources (no network): a missing source makes these tests fail with the
exact install command (run scripts/install_emoji_sources.sh), never skip.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from holiclip.benchmarks.emoji.data import backgrounds as bgs
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.benchmarks.emoji.data.captions import SLOTS, mentioned_classes
from holiclip.benchmarks.emoji.data.classes import EmojiClass, contains_term
from holiclip.benchmarks.emoji.data.scenes import ALPHA_THRESHOLD, Placed, compose
from holiclip.benchmarks.emoji.data.splits import TEST, TRAIN, VAL, combination_table
from holiclip.benchmarks.emoji.data.sprites import SpriteBank, noto_single_glyph, raqm_available

TINY = B.preset("tiny")


@pytest.fixture(scope="module")
def sources():
    # the installed sources: tests never download; a missing source fails with the install commands.
    return S.require_sources(styles=TINY.heldout_styles)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("emoji") / "tiny"
    meta = B.build(root, TINY, sources=sources)
    return root, meta


def _classes(root) -> list[EmojiClass]:
    return [EmojiClass(**{k: v for k, v in o.items() if k != "prompt"}) for o in B.load_classes(root)["objects"]]


def _all_rows(root):
    return {s: B.read_rows(root, s) for s in B.split_names(root)}


# -- sources -------------------------------------------------------------------------
def test_missing_sources_error_names_exact_installs(tmp_path):
    empty = S.Sources(cache_dir=tmp_path)
    missing, commands = S.install_commands(empty, ("twemoji", "openmoji"))
    assert {"Noto Color Emoji font", "emoji-test.txt", "CLDR annotations", "twemoji artwork",
            "openmoji artwork"} <= set(missing)
    assert commands[0].startswith("apt-get update && apt-get install -y ")
    assert commands[0].endswith("fonts-noto-color-emoji unicode-data unicode-cldr-core")
    assert any(c.startswith("npm pack @twemoji/svg@15.0.0") for c in commands)
    assert any(c.startswith("npm pack openmoji@17.0.0") for c in commands)
    err = S.MissingSourcesError(missing, commands)
    assert "fonts-noto-color-emoji" in str(err) and "install_emoji_sources.sh" in str(err)
    assert "make emoji-sources" in str(err)


def test_require_sources_raises_for_missing_artwork(tmp_path, sources):
    # An empty cache has no held-out artwork: this must raise, naming npm pack (it installs nothing).
    with pytest.raises(S.MissingSourcesError, match="npm pack @twemoji/svg"):
        S.require_sources(tmp_path, styles=("twemoji",))
    assert not any(tmp_path.iterdir())


def test_raqm_keeps_zwj_sequences_one_glyph(sources):
    assert raqm_available(), "Pillow lacks raqm: ZWJ emoji would break apart"
    font = SpriteBank("noto", sources, []).font()
    assert noto_single_glyph(font, "\U0001F43B\u200d\u2744\ufe0f")  # polar bear (ZWJ)
    assert not noto_single_glyph(font, "\U0001F43B\u2744\ufe0f")  # bear + snowflake: two glyphs


# -- classes ---------------------------------------------------------------------------
def test_default_classes_are_distinct_and_unambiguous(sources):
    from holiclip.benchmarks.emoji.data.classes import choose_classes

    banks = [SpriteBank(s, sources, []) for s in ("noto", "twemoji", "openmoji")]
    classes = choose_classes(120, sources.emoji_test, sources.cldr,
                             available=lambda e: all(b.can_draw(e) for b in banks))
    assert len(classes) == 120
    assert len({c.emoji for c in classes}) == 120 and len({c.name.lower() for c in classes}) == 120
    assert len({c.group for c in classes}) >= 8
    for a in classes:
        for b in classes:
            if a.id != b.id:
                for t in a.terms():
                    assert not any(contains_term(u, t) for u in b.terms()), (t, b.terms())
        for k in a.keywords:
            assert k.lower() not in bgs.COLOUR_WORDS


# -- build, files, cache ---------------------------------------------------------------
def test_tiny_build_writes_every_split_and_field(tiny):
    root, meta = tiny
    expected = {"train": 40, "val": 8, "test": 12, "test_heldout": 12, "test_heldout_openmoji": 12}
    assert {s: v["n"] for s, v in meta["splits"].items()} == expected
    n_classes, n_bg = meta["n_classes"], meta["n_backgrounds"]
    assert (n_classes, n_bg) == (12, len(bgs.FAMILIES))
    for split, rows in _all_rows(root).items():
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
    for split, rows in _all_rows(root).items():
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


# -- masks ---------------------------------------------------------------------------
def test_masks_match_rendered_pixels(tiny, sources):
    root, _ = tiny
    emojis = [o["emoji"] for o in B.load_classes(root)["objects"]]
    for split, rows in _all_rows(root).items():
        bank = SpriteBank(rows[0]["style"], sources, emojis)
        images, _ = B.load_split(root, split)
        masks = B.load_masks(root, split, kind="instance")
        class_masks = B.load_masks(root, split, kind="class")
        for i, r in enumerate(rows):
            img, mask = images[i], masks[i]
            layout = [Placed(*p) for p in r["layout"]["objects"]]
            bg = bgs.render_background(r["layout"]["background"], 64)
            # The stored layout re-renders to exactly the saved image and mask.
            re_img, re_mask, _ = compose(bg, layout, bank.get)
            assert np.array_equal(re_img, img) and np.array_equal(re_mask, mask)
            # Each object's own alpha, placed on the canvas.
            alphas = np.zeros((len(layout), 64, 64), np.float32)
            for k, p in enumerate(layout):
                alphas[k, p.y:p.y + p.size, p.x:p.x + p.size] = bank.get(p.cls, p.size)[1]
            covered = alphas >= ALPHA_THRESHOLD
            bg8 = np.rint(bg * 255).astype(np.int16)
            assert np.array_equal(mask == 0, ~covered.any(0))
            # Where no object has any alpha, the pixel is pure background.
            empty = (alphas == 0).all(0)
            assert np.abs(img.astype(np.int16) - bg8)[empty].max(initial=0) == 0
            for k, o in enumerate(r["objects"]):
                sel = mask == o["instance"]
                assert o["instance"] == k + 1 and o["area"] == int(sel.sum()) > 0
                assert covered[k][sel].all() and not covered[k + 1:, sel].any()  # topmost covering object
                ys, xs = np.nonzero(sel)
                assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                # Fully opaque, unoccluded pixels show the sprite's own colour, not the background.
                p = layout[k]
                rgb = np.zeros((64, 64, 3), np.float32)
                rgb[p.y:p.y + p.size, p.x:p.x + p.size] = bank.get(p.cls, p.size)[0]
                solid = sel & (alphas[k] >= 0.999) & (alphas[k + 1:] == 0).all(0)
                diff = np.abs(img[solid].astype(np.int16) - np.rint(rgb[solid] * 255).astype(np.int16))
                assert diff.max(initial=0) <= 1
            lut = np.array([-1] + [o["class"] for o in r["objects"]])
            assert np.array_equal(class_masks[i], lut[mask])
            # The main object is the largest visible one (what web captions name).
            areas = [o["area"] for o in r["objects"]]
            assert areas[0] == max(areas)


# -- captions --------------------------------------------------------------------------
def test_captions_mention_exactly_the_scene_objects(tiny):
    root, _ = tiny
    classes = _classes(root)
    web_names_main = n = 0
    for split, rows in _all_rows(root).items():
        for r in rows:
            objs = {o["class"] for o in r["objects"]}
            c = r["captions"]
            assert mentioned_classes(c["detail"], classes) == objs, c["detail"]
            assert mentioned_classes(c["nouns"], classes) == objs, c["nouns"]
            assert mentioned_classes(c["main"], classes) == {r["main"]}, c["main"]
            assert mentioned_classes(c["background"], classes) == set(), c["background"]
            assert mentioned_classes(c["style"], classes) == set(), c["style"]
            web = mentioned_classes(c["web"], classes)
            assert web <= {r["main"]}, c["web"]
            web_names_main += web == {r["main"]}
            n += 1
            # The background caption names the family or one of its shades; style names no colour family.
            fam, shades = bgs.FAMILIES[r["background"]]
            assert any(contains_term(c["background"], s) for s in [fam] + [s for s, _ in shades])
            assert not any(contains_term(c["style"], f) for f in bgs.FAMILY_NAMES)
    assert web_names_main / n > 0.75  # vague alt-texts are the exception


def test_caption_wording_varies(tiny):
    root, _ = tiny
    rows = B.read_rows(root, "train")
    for slot in ("web", "detail", "main", "background"):
        assert len({r["captions"][slot] for r in rows}) >= 0.75 * len(rows), slot
    # Same main class, different wording.
    by_main = {}
    for r in rows:
        by_main.setdefault(r["main"], set()).add(r["captions"]["main"])
    assert max(len(v) for v in by_main.values()) >= 2


def test_style_caption_describes_the_artwork_style(tiny):
    root, _ = tiny
    rows = _all_rows(root)
    assert all(any(w in r["captions"]["style"].lower() for w in ("glossy", "shiny", "shading")) for r in rows["train"])
    assert all("flat" in r["captions"]["style"] for r in rows["test_heldout"])
    assert all("outline" in r["captions"]["style"] for r in rows["test_heldout_openmoji"])


# -- splits ----------------------------------------------------------------------------
def test_test_splits_hold_unseen_combinations(tiny):
    root, meta = tiny
    rows = _all_rows(root)
    train_pairs = {(r["main"], r["background"]) for r in rows["train"]}
    train_sets = {(frozenset(o["class"] for o in r["objects"]), r["background"]) for r in rows["train"]}
    for split in ("val", "test", "test_heldout", "test_heldout_openmoji"):
        for r in rows[split]:
            assert (r["main"], r["background"]) not in train_pairs
            assert (frozenset(o["class"] for o in r["objects"]), r["background"]) not in train_sets
    table = combination_table(12, len(bgs.FAMILIES), 0)
    assert ((table == VAL).sum(1) == 1).all() and ((table == TEST).sum(1) == 2).all()
    for kind in (TRAIN, VAL, TEST):  # every background family occurs in every split
        assert ((table == kind).sum(0) > 0).all()


# -- held-out artwork style --------------------------------------------------------------
def test_heldout_style_shares_no_artwork_with_training(tiny, sources):
    root, _ = tiny
    rows = _all_rows(root)
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
    from typer.testing import CliRunner

    from holiclip.cli.data import app

    res = CliRunner().invoke(app, ["emoji", "--preset", "tiny", "--heldout-styles", "nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown held-out style 'nope'; choose from twemoji, openmoji" in res.output, res.output
    assert not (tmp_path / "x").exists()


# -- backgrounds ---------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", bgs.PATTERNS)
def test_backgrounds_stay_within_their_two_shades(pattern):
    rng = np.random.default_rng(0)
    for fam in range(len(bgs.FAMILIES)):
        spec = bgs.sample_background(rng, fam)
        spec["pattern"] = pattern
        img = bgs.render_background(spec, 32)
        lo = np.minimum(spec["colors"][0], spec["colors"][1]) / 255.0
        hi = np.maximum(spec["colors"][0], spec["colors"][1]) / 255.0
        assert img.shape == (32, 32, 3)
        assert (img >= lo - 1e-5).all() and (img <= hi + 1e-5).all()
        assert json.loads(json.dumps(spec)) == spec  # stored in JSONL rows


# -- CLI -----------------------------------------------------------------------------------
def test_cli_emoji_builds_and_summarises(tiny):
    from typer.testing import CliRunner

    from holiclip.cli.data import app

    root, _ = tiny
    res = CliRunner().invoke(app, ["emoji", "--preset", "tiny", "--out", str(root)])
    assert res.exit_code == 0, res.output
    assert "cached" in res.output and "test_heldout" in res.output and "train.jsonl" in res.output


def test_cli_sources_reports_and_rejects_an_unknown_style(sources):
    from typer.testing import CliRunner

    from holiclip.cli.data import app

    res = CliRunner().invoke(app, ["sources"])
    assert res.exit_code == 0, res.output
    assert "noto" in res.output and "openmoji" in res.output
    res = CliRunner().invoke(app, ["sources", "--styles", "nope"])
    assert res.exit_code == 2 and "unknown artwork style(s) ['nope']" in res.output

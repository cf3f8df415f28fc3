"""The two-style variant of the emoji benchmark: train scenes half Noto, half twemoji, OpenMoji
held out, cached under its own key; the default dataset's key does not move."""
from __future__ import annotations

from collections import Counter

import pytest

from holiclip.benchmarks.emoji import twostyle
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.benchmarks.emoji.data.captions import STYLE_PHRASES


@pytest.fixture(scope="module")
def sources():
    return S.require_sources(styles=("twemoji", "openmoji"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("twostyle") / "tiny"
    return root, twostyle.build(root, twostyle.params("tiny"), sources=sources)


def test_train_split_is_half_each_style_and_says_which(built):
    root, meta = built
    rows = B.read_rows(root, "train")
    assert Counter(r["style"] for r in rows) == {"noto": 20, "twemoji": 20}
    assert [r["id"] for r in rows] == [f"train/{i:06d}" for i in range(40)]  # numbered on across the styles
    for r in rows:
        assert any(p.lower() in r["captions"]["style"].lower() for p in STYLE_PHRASES[r["style"]]), r["captions"]["style"]
    images, _ = B.load_split(root, "train")
    assert images.shape[0] == 40 and B.load_masks(root, "train").shape[0] == 40
    assert meta["train_styles"] == ["noto", "twemoji"]
    assert {s: v["style"] for s, v in meta["splits"].items()} == {
        "train": "noto+twemoji", "val": "noto", "test": "noto", "test_heldout": "openmoji"}


def test_cached_under_its_own_key_and_the_default_key_unchanged(built, sources, tmp_path):
    root, meta = built
    again = twostyle.build(root, twostyle.params("tiny"), sources=sources)
    assert again["cached"] and again["key"] == meta["key"]
    assert meta["key"] != B.build_key(twostyle.params("tiny"), sources)
    # the default builder's key depends only on its own parameters and code
    default = B.build(tmp_path / "default", B.preset("tiny"), sources=sources)
    assert default["key"] == B.build_key(B.preset("tiny"), sources) and "train_styles" not in default


def test_bad_styles_are_refused(tmp_path, sources):
    with pytest.raises(ValueError, match="must start with 'noto'"):
        twostyle.build(tmp_path / "x", twostyle.params("tiny"), train_styles=("twemoji", "noto"), sources=sources)
    with pytest.raises(ValueError, match="share artwork with a training style"):
        twostyle.build(tmp_path / "x", B.preset("tiny"), sources=sources)  # twemoji held out and trained on

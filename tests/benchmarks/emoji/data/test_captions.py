"""Scene captions: each slot mentions exactly the objects it should, in varied wording."""
from __future__ import annotations

from holiclip.benchmarks.emoji.data import backgrounds as bgs
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data.captions import mentioned_classes
from holiclip.benchmarks.emoji.data.classes import EmojiClass, contains_term

from tests.helpers.emoji import all_rows


def _classes(root) -> list[EmojiClass]:
    return [EmojiClass(**{k: v for k, v in o.items() if k != "prompt"}) for o in B.load_classes(root)["objects"]]


def test_captions_mention_exactly_the_scene_objects(tiny):
    root, _ = tiny
    classes = _classes(root)
    web_names_main = n = 0
    for split, rows in all_rows(root).items():
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
    rows = all_rows(root)
    assert all(any(w in r["captions"]["style"].lower() for w in ("glossy", "shiny", "shading")) for r in rows["train"])
    assert all("flat" in r["captions"]["style"] for r in rows["test_heldout"])
    assert all("outline" in r["captions"]["style"] for r in rows["test_heldout_openmoji"])

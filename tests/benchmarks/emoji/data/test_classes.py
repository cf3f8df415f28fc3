"""The default emoji classes: distinct, unambiguous, no colour words."""
from __future__ import annotations

from holiclip.benchmarks.emoji.data import backgrounds as bgs
from holiclip.benchmarks.emoji.data.classes import choose_classes, contains_term
from holiclip.benchmarks.emoji.data.sprites import SpriteBank


def test_default_classes_are_distinct_and_unambiguous(sources):
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

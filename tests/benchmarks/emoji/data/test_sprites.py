"""Sprites: ZWJ sequences stay one glyph."""
from __future__ import annotations

from holiclip.benchmarks.emoji.data.sprites import SpriteBank, noto_single_glyph, raqm_available


def test_raqm_keeps_zwj_sequences_one_glyph(sources):
    assert raqm_available(), "Pillow lacks raqm: ZWJ emoji would break apart"
    font = SpriteBank("noto", sources, []).font()
    assert noto_single_glyph(font, "\U0001F43B\u200d\u2744\ufe0f")  # polar bear (ZWJ)
    assert not noto_single_glyph(font, "\U0001F43B\u2744\ufe0f")  # bear + snowflake: two glyphs

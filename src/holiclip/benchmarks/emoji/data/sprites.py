"""Emoji artwork as small premultiplied RGBA arrays, rendered once per (class, size).

Noto glyphs are drawn with Pillow's raqm layout engine (``embedded_color=True``, size
109, the font's bitmap strike) so ZWJ sequences stay one glyph; SVG styles (twemoji,
OpenMoji) are rasterised with cairosvg. Every base image is cropped to its alpha box and
padded to a square, so a sprite of size s fills an s x s box in every style.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from .sources import STYLES, Sources

NOTO_SIZE = 109  # the only bitmap strike in Noto Color Emoji
SVG_RENDER = 160


def raqm_available() -> bool:
    return bool(features.check("raqm"))


class SpriteBank:
    """Sprites of one artwork style for a list of emoji strings (index = class id)."""

    def __init__(self, style: str, sources: Sources, emojis: list[str]):
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}")
        self.style = STYLES[style]
        self.sources = sources
        self.emojis = list(emojis)
        self._base: dict[int, Image.Image] = {}
        self._sized: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._font = None

    # -- base images ---------------------------------------------------------------
    def font(self) -> ImageFont.FreeTypeFont:
        if self._font is None:
            if self.sources.noto_font is None:
                raise FileNotFoundError("Noto Color Emoji font not found")
            if not raqm_available():
                raise RuntimeError("Pillow lacks raqm: ZWJ emoji would break apart "
                                   "(install a Pillow wheel with raqm, or Debian libraqm0 + libfribidi0)")
            self._font = ImageFont.truetype(str(self.sources.noto_font), NOTO_SIZE,
                                            layout_engine=ImageFont.Layout.RAQM)
        return self._font

    def svg_path(self, emoji: str) -> Path | None:
        d = self.sources.art_dirs.get(self.style.name)
        if d is None:
            return None
        return find_svg(d, emoji, self.style.upper_hex)

    def base(self, cls: int) -> Image.Image:
        """Square RGBA image of class ``cls``, cropped to its alpha box."""
        if cls not in self._base:
            emoji = self.emojis[cls]
            if self.style.kind == "font":
                im = render_noto(self.font(), emoji)
            else:
                path = self.svg_path(emoji)
                if path is None:
                    raise FileNotFoundError(f"{self.style.name}: no SVG for {emoji!r}")
                im = render_svg(path, SVG_RENDER)
            self._base[cls] = square_crop(im)
        return self._base[cls]

    def get(self, cls: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(premultiplied RGB float32 (s, s, 3), alpha float32 (s, s)), both in [0, 1]."""
        key = (cls, size)
        if key not in self._sized:
            # Resize in premultiplied space so edge pixels don't pick up the transparent black.
            im = self.base(cls).convert("RGBa").resize((size, size), Image.LANCZOS)
            arr = np.asarray(im, dtype=np.float32) / 255.0
            alpha = arr[..., 3]
            rgb = np.minimum(arr[..., :3], alpha[..., None])  # clamp LANCZOS overshoot
            self._sized[key] = (rgb, alpha)
        return self._sized[key]

    def can_draw(self, emoji: str) -> bool:
        if self.style.kind == "font":
            return noto_single_glyph(self.font(), emoji)
        return self.svg_path(emoji) is not None


def render_noto(font: ImageFont.FreeTypeFont, emoji: str) -> Image.Image:
    box = font.getbbox(emoji)
    im = Image.new("RGBA", (box[2] + 8, box[3] + 8), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((4, 4), emoji, font=font, embedded_color=True)
    return im


def noto_single_glyph(font: ImageFont.FreeTypeFont, emoji: str) -> bool:
    """True if the emoji renders as one colour glyph (not split into parts, not a tofu box)."""
    box = font.getbbox(emoji)
    width = box[2] - box[0]
    im = render_noto(font, emoji)
    arr = np.asarray(im)
    coloured = (arr[..., 3] > 0).sum() > 500
    # One Noto glyph advances ~136 px at size 109; a broken ZWJ sequence is two or more.
    return coloured and width <= int(1.4 * 136)


def find_svg(folder: Path, emoji: str, upper: bool) -> Path | None:
    """The SVG file of ``emoji``; names differ in case and in keeping U+FE0F."""
    cps = [f"{ord(c):x}" for c in emoji]
    variants = ["-".join(cps), "-".join(c for c in cps if c != "fe0f")]
    if len(cps) > 1 and cps[-1] == "fe0f":
        variants.append("-".join(cps[:-1]))
    for v in variants:
        p = folder / f"{v.upper() if upper else v}.svg"
        if p.is_file():
            return p
    return None


def render_svg(path: Path, size: int) -> Image.Image:
    from holiclip._extras import require

    # lazy: only held-out styles need it
    cairosvg = require("cairosvg", "emoji", "rendering the emoji benchmark's SVG styles")

    png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
    return Image.open(io.BytesIO(png)).convert("RGBA")


def square_crop(im: Image.Image) -> Image.Image:
    """Crop to the alpha bounding box and centre on a transparent square."""
    box = im.getchannel("A").point(lambda a: 255 if a > 8 else 0).getbbox()
    if box is None:
        raise ValueError("empty emoji image")
    im = im.crop(box)
    side = max(im.size)
    out = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    out.paste(im, ((side - im.size[0]) // 2, (side - im.size[1]) // 2))
    return out

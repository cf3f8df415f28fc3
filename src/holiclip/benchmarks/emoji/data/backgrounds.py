"""Scene backgrounds: named colour families, shades and patterns.

The colour *family* (11 of them) is the label for zero-shot background classification;
each family has several named shades so captions vary, and every two-colour pattern uses
two shades of the same family so the label stays unambiguous. A background is described
by a small JSON-able spec (stored in each JSONL row) and rendered from it at any size.
"""
from __future__ import annotations

import numpy as np

# (family, [(shade name, RGB)]). The first shade is the plain family name. Shade names
# avoid object words (no "rose pink", "lemon yellow", "coffee brown", "snow white").
FAMILIES: list[tuple[str, list[tuple[str, tuple[int, int, int]]]]] = [
    ("red", [("red", (205, 30, 35)), ("crimson", (220, 20, 60)), ("scarlet", (250, 40, 10)),
             ("dark red", (135, 5, 10)), ("brick red", (178, 40, 35))]),
    ("orange", [("orange", (255, 140, 0)), ("dark orange", (225, 100, 0)), ("burnt orange", (200, 85, 10)),
                ("light orange", (255, 185, 110)), ("tangerine orange", (245, 130, 30))]),
    ("yellow", [("yellow", (250, 222, 10)), ("golden yellow", (255, 196, 0)), ("pale yellow", (255, 243, 150)),
                ("mustard yellow", (215, 180, 30)), ("canary yellow", (255, 236, 60))]),
    ("green", [("green", (40, 160, 50)), ("dark green", (0, 95, 20)), ("forest green", (34, 120, 34)),
               ("emerald green", (0, 155, 90)), ("light green", (150, 230, 140)), ("olive green", (110, 130, 30))]),
    ("blue", [("blue", (30, 80, 220)), ("navy blue", (10, 20, 120)), ("sky blue", (110, 180, 240)),
              ("royal blue", (65, 105, 225)), ("light blue", (170, 210, 245)), ("cobalt blue", (0, 70, 170))]),
    ("purple", [("purple", (128, 20, 140)), ("violet", (145, 80, 205)), ("lavender", (190, 165, 230)),
                ("dark purple", (70, 10, 100)), ("lilac", (200, 160, 220))]),
    ("pink", [("pink", (255, 150, 200)), ("hot pink", (255, 95, 175)), ("light pink", (255, 200, 220)),
              ("magenta pink", (230, 20, 140)), ("fuchsia", (240, 60, 170))]),
    ("brown", [("brown", (140, 80, 30)), ("dark brown", (85, 48, 20)), ("tan", (200, 160, 110)),
               ("caramel brown", (185, 115, 50)), ("sienna", (160, 82, 45))]),
    ("white", [("white", (250, 250, 250)), ("off-white", (240, 237, 228)), ("ivory", (255, 254, 238)),
               ("pearl white", (236, 236, 232))]),
    ("gray", [("gray", (128, 128, 128)), ("light gray", (190, 190, 190)), ("slate gray", (112, 125, 140)),
              ("dark gray", (80, 80, 80)), ("silver gray", (170, 172, 176))]),
    ("black", [("black", (8, 8, 8)), ("jet black", (18, 18, 20)), ("charcoal", (45, 45, 50)),
               ("near-black", (28, 26, 30))]),
]
FAMILY_NAMES = [f for f, _ in FAMILIES]
PATTERNS = ("solid", "gradient", "stripes", "dots", "checker", "noise")
PATTERN_WEIGHTS = (0.3, 0.2, 0.14, 0.12, 0.1, 0.14)

# Every colour word a background caption can use; classes.py keeps these out of keywords.
COLOUR_WORDS = frozenset(
    w for _, shades in FAMILIES for name, _ in shades for w in name.replace("-", " ").split()
) | frozenset(FAMILY_NAMES) | {"grey", "colour", "color", "colourful", "colorful"}


def sample_background(rng: np.random.Generator, family: int, jitter: int = 10) -> dict:
    """A random background spec of colour family ``family`` (index into FAMILIES)."""
    fam_name, shades = FAMILIES[family]
    pattern = str(rng.choice(PATTERNS, p=np.array(PATTERN_WEIGHTS) / sum(PATTERN_WEIGHTS)))
    i = int(rng.integers(len(shades)))
    j = i
    if pattern != "solid":
        j = int(rng.choice([k for k in range(len(shades)) if k != i]))
    cols = []
    for k in (i, j):
        c = np.array(shades[k][1]) + rng.integers(-jitter, jitter + 1, size=3)
        cols.append([int(v) for v in np.clip(c, 0, 255)])
    return {
        "family": family,
        "family_name": fam_name,
        "pattern": pattern,
        "shades": [shades[i][0], shades[j][0]],
        "colors": cols,
        "angle": float(rng.choice([0.0, 45.0, 90.0, 135.0])) if pattern in ("gradient", "stripes") else 0.0,
        "period": float(rng.uniform(0.12, 0.28)),  # fraction of the image side
        "phase": float(rng.uniform(0, 1)),
        "seed": int(rng.integers(2**31 - 1)),
    }


def render_background(spec: dict, size: int) -> np.ndarray:
    """Render ``spec`` as float32 (size, size, 3) in [0, 1]."""
    c1 = np.asarray(spec["colors"][0], np.float32) / 255.0
    c2 = np.asarray(spec["colors"][1], np.float32) / 255.0
    pattern = spec["pattern"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    u, v = (xx + 0.5) / size, (yy + 0.5) / size  # resolution-independent coordinates
    th = np.deg2rad(spec["angle"])
    proj = u * np.cos(th) + v * np.sin(th)
    period, phase = spec["period"], spec["phase"]
    if pattern == "solid":
        t = np.zeros_like(u)
    elif pattern == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    elif pattern == "stripes":
        t = (np.floor(proj / (period * 0.6) + phase) % 2).astype(np.float32)
    elif pattern == "dots":
        cu, cv = (u / period + phase) % 1.0 - 0.5, (v / period + phase) % 1.0 - 0.5
        t = (np.sqrt(cu**2 + cv**2) < 0.28).astype(np.float32)
    elif pattern == "checker":
        t = ((np.floor(u / period + phase) + np.floor(v / period + phase)) % 2).astype(np.float32)
    elif pattern == "noise":
        t = _value_noise(spec["seed"], size)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    out = c1 * (1.0 - t[..., None]) + c2 * t[..., None]
    return out.astype(np.float32)  # compose() blends in float32; keep one precision end to end


def _value_noise(seed: int, size: int) -> np.ndarray:
    """Blotchy coarse noise plus fine grain, in [0, 1]; depends only on seed and size."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 6)).astype(np.float32)
    # Bilinear upsampling by hand keeps this independent of PIL's resampling details.
    g = np.linspace(0, 5, size, dtype=np.float32)
    i0 = np.minimum(np.floor(g).astype(int), 4)
    f = g - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    up = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
    grain = rng.random((size, size)).astype(np.float32)
    return np.clip(0.7 * up + 0.3 * grain, 0.0, 1.0)

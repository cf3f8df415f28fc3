"""Scene layouts and compositing: 1-4 emoji on a background, with per-pixel masks.

A layout is a list of placed sprites (class, x, y, size) in drawing order; the first one
is the *main* object, drawn largest and at the back, the others smaller and in front.
``compose`` alpha-blends premultiplied sprites over the background and writes an
instance mask: pixel = k (1-based position in the layout) where object k is the topmost
object with alpha >= 0.5, 0 elsewhere. Object boxes and areas are measured on that mask,
so they describe what is visible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

ALPHA_THRESHOLD = 0.5
# Probabilities of 1, 2, 3, 4 objects (cut at max_objects and renormalised).
COUNT_PROBS = (0.25, 0.3, 0.25, 0.2)


@dataclass
class Placed:
    cls: int
    x: int  # top-left of the sprite's square box, pixels
    y: int
    size: int  # side of the sprite's square box, pixels

    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclass
class SceneObject:
    """An object as seen in the rendered scene (what rows and captions use)."""

    cls: int
    instance: int  # value in the instance mask
    bbox: list[int]  # [x0, y0, x1, y1] of visible mask pixels, x1/y1 exclusive
    area: int  # visible mask pixels
    size: int  # sprite box side, pixels
    occluded: float  # fraction of the object's own mask hidden by objects in front

    def to_json(self) -> dict:
        return asdict(self)


def sample_count(rng: np.random.Generator, max_objects: int) -> int:
    p = np.array(COUNT_PROBS[:max_objects], dtype=float)
    return int(rng.choice(np.arange(1, len(p) + 1), p=p / p.sum()))


def _overlap(a, b) -> int:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def sample_layout(rng: np.random.Generator, classes: list[int], canvas: int) -> list[Placed]:
    """Place ``classes`` (main first) with varied sizes and positions, limited overlap."""
    n = len(classes)
    lo, hi = (0.5, 0.78) if n == 1 else (0.4, 0.6)
    main_size = int(round(canvas * rng.uniform(lo, hi)))
    placed = [_place(rng, classes[0], main_size, canvas, [])]
    for cls in classes[1:]:
        # Others at most ~70% of the main's side, so the main stays the largest visible object.
        size = int(round(canvas * rng.uniform(0.2, min(0.34, 0.7 * main_size / canvas))))
        placed.append(_place(rng, cls, max(size, 6), canvas, placed))
    return placed


def _place(rng, cls: int, size: int, canvas: int, others: list[Placed]) -> Placed:
    """Random position; may overlap the main object a little ("in front of"), others barely."""
    best, best_cost = None, float("inf")
    for _ in range(40):
        x = int(rng.integers(0, canvas - size + 1))
        y = int(rng.integers(0, canvas - size + 1))
        cand = Placed(cls, x, y, size)
        over_main = _overlap(cand.box(), others[0].box()) / size**2 if others else 0.0
        over_rest = max((_overlap(cand.box(), o.box()) / size**2 for o in others[1:]), default=0.0)
        if over_main <= 0.25 and over_rest <= 0.05:
            return cand
        if over_main + 4 * over_rest < best_cost:
            best, best_cost = cand, over_main + 4 * over_rest
    return best


def compose(background: np.ndarray, layout: list[Placed], sprite) -> tuple[np.ndarray, np.ndarray, list[SceneObject]]:
    """Blend ``layout`` over ``background`` (float32 HxWx3 in [0, 1]).

    ``sprite(cls, size) -> (premultiplied rgb, alpha)``. Returns (uint8 image HxWx3,
    uint8 instance mask HxW, objects).
    """
    canvas = background.astype(np.float32, copy=True)
    h, w = canvas.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    own = []
    for k, p in enumerate(layout, start=1):
        rgb, alpha = sprite(p.cls, p.size)
        ys, xs = slice(p.y, p.y + p.size), slice(p.x, p.x + p.size)
        region = canvas[ys, xs]
        canvas[ys, xs] = rgb + region * (1.0 - alpha[..., None])
        hit = alpha >= ALPHA_THRESHOLD
        mask[ys, xs][hit] = k
        own.append(int(hit.sum()))
    image = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
    objects = []
    for k, p in enumerate(layout, start=1):
        ys, xs = np.nonzero(mask == k)
        area = int(len(ys))
        bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if area else [0, 0, 0, 0]
        objects.append(SceneObject(p.cls, k, bbox, area, p.size, 1.0 - area / max(own[k - 1], 1)))
    return image, mask, objects


def layout_ok(objects: list[SceneObject], max_occlusion: float = 0.35) -> bool:
    """Main (first) strictly the largest visible object; nothing hidden too much."""
    if any(o.area == 0 or o.occluded > max_occlusion for o in objects):
        return False
    return all(objects[0].area > 1.2 * o.area for o in objects[1:])


def position_words(bbox: list[int], canvas: int) -> tuple[str, str]:
    """(row, column) of the box centre on a 3x3 grid: top/middle/bottom, left/center/right."""
    cx, cy = (bbox[0] + bbox[2]) / 2 / canvas, (bbox[1] + bbox[3]) / 2 / canvas
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return row, col


def size_word(size: int, canvas: int) -> str:
    f = size / canvas
    return "large" if f >= 0.5 else "medium-sized" if f >= 0.33 else "small" if f >= 0.22 else "tiny"


def relation(obj: SceneObject, ref: SceneObject) -> str:
    """Where ``obj`` is relative to ``ref`` (obj is drawn in front of ref)."""
    a, b = obj.bbox, ref.bbox
    inter = _overlap(a, b)
    if inter > 0.1 * max((a[2] - a[0]) * (a[3] - a[1]), 1):
        return "in front of"
    dx = (a[0] + a[2]) / 2 - (b[0] + b[2]) / 2
    dy = (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"

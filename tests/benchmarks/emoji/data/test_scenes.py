"""Scenes: the stored layout re-renders to the saved image and masks, pixel for pixel."""
from __future__ import annotations

import numpy as np

from holiclip.benchmarks.emoji.data import backgrounds as bgs
from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data.scenes import ALPHA_THRESHOLD, Placed, compose
from holiclip.benchmarks.emoji.data.sprites import SpriteBank

from tests.helpers.emoji import all_rows


def test_masks_match_rendered_pixels(tiny, sources):
    root, _ = tiny
    emojis = [o["emoji"] for o in B.load_classes(root)["objects"]]
    for split, rows in all_rows(root).items():
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

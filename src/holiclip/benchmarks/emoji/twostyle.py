"""A variant of the emoji benchmark trained on two artwork styles (the paper's ImageNet-R
robustness question): the train split is drawn half in Noto, half in twemoji (each row's
``style`` field and ``style`` caption slot say which), val and test in Noto as in the default
data, and OpenMoji, a third artwork lineage, held out (``test_heldout``).

It is built from the default builder's own pieces (classes, sprites, scenes, captions, splits
and writers of :mod:`.data.build`) with the same parameters otherwise. It lives outside the
``data`` package on purpose: that package's code is part of the default dataset's cache key,
so adding to it would rebuild the default data for every finished run that trained on it.
Its own key covers the default key's inputs, the training styles and this module's code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from .data import backgrounds as bgs
from .data import build as B
from .data.captions import SLOTS, Captioner
from .data.classes import choose_classes
from .data.sources import STYLES, Sources, require_sources
from .data.splits import TEST, TRAIN, VAL, combination_table
from .data.sprites import SpriteBank

log = logging.getLogger(__name__)

TRAIN_STYLES = ("noto", "twemoji")
HELDOUT_STYLES = ("openmoji",)


def params(preset: str = "default") -> B.EmojiParams:
    """The preset's parameters with OpenMoji as the only held-out style."""
    return B.preset(preset, heldout_styles=HELDOUT_STYLES)


def build_key(p: B.EmojiParams, sources: Sources, train_styles=TRAIN_STYLES) -> str:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    versions = {s: sources.versions.get(s) for s in train_styles}
    blob = json.dumps({"base": B.build_key(p, sources), "train_styles": list(train_styles), "versions": versions,
                       "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build(out: Path | str, p: B.EmojiParams | None = None, *, train_styles=TRAIN_STYLES,
          sources: Sources | None = None, force: bool = False) -> dict:
    """Builds (or reuses, when its meta.json holds the same key) the two-style dataset in ``out``."""
    p = p or params()
    out = Path(out)
    train_styles = tuple(train_styles)
    if len(train_styles) < 2 or train_styles[0] != B.TRAIN_STYLE:
        raise ValueError(f"train_styles must start with {B.TRAIN_STYLE!r} (val and test are drawn in it) and "
                         f"name at least two styles, got {list(train_styles)}")
    unknown = [s for s in (*train_styles, *p.heldout_styles) if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown artwork style(s) {unknown}; known: {sorted(STYLES)}")
    trained = {STYLES[s].family for s in train_styles}
    shared = [s for s in p.heldout_styles if STYLES[s].family in trained]
    if shared:
        raise ValueError(f"held-out style(s) {shared} share artwork with a training style {list(train_styles)}")
    if sources is None:
        sources = require_sources(styles=tuple(dict.fromkeys((*train_styles[1:], *p.heldout_styles))))
    key = build_key(p, sources, train_styles)
    if not force and B.is_complete(out, key):
        return {**json.loads((out / "meta.json").read_text()), "root": str(out), "cached": True}
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no emoji dataset; choose another folder")

    t0 = time.perf_counter()
    styles = tuple(dict.fromkeys((*train_styles, *p.heldout_styles)))
    probe = {s: SpriteBank(s, sources, []) for s in styles}
    classes = choose_classes(p.classes, sources.emoji_test, sources.cldr,
                             available=lambda e: all(b.can_draw(e) for b in probe.values()))
    emojis = [c.emoji for c in classes]
    banks = {s: SpriteBank(s, sources, emojis) for s in styles}
    captioner = Captioner(classes, p.size)
    table = combination_table(len(classes), len(bgs.FAMILIES), p.seed)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    train = _train_split(p, train_styles, banks, captioner, table, len(classes))
    train_keys = {B._combo_key(r) for r in train.rows}
    split_stats = {"train": B._write_split(tmp, "train", train, "+".join(train_styles))}
    splits = [("val", B.TRAIN_STYLE, p.val, VAL), ("test", B.TRAIN_STYLE, p.test, TEST)]
    splits += [("test_heldout" if i == 0 else f"test_heldout_{s}", s, p.heldout, TEST)
               for i, s in enumerate(p.heldout_styles)]
    for split_idx, (split, style, n, kind) in enumerate(splits, start=1):
        res = B._build_split(split, split_idx, style, n, kind, p, banks[style], captioner, table, train_keys,
                             len(classes))
        split_stats[split] = B._write_split(tmp, split, res, style)
        log.info("  %s: %d scenes (%s)", split, n, style)
    (tmp / "classes.json").write_text(json.dumps(B._classes_json(classes), indent=1, ensure_ascii=False))
    (tmp / "LICENSES.md").write_text(B._licences(styles))
    meta = {
        "key": key, "builder_version": B.BUILD_VERSION, "params": asdict(p), "sources": sources.versions,
        "train_style": "+".join(train_styles), "train_styles": list(train_styles), "slots": list(SLOTS),
        "n_classes": len(classes), "n_backgrounds": len(bgs.FAMILIES), "splits": split_stats,
        "licences": {s: {"licence": STYLES[s].licence, "attribution": STYLES[s].attribution} for s in styles},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks a complete build
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return {**meta, "root": str(out), "cached": False}


def _train_split(p, train_styles, banks, captioner, table, n_classes) -> B._SplitResult:
    """The train split, an equal share of scenes per style (the first style takes the remainder),
    each share drawn as the default builder draws a split (balanced main objects) with its own
    seed stream; scenes are numbered on across the shares."""
    merged = B._SplitResult()
    k = len(train_styles)
    for i, style in enumerate(train_styles):
        n = p.train // k + (p.train % k if i == 0 else 0)
        # share 0 uses the default train split's stream; the others streams no default split uses
        res = B._build_split("train", 0 if i == 0 else 1000 + i, style, n, TRAIN, p, banks[style], captioner,
                             table, set(), n_classes)
        for row in res.rows:
            name = f"{len(merged.rows):06d}"
            row.update(id=f"train/{name}", image=f"images/train/{name}.png", mask=f"masks/train/{name}.png",
                       instance_mask=f"instances/train/{name}.png")
            merged.rows.append(row)
        merged.images += res.images
        merged.instances += res.instances
        merged.masks += res.masks
    B._assign_web_groups(merged.rows)
    return merged

"""Deterministic, cached build of the emoji benchmark, and fast loaders for it.

Output folder layout::

    train.jsonl val.jsonl test.jsonl test_heldout.jsonl [test_heldout_<style>.jsonl]
    images/<split>/000000.png     RGB scenes
    masks/<split>/000000.png      class-index masks, row["mask"]: pixel = object class id
                                  (classes.json "mask_classes"), 255 = background (the ignore
                                  index of holiclip.evaluation.dense)
    instances/<split>/000000.png  instance masks: 0 background, k = row["objects"][k-1], row["instance_mask"]
    arrays/<split>.images.npy     (N, S, S, 3) uint8, for load_split
    arrays/<split>.masks.npy      (N, S, S) uint8 class-index masks (255 = background)
    arrays/<split>.instances.npy  (N, S, S) uint8 instance masks
    classes.json meta.json LICENSES.md

``build`` returns at once when ``meta.json`` already holds the same key (hash of the
parameters, the source versions and this package's code, classes.txt included), and replaces
a dataset built with another key (a cache). ``use_or_build`` is for a folder the user named:
the dataset there is used as it is, never replaced.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from holiclip.data.records import DataError
from holiclip.io import jsonl_rows

from . import backgrounds as bgs
from .captions import SLOTS, STYLE_PHRASES, Captioner
from .classes import CANDIDATES_FILE, EmojiClass, article, choose_classes
from .scenes import compose, layout_ok, sample_count, sample_layout
from .sources import STYLES, Sources, require_sources
from .splits import TEST, TRAIN, VAL, balanced_mains, combination_table
from .sprites import SpriteBank

log = logging.getLogger(__name__)

BUILD_VERSION = 2
MASK_BACKGROUND = 255  # background value in class-index mask files (= dense evaluation's ignore index)
TRAIN_STYLE = "noto"
OBJECT_TEMPLATES = ["{}.", "a picture of {}.", "an emoji of {}.", "an icon of {}.", "an image showing {}."]
BACKGROUND_TEMPLATES = ["a {} background.", "an image with a {} background.", "emoji on a {} background.",
                        "a plain {} backdrop."]


@dataclass(frozen=True)
class EmojiParams:
    classes: int = 120
    train: int = 8000
    val: int = 500
    test: int = 1000
    heldout: int = 1000  # per held-out style
    size: int = 64
    max_objects: int = 4
    heldout_styles: tuple[str, ...] = ("twemoji", "openmoji")
    seed: int = 0

    def splits(self) -> list[tuple[str, str, int, int]]:
        """(split name, style, n scenes, combination kind) in build order (train first)."""
        out = [("train", TRAIN_STYLE, self.train, TRAIN), ("val", TRAIN_STYLE, self.val, VAL),
               ("test", TRAIN_STYLE, self.test, TEST)]
        for i, st in enumerate(self.heldout_styles):
            out.append(("test_heldout" if i == 0 else f"test_heldout_{st}", st, self.heldout, TEST))
        return out


PRESETS: dict[str, EmojiParams] = {
    "default": EmojiParams(),
    "tiny": EmojiParams(classes=12, train=40, val=8, test=12, heldout=12),
}


def preset(name: str = "default", **overrides) -> EmojiParams:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "heldout_styles" in overrides:
        overrides["heldout_styles"] = tuple(overrides["heldout_styles"])
    return replace(PRESETS[name], **overrides)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _code_digest() -> str:
    """Digest of this package's code and class list: any change to them means a rebuild."""
    here = Path(__file__).parent
    files = sorted(here.glob("*.py")) + [CANDIDATES_FILE]
    return _sha(b"".join(f.name.encode() + f.read_bytes() for f in files))[:16]


def build_key(params: EmojiParams, sources: Sources) -> str:
    styles = (TRAIN_STYLE, *params.heldout_styles)
    versions = {k: v for k, v in sources.versions.items() if k in ("emoji_test", "cldr", *styles)}
    blob = json.dumps({"params": asdict(params), "sources": versions, "builder": BUILD_VERSION,
                       "code": _code_digest()}, sort_keys=True)
    return _sha(blob.encode())[:20]


def is_complete(root: Path | str, key: str | None = None) -> bool:
    meta = Path(root) / "meta.json"
    if not meta.is_file():
        return False
    try:
        m = json.loads(meta.read_text())
    except ValueError:
        return False
    if not isinstance(m, dict):
        return False
    if key is not None and m.get("key") != key:
        return False
    return all((Path(root) / f"{s}.jsonl").is_file() for s in m.get("splits", {}))


@dataclass
class _SplitResult:
    rows: list[dict] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    instances: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)  # class-index


def build(out: Path | str, params: EmojiParams | None = None, *, sources: Sources | None = None,
          cache_dir: Path | str | None = None, force: bool = False) -> dict:
    """Build (or reuse) the dataset in ``out``; returns its meta (plus "root", "cached"). ``sources``
    default to the installed ones (:func:`~.sources.require_sources`: an error names what to install)."""
    params = params or PRESETS["default"]
    out = Path(out)
    for st in params.heldout_styles:
        if st not in STYLES:
            raise ValueError(f"unknown held-out style {st!r}; choose from "
                             + ", ".join(s for s in STYLES if STYLES[s].family != STYLES[TRAIN_STYLE].family))
        if STYLES[st].family == STYLES[TRAIN_STYLE].family:
            raise ValueError(f"held-out style {st!r} shares artwork with the training style")
    if not 1 <= params.classes < MASK_BACKGROUND:
        raise ValueError(f"classes must be 1..{MASK_BACKGROUND - 1} (uint8 class masks, {MASK_BACKGROUND} = background)")
    if sources is None:
        sources = require_sources(cache_dir, styles=params.heldout_styles)
    key = build_key(params, sources)
    if not force and is_complete(out, key):
        meta = json.loads((out / "meta.json").read_text())
        return {**meta, "root": str(out), "cached": True}
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no emoji dataset; choose another --out")

    t0 = time.perf_counter()
    styles = (TRAIN_STYLE, *params.heldout_styles)
    probe = {s: SpriteBank(s, sources, []) for s in styles}
    classes = choose_classes(params.classes, sources.emoji_test, sources.cldr,
                             available=lambda e: all(b.can_draw(e) for b in probe.values()))
    emojis = [c.emoji for c in classes]
    banks = {s: SpriteBank(s, sources, emojis) for s in styles}
    captioner = Captioner(classes, params.size)
    table = combination_table(len(classes), len(bgs.FAMILIES), params.seed)

    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    split_stats, train_keys = {}, set()
    for split_idx, (split, style, n, kind) in enumerate(params.splits()):
        res = _build_split(split, split_idx, style, n, kind, params, banks[style], captioner, table,
                           train_keys, len(classes))
        if split == "train":
            train_keys = {_combo_key(r) for r in res.rows}
        split_stats[split] = _write_split(tmp, split, res, style)
        log.info("  %s: %d scenes (%s)", split, n, style)

    (tmp / "classes.json").write_text(json.dumps(_classes_json(classes), indent=1, ensure_ascii=False))
    (tmp / "LICENSES.md").write_text(_licences(styles))
    meta = {
        "key": key,
        "builder_version": BUILD_VERSION,
        "params": asdict(params),
        "sources": sources.versions,
        "train_style": TRAIN_STYLE,
        "slots": list(SLOTS),
        "n_classes": len(classes),
        "n_backgrounds": len(bgs.FAMILIES),
        "splits": split_stats,
        "licences": {s: {"licence": STYLES[s].licence, "attribution": STYLES[s].attribution} for s in styles},
        "build_seconds": round(time.perf_counter() - t0, 2),
    }
    # meta.json is written last: its presence marks a complete build.
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return {**meta, "root": str(out), "cached": False}


def use_or_build(out: Path | str, params: EmojiParams | None = None, **build_kwargs) -> dict:
    """For a folder the user named: a complete emoji dataset there is used as it is, whatever
    parameters or code version built it (its meta.json says which; differences from ``params``
    are logged); a missing or empty folder gets a fresh build with ``params``; anything else is
    refused with a :class:`DataError`. What is in the folder is never replaced."""
    params = params or PRESETS["default"]
    out = Path(out)
    if is_complete(out):
        meta = json.loads((out / "meta.json").read_text())
        wanted = json.loads(json.dumps(asdict(params)))  # tuples as JSON lists, as in meta.json
        differs = {k: v for k, v in meta.get("params", {}).items() if wanted.get(k) != v}
        note = f"built with {', '.join(f'{k}={v}' for k, v in sorted(differs.items()))}" if differs else "same parameters"
        log.info("using the emoji dataset in %s as it is (%s; %s describes it)", out, note, out / "meta.json")
        return {**meta, "root": str(out), "cached": True}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"{out}: holds no complete emoji dataset (a meta.json naming its splits, and their .jsonl files); "
            f"it is left as it is: name an empty or new folder to build one there"
        )
    log.info("building the emoji benchmark in %s", out)
    return build(out, params, **build_kwargs)


def _combo_key(row: dict) -> tuple:
    return frozenset(o["class"] for o in row["objects"]), row["background"]


def _build_split(split, split_idx, style, n, kind, params, bank, captioner, table, train_keys, n_classes):
    res = _SplitResult()
    mains = balanced_mains(np.random.default_rng([params.seed, split_idx, 1 << 20]), n, n_classes)
    for i in range(n):
        rng = np.random.default_rng([params.seed, split_idx, i])
        main = int(mains[i])
        fams = np.flatnonzero(table[main] == kind)
        fam = int(rng.choice(fams))
        scene = None
        for attempt in range(30):
            # Fall back to fewer objects when a crowded layout keeps failing.
            count = sample_count(rng, params.max_objects if attempt < 20 else 1)
            pool = [c for c in range(n_classes) if c != main]
            others = [int(c) for c in rng.choice(pool, size=count - 1, replace=False)] if count > 1 else []
            combo = (frozenset([main, *others]), fam)
            if kind != TRAIN and combo in train_keys and attempt < 29:
                continue
            layout = sample_layout(rng, [main, *others], params.size)
            spec = bgs.sample_background(rng, fam)
            image, mask, objects = compose(bgs.render_background(spec, params.size), layout, bank.get)
            if layout_ok(objects):
                scene = (layout, spec, image, mask, objects)
                break
        if scene is None:
            raise RuntimeError(f"could not lay out scene {split}/{i}")
        layout, spec, image, mask, objects = scene
        captions = captioner(rng, objects, spec, style, image, mask)
        name = f"{i:06d}"
        res.rows.append({
            "id": f"{split}/{name}",
            "image": f"images/{split}/{name}.png",
            "mask": f"masks/{split}/{name}.png",
            "instance_mask": f"instances/{split}/{name}.png",
            "captions": captions,
            "objects": [{"class": o.cls, "name": captioner.classes[o.cls].name, "instance": o.instance,
                         "bbox": o.bbox, "area": o.area} for o in objects],
            "main": main,
            "background": fam,
            "background_name": spec["family_name"],
            "background_pattern": spec["pattern"],
            "style": style,
            "layout": {"objects": [[p.cls, p.x, p.y, p.size] for p in layout], "background": spec},
        })
        res.images.append(image)
        res.instances.append(mask)
        res.masks.append(class_mask(mask, [o.cls for o in objects]))
    _assign_web_groups(res.rows)
    return res


def _assign_web_groups(rows: list[dict]) -> None:
    """Rows with an identical web caption share ``web_group`` (ids in order of first use)."""
    ids: dict[str, int] = {}
    for r in rows:
        r["web_group"] = ids.setdefault(r["captions"]["web"], len(ids))


def _write_split(root: Path, split: str, res: _SplitResult, style: str) -> dict:
    for sub in ("images", "masks", "instances"):
        (root / sub / split).mkdir(parents=True)
    (root / "arrays").mkdir(exist_ok=True)
    for row, img, m, inst in zip(res.rows, res.images, res.masks, res.instances):
        Image.fromarray(img, "RGB").save(root / row["image"], compress_level=1)
        Image.fromarray(m, "L").save(root / row["mask"], compress_level=1)
        Image.fromarray(inst, "L").save(root / row["instance_mask"], compress_level=1)
    with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for row in res.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    n = len(res.rows)
    shape = (n, *res.images[0].shape) if n else (0, 0, 0, 3)
    np.save(root / "arrays" / f"{split}.images.npy", np.stack(res.images) if n else np.zeros(shape, np.uint8))
    for name, arrs in (("masks", res.masks), ("instances", res.instances)):
        np.save(root / "arrays" / f"{split}.{name}.npy", np.stack(arrs) if n else np.zeros(shape[:3], np.uint8))
    groups = len({r["web_group"] for r in res.rows})
    counts = np.bincount([len(r["objects"]) for r in res.rows], minlength=5)[1:]
    return {
        "n": n,
        "style": style,
        "objects_per_scene": {str(k + 1): int(c) for k, c in enumerate(counts)},
        "unique_web_captions": groups,
        # Best possible strict text->image R@1 with web captions: one hit per caption group.
        "web_strict_r1_ceiling": round(groups / max(n, 1), 4),
    }


def _classes_json(classes: list[EmojiClass]) -> dict:
    return {
        "slots": list(SLOTS),
        "objects": [{**c.to_json(), "prompt": article(c)} for c in classes],
        "backgrounds": [{"id": i, "name": fam, "shades": [s for s, _ in shades]}
                        for i, (fam, shades) in enumerate(bgs.FAMILIES)],
        "patterns": list(bgs.PATTERNS),
        "styles": {s: {"family": st.family, "licence": st.licence, "description": STYLE_PHRASES[s][0]}
                   for s, st in STYLES.items()},
        "templates": {"object": OBJECT_TEMPLATES, "background": BACKGROUND_TEMPLATES},
        # Class-index masks (row "mask"): pixel = object class id, 255 = background (ignored).
        "mask_classes": [c.name for c in classes],
        "mask_background": MASK_BACKGROUND,
        "instance_mask": "row 'instance_mask' / arrays/*.instances.npy: 0 = background, "
                         "k = row['objects'][k-1] (topmost object with alpha >= 0.5)",
    }


def _licences(styles) -> str:
    lines = ["# Licences of the artwork in this dataset", ""]
    for s in styles:
        st = STYLES[s]
        lines.append(f"- {s}: {st.attribution}. Licence: {st.licence}.")
    lines += ["", "Names and keywords: Unicode emoji-test.txt and CLDR annotations (Unicode licence).",
              "No Apple artwork is used. Images built from OpenMoji are CC-BY-SA 4.0 (share alike)."]
    return "\n".join(lines) + "\n"


# -- loaders ---------------------------------------------------------------------------
def read_rows(root: Path | str, split: str) -> list[dict]:
    return [row for _, row in jsonl_rows(Path(root) / f"{split}.jsonl", error=DataError)]


def load_split(root: Path | str, split: str, mmap: bool = False) -> tuple[np.ndarray, list[dict]]:
    """(images uint8 (N, H, W, 3), rows) of a split; decodes PNGs only if the .npy is gone."""
    root = Path(root)
    rows = read_rows(root, split)
    path = root / "arrays" / f"{split}.images.npy"
    if not path.is_file():
        path.parent.mkdir(exist_ok=True)
        arr = np.stack([np.asarray(Image.open(root / r["image"]).convert("RGB")) for r in rows])
        np.save(path, arr)
    images = np.load(path, mmap_mode="r" if mmap else None)
    if len(images) != len(rows):
        raise ValueError(f"{path} has {len(images)} images but {split}.jsonl has {len(rows)} rows")
    return images, rows


def class_mask(instance: np.ndarray, classes: list[int]) -> np.ndarray:
    """Instance mask -> class-index mask (object class id; MASK_BACKGROUND = background)."""
    lut = np.array([MASK_BACKGROUND, *classes], np.uint8)
    return lut[instance]


def load_masks(root: Path | str, split: str, kind: str = "class") -> np.ndarray:
    """Masks (N, H, W): ``class`` int16 (class id, -1 = background) or ``instance`` uint8
    (0 = background, k = row["objects"][k-1]). The PNG/.npy files store background as 255."""
    if kind not in ("class", "instance"):
        raise ValueError("kind must be 'class' or 'instance'")
    root = Path(root)
    name, field_ = ("masks", "mask") if kind == "class" else ("instances", "instance_mask")
    path = root / "arrays" / f"{split}.{name}.npy"
    if not path.is_file():
        rows = read_rows(root, split)
        path.parent.mkdir(exist_ok=True)
        np.save(path, np.stack([np.asarray(Image.open(root / r[field_])) for r in rows]))
    masks = np.load(path)
    if kind == "instance":
        return masks
    out = masks.astype(np.int16)
    out[masks == MASK_BACKGROUND] = -1
    return out


def load_classes(root: Path | str) -> dict:
    return json.loads((Path(root) / "classes.json").read_text(encoding="utf-8"))


def split_names(root: Path | str) -> list[str]:
    return list(json.loads((Path(root) / "meta.json").read_text())["splits"])

"""Evaluation inputs in the formats researchers already have.

Retrieval (:class:`RetrievalData`): our JSONL / CSV / webdataset manifests (one text per chosen
slot), COCO captions JSON (``captions_val2014.json``), the Karpathy split JSON
(``dataset_coco.json`` / ``dataset_flickr30k.json``), long-caption files (ShareGPT4V-style JSON
lists, JSONL with one long caption per image) and the Urban1k folder layout
(``image/NAME.jpg`` + ``caption/NAME.txt``).
Classification (:class:`ClassificationData`): ImageFolder layout (``root/CLASS/IMAGE``).
Both: CLIP_benchmark's webdataset layout (what ``--dataset wds/NAME --dataset_root DIR`` reads),
see :func:`read_clip_benchmark_wds`.
Segmentation (:class:`SegmentationData`): a folder ``images/`` + ``masks/`` (class-index PNGs,
255 = ignore) matched by file stem, or a JSONL with ``image`` and ``mask`` fields (as the built-in
benchmark writes), with class names from a file.

Bad input raises :class:`holiclip.data.records.DataError` naming the file, line or field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.readers import IMAGE_EXTENSIONS, read_samples, resolve_path
from ..data.records import DataError, has_text
from ..data.webdataset import image_member, iter_raw, no_image, sample_id, shard_urls, where
from ..io import jsonl_rows, read_json, read_text

RETRIEVAL_FORMATS = ("auto", "manifest", "coco", "karpathy", "long", "urban1k", "clip-benchmark")
CB_SPLITS = ("test", "train")  # the split folders of CLIP_benchmark's webdataset layout


@dataclass
class RetrievalData:
    images: list  # paths (str) or raw bytes
    texts: list[str]
    text_to_image: list[int]  # image row of each text
    name: str = ""
    image_ids: list[str] = field(default_factory=list)
    text_slots: list[str] = field(default_factory=list)  # slot of each text, where known

    def __post_init__(self):
        if len(self.texts) != len(self.text_to_image):
            raise ValueError("texts and text_to_image differ in length")

    def __len__(self) -> int:
        return len(self.images)

    def drop(self, rows: Sequence[int]) -> "RetrievalData":
        """The data without the images at ``rows`` (e.g. unreadable ones) and their texts;
        the remaining texts still point at their own images."""
        gone = set(rows)
        new_row = {i: k for k, i in enumerate(i for i in range(len(self.images)) if i not in gone)}
        keep = [t for t, i in enumerate(self.text_to_image) if i not in gone]
        return RetrievalData(
            [self.images[i] for i in new_row], [self.texts[t] for t in keep],
            [new_row[self.text_to_image[t]] for t in keep], self.name,
            [self.image_ids[i] for i in new_row] if self.image_ids else [],
            [self.text_slots[t] for t in keep] if self.text_slots else [],
        )


def _root(path: Path, image_root) -> Path:
    return Path(image_root) if image_root else path.parent


def read_manifest_retrieval(path, slots: Sequence[str] | None = None, limit: int | None = None) -> RetrievalData:
    """Our manifests: each image contributes its text in every slot of ``slots`` (all slots
    it has when None). A sample missing a requested slot is an error naming its line."""
    data = RetrievalData([], [], [], name=Path(str(path)).stem)
    for sample in read_samples(path):
        if limit is not None and len(data.images) >= limit:
            break
        wanted = list(slots) if slots else list(sample.captions)
        row = len(data.images)
        for slot in wanted:
            text = sample.captions.get(slot)
            if not has_text(text):
                raise DataError(f"{sample.where}: caption slot {slot!r} missing or empty (slots: {sorted(sample.captions)})")
            data.texts.append(text)
            data.text_to_image.append(row)
            data.text_slots.append(slot)
        data.images.append(sample.image)
        data.image_ids.append(sample.meta.get("id", sample.where))  # shards: the sample id search and captioning use
    return data


def read_coco_captions(path, image_root=None) -> RetrievalData:
    """COCO ``captions_*.json``: ``images`` [{id, file_name}] + ``annotations`` [{image_id, caption}]."""
    path = Path(path)
    doc = read_json(path, DataError)
    if not isinstance(doc, dict) or "images" not in doc or "annotations" not in doc:
        raise DataError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    root = _root(path, image_root)
    data, row_of = RetrievalData([], [], [], name=path.stem), {}
    for i, im in enumerate(doc["images"]):
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        row_of[im["id"]] = len(data.images)
        data.images.append(resolve_path(root, im["file_name"]))
        data.image_ids.append(str(im["id"]))
    for i, ann in enumerate(doc["annotations"]):
        if ann.get("image_id") not in row_of or not isinstance(ann.get("caption"), str):
            raise DataError(f"{path}: annotations[{i}] needs a known 'image_id' and a string 'caption'")
        data.texts.append(ann["caption"].strip())
        data.text_to_image.append(row_of[ann["image_id"]])
    return data


def read_karpathy(path, image_root=None, split: str = "test") -> RetrievalData:
    """Karpathy split JSON (COCO or Flickr30k): ``images`` [{filepath?, filename, split,
    sentences: [{raw}]}]. ``split`` is one of the file's splits: test, val, train, restval."""
    path = Path(path)
    doc = read_json(path, DataError)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{path}: not a Karpathy split file (needs an 'images' list)")
    root = _root(path, image_root)
    data = RetrievalData([], [], [], name=f"{doc.get('dataset', path.stem)}-{split}")
    for i, im in enumerate(doc["images"]):
        if im.get("split") != split:
            continue
        if "filename" not in im or not isinstance(im.get("sentences"), list):
            raise DataError(f"{path}: images[{i}] needs 'filename' and a 'sentences' list")
        rel = Path(im.get("filepath", "")) / im["filename"]
        row = len(data.images)
        data.images.append(resolve_path(root, str(rel)))
        data.image_ids.append(str(im.get("cocoid", im.get("imgid", im["filename"]))))
        for j, sent in enumerate(im["sentences"]):
            text = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}: images[{i}].sentences[{j}] has no string 'raw'")
            data.texts.append(text.strip())
            data.text_to_image.append(row)
    if not data.images:
        raise DataError(f"{path}: no images with split {split!r}")
    return data


_IMAGE_KEYS = ("image", "image_path", "file_name", "filename", "img")
_TEXT_KEYS = ("long_caption", "caption", "text", "conversations")


def _long_text(row: dict, where: str, text_field: str | None) -> str:
    key = text_field or next((k for k in _TEXT_KEYS if k in row), None)
    value = row.get(key) if key else None
    if key == "conversations" and isinstance(value, list):  # ShareGPT4V: the model's answer
        answers = [t.get("value") for t in value if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")]
        value = answers[-1] if answers else None
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: no long caption (looked for {[text_field] if text_field else list(_TEXT_KEYS)})")
    return value.strip()


def read_long_captions(path, image_root=None, text_field: str | None = None) -> RetrievalData:
    """One long caption per image: a JSON list or JSONL of objects with an image field
    (``image``, ``image_path``, ``file_name``...) and a text field (``long_caption``,
    ``caption``, ``text`` or ShareGPT4V ``conversations``)."""
    path = Path(path)
    root = _root(path, image_root)
    if path.suffix == ".jsonl":
        rows = list(jsonl_rows(path, error=DataError))
    else:
        doc = read_json(path, DataError)
        if not isinstance(doc, list):
            raise DataError(f"{path}: a long-caption file is a JSON list of objects")
        rows = [(f"{path}: item {i}", r) for i, r in enumerate(doc)]
    data = RetrievalData([], [], [], name=path.stem)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        key = next((k for k in _IMAGE_KEYS if isinstance(row.get(k), str)), None)
        if key is None:
            raise DataError(f"{where}: no image field (one of {list(_IMAGE_KEYS)})")
        data.texts.append(_long_text(row, where, text_field))
        data.text_to_image.append(len(data.images))
        data.images.append(resolve_path(root, row[key]))
        data.image_ids.append(row[key])
    return data


def read_urban1k(root) -> RetrievalData:
    """Urban1k layout: ``image/NAME.jpg`` with ``caption/NAME.txt``."""
    root = Path(root)
    data = RetrievalData([], [], [], name=root.name)
    images = sorted(p for p in (root / "image").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for img in images:
        cap = root / "caption" / (img.stem + ".txt")
        if not cap.exists():
            raise DataError(f"{img}: no caption file {cap}")
        data.texts.append(read_text(cap, DataError).strip())
        data.text_to_image.append(len(data.images))
        data.images.append(str(img))
        data.image_ids.append(img.stem)
    return data


def is_clip_benchmark_wds(path) -> bool:
    """A folder in CLIP_benchmark's webdataset layout: ``test/`` or ``train/`` holding shards."""
    p = Path(str(path))
    return p.is_dir() and any((p / s).is_dir() and shard_urls(p / s) for s in CB_SPLITS)


def detect_format(path) -> str:
    p = Path(str(path))
    if p.is_dir():
        if (p / "image").is_dir() and (p / "caption").is_dir():
            return "urban1k"
        if shard_urls(p):
            return "manifest"  # a folder of webdataset shards
        if is_clip_benchmark_wds(p):
            return "clip-benchmark"
        raise DataError(f"{p}: a folder must have image/ and caption/ subfolders (Urban1k layout), hold "
                        f"webdataset shards, or test/ or train/ holding them (CLIP_benchmark's layout)")
    text = str(path)
    if text.endswith((".csv", ".tsv")) or shard_urls(path) is not None:
        return "manifest"
    if p.suffix == ".jsonl":
        _, row = next(jsonl_rows(p, error=DataError), (None, {}))  # the first row decides
        return "manifest" if "captions" in row or "caption" in row else "long"
    if p.suffix == ".json":
        doc = read_json(p, DataError)
        if isinstance(doc, list):
            return "long"
        if isinstance(doc, dict) and "annotations" in doc:
            return "coco"
        if isinstance(doc, dict) and isinstance(doc.get("images"), list):
            return "karpathy"
        raise DataError(f"{p}: JSON is neither COCO captions, Karpathy split nor a long-caption list")
    raise DataError(f"{p}: unknown retrieval data format; use --format one of {RETRIEVAL_FORMATS[1:]}")


def load_retrieval(
    path,
    fmt: str = "auto",
    image_root=None,
    split: str = "test",
    slots: Sequence[str] | None = None,
    text_field: str | None = None,
    limit: int | None = None,
) -> RetrievalData:
    """Reads any supported retrieval format (``fmt="auto"`` detects it)."""
    if fmt not in RETRIEVAL_FORMATS:
        raise ValueError(f"format must be one of {RETRIEVAL_FORMATS}, got {fmt!r}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "manifest":
        return read_manifest_retrieval(path, slots, limit)
    if fmt == "coco":
        data = read_coco_captions(path, image_root)
    elif fmt == "karpathy":
        data = read_karpathy(path, image_root, split)
    elif fmt == "long":
        data = read_long_captions(path, image_root, text_field)
    elif fmt == "clip-benchmark":
        data = read_clip_benchmark_wds(path, split)
        if not isinstance(data, RetrievalData):
            raise DataError(f"{path}: a classification set (dataset_type.txt is not 'retrieval'); "
                            f"evaluate it with zeroshot")
    else:
        data = read_urban1k(path)
    return _limit(data, limit)


def _limit(data: RetrievalData, limit: int | None) -> RetrievalData:
    if limit is None or limit >= len(data.images):
        return data
    keep = [i for i, img in enumerate(data.text_to_image) if img < limit]
    return RetrievalData(
        data.images[:limit], [data.texts[i] for i in keep], [data.text_to_image[i] for i in keep], data.name,
        data.image_ids[:limit], [data.text_slots[i] for i in keep] if data.text_slots else [],
    )


# -- classification --------------------------------------------------------------------------
@dataclass
class ClassificationData:
    images: list  # paths (str) or raw bytes
    labels: list[int]
    classnames: list[str]
    name: str = ""
    templates: list[str] | None = None  # the set's own prompt templates, where it has them


def read_names_file(path) -> list[str] | dict:
    """Class names: ``.txt`` one per line (``#`` comments skipped), or ``.json`` list / object."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"class names file not found: {path}")
    if path.suffix == ".json":
        doc = read_json(path, DataError)
        if isinstance(doc, dict):
            for key in ("classes", "names", "classnames", "mask_classes"):
                if isinstance(doc.get(key), list):
                    return [str(c) for c in doc[key]]
            if all(isinstance(v, str) for v in doc.values()):
                return doc
            raise DataError(f"{path}: expected a list of names, {{'classes': [...]}} or {{key: name}}")
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a JSON list of class names")
        return [str(c) for c in doc]
    lines = [ln.strip() for ln in read_text(path, DataError).splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def index_names(names: list[str] | dict, path="class names") -> list[str]:
    """A list, or an ``{"0": name, ...}`` mapping with integer keys, as a list by index."""
    if isinstance(names, list):
        return names
    try:
        by_id = {int(k): v for k, v in names.items()}
    except ValueError:
        raise DataError(f"{path}: keys must be class indices to name mask values") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(f"{path}: class indices must be 0..{len(by_id) - 1} without gaps")
    return [by_id[i] for i in range(len(by_id))]


def read_image_folder(root, classnames: list[str] | dict | None = None) -> ClassificationData:
    """ImageFolder layout. ``classnames``: a list in sorted-folder order (e.g. open_clip's
    ImageNet names for synset folders) or a folder -> name mapping; folder names otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{root}: no class folders (expected root/CLASS/IMAGE)")
    if classnames is None:
        names = [f.name.replace("_", " ") for f in folders]
    elif isinstance(classnames, dict):
        missing = [f.name for f in folders if f.name not in classnames]
        if missing:
            raise DataError(f"class names: no entry for folders {missing[:5]}")
        names = [classnames[f.name] for f in folders]
    else:
        if len(classnames) != len(folders):
            raise DataError(f"{root}: {len(folders)} class folders but {len(classnames)} class names")
        names = list(classnames)
    data = ClassificationData([], [], names, name=root.name)
    for label, folder in enumerate(folders):
        for img in sorted(folder.rglob("*")):
            if img.suffix.lower() in IMAGE_EXTENSIONS:
                data.images.append(str(img))
                data.labels.append(label)
    if not data.images:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
    return data


def read_clip_benchmark_wds(root, split: str = "test") -> ClassificationData | RetrievalData:
    """CLIP_benchmark's webdataset layout (``clip_benchmark_export_wds`` writes it; the Hugging
    Face ``clip-benchmark/wds_*`` datasets hold it): ``root/SPLIT/{0..N-1}.tar`` (N in
    ``SPLIT/nshards.txt``; without it every shard of the folder), each sample an image member
    (webp / png / jpg) and ``cls`` (class index as text) or ``txt`` (the image's captions, one
    per line); ``root/dataset_type.txt`` says ``retrieval`` (else classification), and a
    classification set has ``root/classnames.txt`` (one per line, by index) and
    ``root/zeroshot_classification_templates.txt`` (``{c}`` where the name goes; optional)."""
    root = Path(root)
    folder = root / split
    urls = _cb_shards(folder)
    type_file = root / "dataset_type.txt"
    kind = read_text(type_file, DataError).strip().lower() if type_file.exists() else "classification"
    if kind not in ("classification", "retrieval"):  # multilabel (npy labels) has no task here
        raise DataError(f"{type_file}: dataset type {kind!r} is not supported (classification | retrieval)")
    retrieval = kind == "retrieval"
    member = "txt" if retrieval else "cls"
    if retrieval:
        data = RetrievalData([], [], [], name=root.name)
    else:
        names_file = root / "classnames.txt"
        if not names_file.exists():
            raise DataError(f"{root}: no classnames.txt (one class name per line, by class index)")
        templates_file = root / "zeroshot_classification_templates.txt"
        data = ClassificationData([], [], index_names(read_names_file(names_file), names_file), name=root.name,
                                  templates=load_templates(str(templates_file)) if templates_file.exists() else None)
    for raw in iter_raw(urls, f"reading {folder}"):
        place, ext = where(raw), image_member(raw)
        if ext is None:
            raise DataError(f"{place}: {no_image(raw)}")
        if member not in raw:
            raise DataError(f"{place}: no {member} member ({'captions' if retrieval else 'class index'}) in a "
                            f"{kind} set")
        try:
            value = raw[member].decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{place}: {member} member is not valid UTF-8 (byte {err.start})") from None
        if retrieval:  # CLIP_benchmark's str.splitlines: one caption per line
            captions = [c.strip() for c in value.splitlines() if c.strip()]
            if not captions:
                raise DataError(f"{place}: empty txt member (no captions)")
            data.texts += captions
            data.text_to_image += [len(data.images)] * len(captions)
            data.image_ids.append(sample_id(str(raw["__url__"]), raw["__key__"]))
        else:
            try:
                label = int(value.strip())
            except ValueError:
                raise DataError(f"{place}: cls member {value.strip()[:20]!r} is not a class index") from None
            if not 0 <= label < len(data.classnames):
                raise DataError(f"{place}: class index {label} outside 0..{len(data.classnames) - 1} "
                                f"({root / 'classnames.txt'} has {len(data.classnames)} names)")
            data.labels.append(label)
        data.images.append(raw[ext])
    if not data.images:
        raise DataError(f"{folder}: no samples")
    return data


def _cb_shards(folder: Path) -> list[str]:
    count = folder / "nshards.txt"
    if count.exists():
        text = read_text(count, DataError).strip()
        if not text.isdigit() or int(text) < 1:
            raise DataError(f"{count}: expected the number of shards, got {text[:20]!r}")
        urls = [str(folder / f"{i}.tar") for i in range(int(text))]
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise DataError(f"{count}: says {text} shards but {missing[0]} is missing")
        return urls
    urls = shard_urls(folder) if folder.is_dir() else None
    if not urls:
        raise DataError(f"{folder}: no shards (CLIP_benchmark's layout: {folder}/0.tar ... and nshards.txt)")
    return urls


def load_classification(path, classnames: list[str] | dict | None = None, split: str = "test") -> ClassificationData:
    """An ImageFolder or a CLIP_benchmark webdataset folder (``split`` of it; ``classnames``
    replace the set's own, as CLIP_benchmark's ``--custom_classname_file`` does)."""
    if not is_clip_benchmark_wds(path):
        return read_image_folder(path, classnames)
    data = read_clip_benchmark_wds(path, split)
    if not isinstance(data, ClassificationData):
        raise DataError(f"{path}: a retrieval set (dataset_type.txt says retrieval); evaluate it with retrieval")
    if classnames is not None:
        names = index_names(classnames)
        if len(names) != len(data.classnames):
            raise DataError(f"{path}: {len(data.classnames)} classes but {len(names)} class names given")
        data.classnames = names
    return data


def stratified_subset(labels: Sequence[int], limit: int, seed: int = 0) -> list[int]:
    """Sorted indices of ``limit`` samples taken round-robin over the classes, the classes and
    the samples within each in a seeded random order: a quick check on a class-sorted list
    (an ImageFolder) sees every class instead of the first few. Same seed, same subset."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if limit >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    queues = [rng.permutation(by_class[int(c)]).tolist() for c in rng.permutation(sorted(by_class))]
    picked: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        picked += [q[depth] for q in queues if depth < len(q)][: limit - len(picked)]
        if len(picked) == limit:
            break
    return sorted(picked)


def load_templates(spec: str | None) -> list:
    """``openai`` (open_clip's 80 ImageNet templates), ``simple``, or a text file, one template
    per line with ``{}`` (or ``{c}``) where the class name goes."""
    import open_clip

    if spec in (None, "openai"):
        return list(open_clip.OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(open_clip.SIMPLE_IMAGENET_TEMPLATES)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"templates: {spec!r} is neither 'openai', 'simple' nor a file")
    templates = []
    for lineno, line in enumerate(read_text(path, DataError).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.replace("{c}", "{}")
        if line.count("{}") != 1:
            raise DataError(f"{path}:{lineno}: a template needs exactly one '{{}}' for the class name")
        templates.append(line)
    if not templates:
        raise DataError(f"{path}: no templates")
    return templates


def load_classnames(spec: str | None) -> list[str] | dict | None:
    """``imagenet`` (open_clip's names), a file, or None (folder names)."""
    if spec is None:
        return None
    if spec == "imagenet":
        import open_clip

        return list(open_clip.IMAGENET_CLASSNAMES)
    return read_names_file(spec)


# -- segmentation ----------------------------------------------------------------------------
@dataclass
class SegmentationData:
    images: list[str]
    masks: list[str]  # class-index PNGs (pixel = class id, 255 = ignore)
    classnames: list[str]
    name: str = ""


def _find_classes(root: Path, classes) -> list[str]:
    if isinstance(classes, (list, dict)):
        return index_names(classes)
    if classes is not None:
        return index_names(read_names_file(classes), classes)
    for candidate in ("classes.json", "classes.txt"):
        if (root / candidate).exists():
            return index_names(read_names_file(root / candidate), root / candidate)
    raise DataError(f"{root}: no classes.json / classes.txt; pass the class names file (--classes)")


def read_mask_folder(root, classes=None) -> SegmentationData:
    """``root/images/*`` and ``root/masks/*.png`` matched by stem."""
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise DataError(f"{root}: expected images/ and masks/ subfolders")
    names = _find_classes(root, classes)
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == ".png"}
    data = SegmentationData([], [], names, name=root.name)
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        if img.stem not in masks:
            raise DataError(f"{img}: no mask {mask_dir / (img.stem + '.png')}")
        data.images.append(str(img))
        data.masks.append(str(masks[img.stem]))
    if not data.images:
        raise DataError(f"{img_dir}: no images")
    return data


def read_mask_manifest(path, classes=None, limit: int | None = None) -> SegmentationData:
    """A JSONL whose rows have ``image`` and ``mask`` paths (relative to the file), as the built-in
    benchmark writes; class names from ``classes`` or ``classes.json`` beside the file."""
    path = Path(path)
    names = _find_classes(path.parent, classes)
    data = SegmentationData([], [], names, name=path.stem)
    for where, row in jsonl_rows(path, error=DataError):
        if limit is not None and len(data.images) >= limit:
            break
        if not isinstance(row.get("image"), str) or not isinstance(row.get("mask"), str):
            raise DataError(f"{where}: needs string fields 'image' and 'mask'")
        data.images.append(resolve_path(path.parent, row["image"]))
        data.masks.append(resolve_path(path.parent, row["mask"]))
    if not data.images:
        raise DataError(f"{path}: no rows")
    return data


def load_segmentation(path, classes=None, limit: int | None = None) -> SegmentationData:
    p = Path(path)
    if p.is_dir():
        data = read_mask_folder(p, classes)
        if limit is not None:
            data.images, data.masks = data.images[:limit], data.masks[:limit]
        return data
    return read_mask_manifest(p, classes, limit)

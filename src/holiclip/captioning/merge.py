"""``holiclip caption merge``: caption folders (+ web captions) -> the training JSONL or shards.

Output rows follow the project's training format::

    {"image": "relative/to/the/output/folder.jpg", "captions": {"web": ..., "detail": ...}}

written as a JSONL file (``out``) or as webdataset shards (``shards``: the image's bytes + that
row as the json member, see :mod:`holiclip.data.sharding`). Images captioned from webdataset
shards (keys ``shard.tar::key``) can only go into shards: a JSONL names image files.

Slot names: a perspective captioned by one model is named after the perspective
(``detail``); a perspective captioned by several models gets one slot per model,
``<perspective>@<model alias>`` (``detail@qwen2-vl``), where the alias is the last path part
of the model name in lower case unless ``--alias MODEL=ALIAS`` says otherwise. ``always``
suffixing keeps names stable when models are added later. Slots from the web-captions file
keep their names (a VLM perspective of the same name is then suffixed).

Empty and refused captions count as missing (see ``quality``), then the project's
missing-slot policy applies (``error`` | ``drop`` | ``fill:<slot>``, implemented in
``holiclip.data.records``). With ``error``, every image is checked first so the message
gives the first offender's file and line *and* how many images miss which slot.

Memory: the merge holds all texts in memory (about 1-2 GB per million images with 5 texts).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from holiclip.data.readers import read_jsonl
from holiclip.data.records import DataError, apply_missing_slot_policy, parse_policy
from holiclip.data.sharding import ShardReport, ShardRow, write_shards
from holiclip.data.webdataset import ID_SEP, SHARD_EXTS, read_webdataset, shard_urls, split_sample_id
from holiclip.io import atomic_path

from .perspectives import PAPER_PERSPECTIVES
from .quality import MISSING_FLAGS, caption_flags, is_caption
from .sources import ImageSource, file_key
from .store import ReadProblems, caption_files, read_failures, read_rows


class MergeError(DataError):
    pass


@dataclass
class Caption:
    text: str
    finish_reason: str | None
    where: str  # "file:line"


@dataclass
class CaptionTable:
    """Texts per image, keyed by (perspective, model) for VLM rows, (slot, None) for files."""

    by_image: dict[str, dict[tuple[str, str | None], Caption]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # image -> first "file:line" seen
    duplicates_ignored: int = 0
    problems: ReadProblems = field(default_factory=ReadProblems)
    failed: set = field(default_factory=set)  # (perspective, model) keys with a failed request (failures.jsonl)

    def keys(self) -> set[tuple[str, str | None]]:
        """Every slot key seen: captioned, or asked for and failed (a slot whose requests all failed is a slot)."""
        return {k for caps in self.by_image.values() for k in caps} | self.failed

    def add_failure(self, image: str, key: tuple[str, str], where: str) -> None:
        """A request ``caption run`` gave up on: the image is known, that slot stays missing until captioned."""
        self.by_image.setdefault(image, {})
        self.origin.setdefault(image, where)
        self.failed.add(key)

    def add(self, image: str, key: tuple[str, str | None], cap: Caption) -> None:
        slots = self.by_image.setdefault(image, {})
        self.origin.setdefault(image, cap.where)
        if key in slots:  # e.g. the same run merged twice: first one wins, a caption over a refusal
            self.duplicates_ignored += 1
            if is_caption(cap.text) and not is_caption(slots[key].text):
                slots[key] = cap  # re-captioned after an older version kept the refused row
            return
        slots[key] = cap


def _abs_key(image: str, base: Path) -> str:
    return image if ID_SEP in image else file_key(image, base)


def read_caption_dir(folder: str | os.PathLike, table: CaptionTable) -> None:
    folder = Path(folder)
    files = caption_files(folder)
    if not files:
        raise MergeError(f"{folder}: no captions*.jsonl in this folder")
    for path in files:
        for where, row in read_rows(path, table.problems):
            table.add(
                _abs_key(str(row["image"]), folder),
                (str(row["perspective"]), str(row["model"])),
                Caption(str(row["text"]), row.get("finish_reason"), where),
            )
    # Requests that failed (refused, unreadable, given up on): an image whose every request failed
    # has no caption row, yet it is not captioned; merge and stats count it as `caption run` does.
    for where, row in read_failures(folder, table.problems):
        table.add_failure(_abs_key(str(row["image"]), folder), (str(row["perspective"]), str(row["model"])), where)


def read_training_jsonl(path: str | os.PathLike, table: CaptionTable,
                        list_slots: Sequence[str] | None = ("web",)) -> None:
    """Our training JSONL (``captions`` object) or the research format (``caption`` list,
    positions named by ``list_slots``; a single string goes to the first name)."""
    for sample in read_jsonl(path, list_slots):
        image = os.path.abspath(sample.image)
        for slot, text in sample.captions.items():
            if text is not None and not isinstance(text, str):
                raise MergeError(f"{sample.where}: caption slot {slot!r} is not a string")
            table.add(image, (slot, None), Caption(text or "", None, sample.where))


def read_web_captions(source: str | os.PathLike, table: CaptionTable,
                      list_slots: Sequence[str] | None = ("web",)) -> None:
    """Web captions from a training JSONL (:func:`read_training_jsonl`) or from the webdataset shards
    the images came from (img2dataset's ``txt`` member or json ``caption``), keyed as
    ``caption run`` keys images inside shards (``<absolute shard path>::<key>``)."""
    src = str(source)
    if not (Path(src).is_file() and not src.endswith(SHARD_EXTS)) and ImageSource(src).kind == "webdataset":
        for sample in read_webdataset(shard_urls(src), list_slots):
            for slot, text in sample.captions.items():
                if isinstance(text, str):
                    table.add(sample.meta["id"], (slot, None), Caption(text, None, sample.where))
        return
    read_training_jsonl(source, table, list_slots)


def read_inputs(inputs: Iterable[str | os.PathLike], list_slots: Sequence[str] | None = ("web",),
                table: CaptionTable | None = None) -> CaptionTable:
    """Caption folders and/or training JSONL files into one table."""
    table = table or CaptionTable()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            read_caption_dir(p, table)
        elif p.is_file():
            read_training_jsonl(p, table, list_slots)
        else:
            raise MergeError(f"{p}: no such caption folder or JSONL file")
    return table


def model_alias(model: str, aliases: Mapping[str, str] | None = None) -> str:
    if aliases and model in aliases:
        return aliases[model]
    return model.rstrip("/").rsplit("/", 1)[-1].lower()


def assign_slot_names(keys: Iterable[tuple[str, str | None]], aliases: Mapping[str, str] | None = None,
                      model_suffix: str = "auto") -> dict[tuple[str, str | None], str]:
    """Slot name for every (perspective, model) / (slot, None) key; see the module docstring."""
    if model_suffix not in ("auto", "always"):
        raise ValueError(f"model_suffix must be 'auto' or 'always', got {model_suffix!r}")
    keys = set(keys)
    fixed = {p for p, m in keys if m is None}
    models_of: dict[str, set[str]] = {}
    for p, m in keys:
        if m is not None:
            models_of.setdefault(p, set()).add(m)
    names: dict[tuple[str, str | None], str] = {(p, None): p for p in fixed}
    for p, models in models_of.items():
        suffix = model_suffix == "always" or len(models) > 1 or p in fixed
        by_alias: dict[str, str] = {}
        for m in sorted(models):
            alias = model_alias(m, aliases)
            if suffix and alias in by_alias:
                raise MergeError(
                    f"models {by_alias[alias]!r} and {m!r} both shorten to {alias!r} for perspective "
                    f"{p!r}; name them apart with --alias MODEL=ALIAS"
                )
            by_alias[alias] = m
            names[(p, m)] = f"{p}@{alias}" if suffix else p
    return names


def default_slot_order(names: Iterable[str]) -> list[str]:
    """web first, then the paper's perspectives in registry order, then the rest by name."""
    order = {p: k for k, p in enumerate(PAPER_PERSPECTIVES)}

    def key(name: str):
        base = name.split("@", 1)[0]
        return (0 if name == "web" else 1, order.get(base, len(order)), base, name)

    return sorted(set(names), key=key)


@dataclass
class MergeReport:
    out: str = ""
    slots: list[str] = field(default_factory=list)
    images: int = 0
    written: int = 0
    dropped: int = 0
    filled: int = 0
    missing: Counter = field(default_factory=Counter)  # slot -> images without it
    missing_examples: list[str] = field(default_factory=list)
    flagged_as_missing: Counter = field(default_factory=Counter)  # slot -> empty/refused texts
    truncated: Counter = field(default_factory=Counter)
    duplicates_ignored: int = 0
    problems: list[str] = field(default_factory=list)
    shards: ShardReport | None = None  # when written as shards


def named_captions(table: CaptionTable, names: Mapping[tuple[str, str | None], str]) -> dict[str, dict[str, Caption]]:
    return {img: {names[k]: c for k, c in caps.items()} for img, caps in table.by_image.items()}


def merge_captions(
    caption_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    shards: str | os.PathLike | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    progress: bool = False,
    web_captions: str | os.PathLike | None = None,
    list_slots: Sequence[str] | None = ("web",),
    slots: Sequence[str] | None = None,
    missing: str = "error",
    aliases: Mapping[str, str] | None = None,
    model_suffix: str = "auto",
    keep_flagged: bool = False,
    max_examples: int = 10,
    tokenizer=None,
) -> MergeReport:
    """Builds the training JSONL at ``out`` (written atomically), or shards in the folder
    ``shards`` (``shard_size`` samples each, ``workers`` processes, resumable; with ``tokenizer``,
    pre-tokenised: :mod:`holiclip.data.tokens`), and returns a report."""
    if (out is None) == (shards is None):
        raise MergeError("give one output: a training JSONL (out) or a shard folder (shards)")
    if tokenizer is not None and shards is None:
        raise MergeError("a tokenizer stores token ids in shards; a training JSONL has no place for them: "
                         "write shards (shards=DIR) or leave the tokenizer out")
    parse_policy(missing)  # fail on a bad policy before reading millions of rows
    table = CaptionTable()
    if web_captions is not None:
        read_web_captions(web_captions, table, list_slots)
    read_inputs(caption_dirs, list_slots, table)
    names = assign_slot_names(table.keys(), aliases, model_suffix)
    slots = choose_slots(default_slot_order(names.values()), slots, missing)
    rep = MergeReport(out=str(out if shards is None else shards), slots=slots,
                      duplicates_ignored=table.duplicates_ignored, problems=table.problems.items)
    rows = usable_texts(table, named_captions(table, names), rep, keep_flagged, max_examples)
    if shards is None:
        _refuse_shard_images(rows, table.origin)
    if missing == "error":
        _refuse_missing(rows, rep, table.origin)
    if shards is None:
        _write_rows(Path(out), rows, missing, table.origin, rep)
    else:
        _write_shards(Path(shards), rows, missing, table.origin, rep, shard_size, workers, progress, tokenizer)
    return rep


# (image, slot -> usable text, slots it lacks)
Row = tuple[str, dict[str, str], list[str]]


def choose_slots(available: list[str], slots: Sequence[str] | None, missing: str) -> list[str]:
    """The requested slots (checked against the inputs, duplicates dropped), else all found."""
    if slots:
        unknown = [s for s in slots if s not in available]
        if unknown:
            raise MergeError(f"--slots {unknown} not found in the inputs; available slots: {', '.join(available)}")
        slots = list(dict.fromkeys(slots))
    else:
        slots = available
    if missing.startswith("fill:") and missing[5:] not in available:
        raise MergeError(f"--missing {missing}: slot {missing[5:]!r} is not in the inputs ({', '.join(available)})")
    return list(slots)


def usable_texts(table: CaptionTable, per_image: Mapping[str, Mapping[str, Caption]], rep: MergeReport,
                 keep_flagged: bool, max_examples: int) -> list[Row]:
    """Each image's texts for ``rep.slots`` (empty/refused ones left out unless ``keep_flagged``),
    sorted by image; counts truncated, flagged and missing texts into ``rep``."""
    rows: list[Row] = []
    for image in sorted(per_image):
        caps = per_image[image]
        texts: dict[str, str] = {}
        for slot in rep.slots:
            c = caps.get(slot)
            if c is None:
                continue
            flags = caption_flags(c.text, c.finish_reason)
            if "truncated" in flags:
                rep.truncated[slot] += 1
            if not keep_flagged and MISSING_FLAGS.intersection(flags):
                rep.flagged_as_missing[slot] += 1
                continue
            texts[slot] = c.text
        lacking = [s for s in rep.slots if s not in texts]
        for s in lacking:
            rep.missing[s] += 1
            if len(rep.missing_examples) < max_examples:
                rep.missing_examples.append(f"{table.origin[image]}: {image} has no {s!r}")
        rows.append((image, texts, lacking))
    rep.images = len(rows)
    return rows


def _refuse_missing(rows: list[Row], rep: MergeReport, origin: Mapping[str, str]) -> None:
    """The ``error`` policy: names the first image missing a slot, and how many miss which."""
    first = next(((image, lacking[0]) for image, _, lacking in rows if lacking), None)
    if first is None:
        return
    image, slot = first
    n_bad = sum(1 for _, _, lacking in rows if lacking)
    summary = ", ".join(f"{s}: {n}" for s, n in rep.missing.most_common())
    raise MergeError(
        f"{origin[image]}: image {image!r} has no usable caption for slot {slot!r}; "
        f"{n_bad} of {len(rows)} images miss a slot ({summary}). "
        "Use --missing drop or --missing fill:<slot>, or caption the missing ones (re-run)."
    )


def _refuse_shard_images(rows: list[Row], origin: Mapping[str, str]) -> None:
    """A JSONL names image files; an image read from inside a shard has none (the trainer could not open it)."""
    inside = [image for image, _, _ in rows if ID_SEP in image]
    if inside:
        raise MergeError(
            f"{origin[inside[0]]}: image {inside[0]!r} is inside a webdataset shard, like {len(inside)} of the "
            f"{len(rows)} images; a training JSONL can only name image files. Write shards instead: "
            "replace --out FILE with --shards DIR"
        )


def shard_image(image: str) -> str | tuple[str, str]:
    """An image key as the shard writer takes it: a file path, or (shard path, sample key) for ``shard.tar::key``."""
    return split_sample_id(image) or image


def _write_shards(out: Path, rows: list[Row], missing: str, origin: Mapping[str, str], rep: MergeReport,
                  shard_size: int, workers: int, progress: bool, tokenizer=None) -> None:
    """Applies the missing-slot policy and writes the rows as shards (image bytes + the JSONL row as json)."""
    out_dir = os.path.abspath(out)

    def shard_rows():
        for image, texts, lacking in rows:
            got = apply_missing_slot_policy(texts, rep.slots, missing, origin[image])
            if got is None:
                rep.dropped += 1
                continue
            rep.filled += bool(lacking)
            shown = image if ID_SEP in image else os.path.relpath(image, out_dir)
            yield ShardRow(shard_image(image), {"image": shown, "captions": dict(zip(rep.slots, got))}, origin[image])

    rep.shards = write_shards(shard_rows(), out, shard_size=shard_size, workers=workers, total=len(rows),
                              progress=progress, desc="caption merge", tokenizer=tokenizer)
    rep.written = rep.shards.samples


def _write_rows(out: Path, rows: list[Row], missing: str, origin: Mapping[str, str], rep: MergeReport) -> None:
    """Applies the missing-slot policy and writes the training JSONL; image paths relative to it."""
    out_dir = Path(os.path.abspath(out)).parent  # abspath like the image keys (no symlink resolving)
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a crash never leaves half a training file
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for image, texts, lacking in rows:
            got = apply_missing_slot_policy(texts, rep.slots, missing, origin[image])
            if got is None:
                rep.dropped += 1
                continue
            rep.filled += bool(lacking)
            path = image if ID_SEP in image else os.path.relpath(image, out_dir)
            f.write(json.dumps({"image": path, "captions": dict(zip(rep.slots, got))}, ensure_ascii=False) + "\n")
            rep.written += 1

"""Rows (an image + its named captions) -> webdataset shards: ``holiclip data shard`` and
``holiclip caption merge --shards``.

Layout: ``shard-000000.tar``, ``shard-000001.tar``, ... each holding ``<key>.jpg|png|webp`` (the
image file's own bytes; other formats are converted to PNG once) and ``<key>.json`` with
``{"captions": {slot: text}, ...}``, written with webdataset's ``TarWriter``; ``sizes.json``
beside them maps each shard file to its sample count (the file open_clip and ``data.train``
read for the epoch length). Keys are the row's position (``000001234``), so they are unique
across shards. With a tokenizer (``--tokenizer MODEL``) each sample also holds ``<key>.tokens.npy``,
its captions' token ids, and its json a ``tokens`` field (:mod:`holiclip.data.tokens`).

Shard ``k`` holds rows ``k * shard_size`` to ``(k + 1) * shard_size - 1`` of the input, so its
content depends only on the input. Shards are written in parallel processes, each to a
temporary file renamed into place when complete. A record of each finished shard (a digest of
its rows, its sample count and its problems) is kept in ``.shard-state/``; a re-run after a kill
keeps every finished shard whose rows are unchanged, rewrites half-written or changed ones, and
removes finished shards past the new end. Rows whose image is missing or not an image are left
out, counted and named (``file:line``) in the report.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import tarfile
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ..io import atomic_path, read_json
from .readers import read_samples
from .records import DataError, apply_missing_slot_policy, missing_slots
from . import webdataset as wd
from .tokens import token_members, tokenizer_identity

log = logging.getLogger(__name__)

SHARD_NAME = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-(\d{6,})\.tar$")
STATE_DIR = ".shard-state"
SIZES = "sizes.json"
MTIME = 0.0  # fixed member times: the same rows give the same shard bytes (a redone shard equals the first)
KEEP_PROBLEMS = 50  # per shard, in its record
# PIL format -> member extension the readers take; MPO is a camera JPEG any JPEG decoder reads
MEMBER_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ShardRow:
    """One sample to write: ``image`` is a file path, or ``(tar path, sample key)`` for an image
    inside a webdataset shard; ``payload`` becomes the json member; ``where`` names the row in
    messages (``file:line``)."""

    image: str | tuple[str, str]
    payload: dict
    where: str


@dataclass
class ShardReport:
    out: str = ""
    rows: int = 0  # rows handed to the writer
    samples: int = 0  # samples in the shards
    shards: int = 0  # shard files
    written: int = 0  # shards written by this run
    kept: int = 0  # finished shards kept from an earlier run
    missing_images: int = 0
    unreadable_images: int = 0
    converted: int = 0  # images in another format, stored as PNG
    problems: list[str] = field(default_factory=list)  # first messages, "file:line: why"
    removed: list[str] = field(default_factory=list)  # finished shards past the new end, removed
    sizes: dict[str, int] = field(default_factory=dict)
    # filled by shard_manifest: rows of the manifest left out before writing
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    dropped: int = 0
    dropped_examples: list[str] = field(default_factory=list)


    def lines(self) -> list[str]:
        """The report as console lines (problems named by file:line)."""
        out = [f"{self.samples} samples in {self.shards} shards -> {self.out} "
               f"({self.written} written, {self.kept} kept from an earlier run); sizes: {Path(self.out) / SIZES}"]
        if self.bad_rows:
            out.append(f"malformed rows skipped: {self.bad_rows}; first: " + "; ".join(self.bad_row_examples[:5]))
        if self.dropped:
            out.append(f"rows dropped (missing slot): {self.dropped}; first: " + "; ".join(self.dropped_examples[:5]))
        if self.missing_images or self.unreadable_images:
            out.append(f"rows left out: {self.missing_images} images missing, {self.unreadable_images} unreadable "
                       f"(every shard's first {KEEP_PROBLEMS} in {Path(self.out) / STATE_DIR}/<shard>.json)")
            out.extend(f"  {p}" for p in self.problems[:10])
        if self.converted:
            out.append(f"images stored as PNG (not JPEG / PNG / WebP): {self.converted}")
        if self.removed:
            out.append(f"removed {len(self.removed)} shards past the new end: {', '.join(self.removed[:5])}")
        return out


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


# -- reading images --------------------------------------------------------------------------------
class ImageProblem(Exception):
    """A row's image cannot go into a shard; ``kind`` is ``missing`` or ``unreadable``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _TarImages:
    """Images inside webdataset shards, by (tar path, key): each tar is indexed once (member
    headers only) and read by seeking; the last few tars stay open."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.open: OrderedDict[str, tuple[tarfile.TarFile, dict[str, dict[str, tarfile.TarInfo]]]] = OrderedDict()

    def _index(self, url: str):
        if url in self.open:
            self.open.move_to_end(url)
            return self.open[url]
        from holiclip._extras import require

        # the readers' own key rule
        base_plus_ext = require("webdataset.tariterators", "train", "writing webdataset shards").base_plus_ext

        try:
            tf = tarfile.open(url)
            members: dict[str, dict[str, tarfile.TarInfo]] = {}
            for info in tf:
                if info.isfile():
                    key, ext = base_plus_ext(info.name)
                    if key is not None:
                        members.setdefault(key, {})[ext.lower()] = info
        except FileNotFoundError:
            raise ImageProblem("missing", f"shard not found: {url}") from None
        except (tarfile.TarError, OSError) as err:
            raise ImageProblem("unreadable", f"shard {url} is not a readable tar ({err})") from None
        self.open[url] = (tf, members)
        while len(self.open) > self.keep:
            self.open.popitem(last=False)[1][0].close()
        return self.open[url]

    def read(self, url: str, key: str) -> bytes:
        tf, members = self._index(url)
        found = members.get(key)
        if found is None:
            raise ImageProblem("missing", f"no sample {key!r} in shard {url}")
        ext = wd.image_member(found)  # the readers' own choice of member
        if ext is None:
            raise ImageProblem("missing", f"sample {key!r} in shard {url} has {wd.no_image(found)}")
        try:
            return tf.extractfile(found[ext]).read()
        except (tarfile.TarError, OSError) as err:
            raise ImageProblem("unreadable", f"{url}: {key}.{ext}: {err}") from None


def _read_image(image, tars: _TarImages) -> bytes:
    if isinstance(image, tuple):
        return tars.read(*image)
    try:
        with open(image, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ImageProblem("missing", f"image not found: {image}") from None
    except OSError as err:
        raise ImageProblem("unreadable", f"{image}: {err.strerror or err}") from None


def image_member(data: bytes, name: str) -> tuple[str, bytes, bool]:
    """(member extension, bytes, converted): JPEG / PNG / WebP bytes are kept as they are (the
    format read from the header, not the file name); other formats are converted to PNG once."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            fmt = im.format
    except UnidentifiedImageError:
        raise ImageProblem("unreadable", f"{name}: not an image in a format PIL reads") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageProblem("unreadable", f"{name}: not a readable image ({err})") from None
    if fmt in MEMBER_EXT:
        return MEMBER_EXT[fmt], data, False
    from .loader import UNREADABLE, open_image

    try:
        rgb = open_image(data, max_pixels=None)  # the training decode (bit depth scaled, not clipped)
        buf = io.BytesIO()
        rgb.save(buf, "PNG")
    except (*UNREADABLE, Image.DecompressionBombError) as err:
        raise ImageProblem("unreadable", f"{name}: {fmt} image could not be converted to PNG ({err})") from None
    return "png", buf.getvalue(), True


def _json_bytes(payload: dict) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in a text: escaped JSON stays valid UTF-8
        return json.dumps(payload).encode("ascii")


# -- one shard (runs in a worker process) ----------------------------------------------------------
_TARS: _TarImages | None = None
_TOKENIZER = None  # with --tokenizer: each sample also gets its captions' token ids (holiclip.data.tokens)


def _set_tokenizer(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _write_shard(out: str, index: int, items: list[tuple[str, object, bytes, str]], digest: str) -> dict:
    """Writes shard ``index`` from (key, image, json bytes, where) items; returns its record."""
    from holiclip._extras import require

    wds = require("webdataset", "train", "writing webdataset shards")

    global _TARS
    if _TARS is None:
        _TARS = _TarImages()
    name = shard_name(index)
    final = Path(out) / name
    record = {"digest": digest, "rows": len(items), "count": 0, "missing_images": 0, "unreadable_images": 0,
              "converted": 0, "problems": [], "problem_count": 0}
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh, wds.TarWriter(fh, mtime=MTIME, encoder=False) as sink:
            for key, image, payload, where in items:
                try:
                    data = _read_image(image, _TARS)
                    ext, data, converted = image_member(data, _image_label(image))
                except ImageProblem as problem:
                    record[f"{problem.kind}_images"] += 1
                    record["problem_count"] += 1
                    if len(record["problems"]) < KEEP_PROBLEMS:
                        record["problems"].append(f"{where}: {problem}")
                    continue
                record["converted"] += converted
                sample = {"__key__": key, ext: data, "json": payload}
                if _TOKENIZER is not None:
                    row = json.loads(payload)
                    sample[wd.TOKENS_MEMBER], row["tokens"] = token_members(_TOKENIZER, row["captions"])
                    sample["json"] = _json_bytes(row)
                sink.write(sample)
                record["count"] += 1
    if not record["count"]:  # no image found for any row: no empty shard for readers to trip on
        final.unlink()
    with atomic_path(_record_path(out, name)) as tmp:
        tmp.write_text(json.dumps(record), encoding="utf-8")
    return record


def _image_label(image) -> str:
    return f"{image[0]}::{image[1]}" if isinstance(image, tuple) else str(image)


def _record_path(out: str | Path, name: str) -> Path:
    return Path(out) / STATE_DIR / f"{name}.json"


# -- the writer ------------------------------------------------------------------------------------
def _digest(items: Sequence[tuple[str, object, bytes, str]], tokens: str = "") -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokens.encode() + b"\0")  # the tokenizer of stored ids ("" for none): another one redoes the shard
    for key, image, payload, _ in items:
        for part in (key, _image_label(image)):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
        h.update(payload + b"\0")
    return h.hexdigest()


def _finished(out: Path) -> dict[int, dict]:
    """Records of shards finished by earlier runs (a shard whose tar is gone counts as unfinished)."""
    done = {}
    state = out / STATE_DIR
    if not state.is_dir():
        return done
    for path in state.glob("shard-*.tar.json"):
        m = SHARD_RE.match(path.name[:-5])
        if not m:
            continue
        try:
            record = read_json(path)
        except ValueError:
            continue  # unreadable record: the shard is redone
        if isinstance(record, dict) and (record.get("count") == 0 or (out / path.name[:-5]).is_file()):
            done[int(m.group(1))] = record
    return done


def _remove_partial(out: Path) -> None:
    """Temporary files of shards a killed run was writing (atomic_path's names)."""
    for path in out.glob("shard-*.tar.*.tmp"):
        path.unlink(missing_ok=True)
    for path in (out / STATE_DIR).glob("*.tmp"):
        path.unlink(missing_ok=True)


def _groups(rows: Iterable[ShardRow], shard_size: int, key_width: int) -> Iterator[tuple[int, list]]:
    group: list = []
    index = position = 0
    for row in rows:
        group.append((f"{position:0{key_width}d}", row.image, _json_bytes(row.payload), row.where))
        position += 1
        if len(group) == shard_size:
            yield index, group
            index, group = index + 1, []
    if group:
        yield index, group


def _pool(workers: int, tokenizer=None) -> ProcessPoolExecutor | None:
    if workers <= 1:
        return None
    from holiclip._extras import require

    require("webdataset", "train", "writing webdataset shards")  # imported once here, not in every worker

    # fork where the system has it: workers start at once and share the parent's imports
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                               initializer=_set_tokenizer, initargs=(tokenizer,))


def write_shards(rows: Iterable[ShardRow], out: str | os.PathLike, *, shard_size: int = 1000, workers: int = 1,
                 total: int | None = None, progress: bool = True, desc: str = "shards",
                 report: ShardReport | None = None, tokenizer=None) -> ShardReport:
    """Writes ``rows`` (read once, as they come) into shards under ``out``; see the module docstring.
    With ``tokenizer``, every sample also holds its captions' token ids (:mod:`holiclip.data.tokens`)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; shards go into a folder")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    _remove_partial(out)
    done = _finished(out)
    rep = report or ShardReport()
    rep.out = str(out)
    records: dict[int, dict] = {}
    tokens = tokenizer_identity(tokenizer)["digest"] if tokenizer is not None else ""
    pool = _pool(workers, tokenizer)
    _set_tokenizer(tokenizer)  # for shards written in this process
    pending: dict[Future, int] = {}
    bar = tqdm(total=total, desc=desc, unit=" img", disable=not progress)

    def collect(block: bool) -> None:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED) if block else ([f for f in pending if f.done()], None)
        for f in finished:
            index = pending.pop(f)
            records[index] = f.result()
            rep.written += 1
            bar.update(records[index]["rows"])

    try:
        for index, items in _groups(rows, shard_size, key_width=9):
            digest = _digest(items, tokens)
            record = done.get(index)
            if record is not None and record.get("digest") == digest:
                records[index] = record
                rep.kept += 1
                bar.update(len(items))
                continue
            _record_path(out, shard_name(index)).unlink(missing_ok=True)  # stale until rewritten
            if pool is None:
                records[index] = _write_shard(str(out), index, items, digest)
                rep.written += 1
                bar.update(len(items))
                continue
            pending[pool.submit(_write_shard, str(out), index, items, digest)] = index
            while len(pending) >= 2 * workers:  # bounded: rows are read as shards get written
                collect(block=True)
            collect(block=False)
        while pending:
            collect(block=True)
    finally:
        bar.close()
        _set_tokenizer(None)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    for index in sorted(set(done) - set(records)):  # past the new end: would be read as data
        name = shard_name(index)
        (out / name).unlink(missing_ok=True)
        _record_path(out, name).unlink(missing_ok=True)
        rep.removed.append(name)
    for index in sorted(records):
        r = records[index]
        rep.rows += r["rows"]
        rep.missing_images += r["missing_images"]
        rep.unreadable_images += r["unreadable_images"]
        rep.converted += r["converted"]
        rep.problems.extend(r["problems"][: max(0, 20 - len(rep.problems))])
        if r["count"]:
            rep.sizes[shard_name(index)] = r["count"]
    rep.samples = sum(rep.sizes.values())
    rep.shards = len(rep.sizes)
    with atomic_path(out / SIZES) as tmp:
        tmp.write_text(json.dumps(rep.sizes, indent=1) + "\n", encoding="utf-8")
    if rep.rows and not rep.samples:
        raise DataError(f"{out}: none of the {rep.rows} images could be read; first: "
                        + "; ".join(rep.problems[:3]))
    return rep


def count_lines(path: str | os.PathLike) -> int:
    """Line count of a file (for a progress bar's total), read in blocks."""
    n = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            n += block.count(b"\n")
    return n


def shard_manifest(
    manifest: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 1000, workers: int = 1,
    slots: Sequence[str] | None = None, missing_slot_policy: str = "error", list_slots: Sequence[str] | None = None,
    on_bad_row: str = "error", progress: bool = True, tokenizer=None,
) -> ShardReport:
    """A JSONL / CSV manifest and its image files -> shards under ``out``.

    Each json member holds the row's ``captions`` (only ``slots``, in that order, after the
    missing-slot policy, when ``slots`` is given; else every caption of the row), ``image`` (the
    row's image path, relative to the manifest's folder when inside it) and the row's other fields.
    """
    text = str(manifest)
    if wd.shard_urls(manifest) is not None:
        raise DataError(f"{manifest}: is already webdataset shards; `holiclip data shard` reads a .jsonl / .csv manifest")
    if not Path(manifest).is_file():
        raise DataError(f"{manifest}: no such manifest file")
    base = os.path.abspath(Path(manifest).parent)
    rep = ShardReport()
    stats: dict = {}

    def rows() -> Iterator[ShardRow]:
        for sample in read_samples(manifest, list_slots=list_slots, on_error=on_bad_row, stats=stats):
            captions = sample.captions
            if slots:
                texts = apply_missing_slot_policy(captions, slots, missing_slot_policy, sample.where)
                if texts is None:
                    rep.dropped += 1
                    if len(rep.dropped_examples) < 5:
                        gone = missing_slots(captions, slots)
                        rep.dropped_examples.append(f"{sample.where} (no {', '.join(map(repr, gone))})")
                    continue
                captions = dict(zip(slots, texts))
            path = os.path.abspath(sample.image)
            shown = os.path.relpath(path, base) if path.startswith(base + os.sep) else path
            yield ShardRow(sample.image, {**sample.meta, "image": shown, "captions": captions}, sample.where)

    total = count_lines(manifest) - (1 if text.endswith((".csv", ".tsv")) else 0)
    write_shards(rows(), out, shard_size=shard_size, workers=workers, total=total, progress=progress,
                 desc="data shard", report=rep, tokenizer=tokenizer)
    rep.bad_rows = stats.get("bad_rows", 0)
    rep.bad_row_examples = list(stats.get("bad_examples", []))
    if not rep.rows:
        raise DataError(f"{manifest}: no usable rows (malformed {rep.bad_rows}, dropped {rep.dropped}); first: "
                        + "; ".join(rep.bad_row_examples[:3] + rep.dropped_examples[:3]))
    return rep

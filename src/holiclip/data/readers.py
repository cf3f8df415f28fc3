"""JSONL / CSV / webdataset manifests -> :class:`Sample` streams.

Image paths are resolved relative to the manifest's folder. Malformed rows (torn JSON, bytes
that are not UTF-8, missing fields) raise a :class:`DataError` naming file and line (or are
skipped and counted with ``on_error="skip"``).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator, Sequence

from ..io import jsonl_rows, text_lines
from .records import DataError, Sample, captions_from_row
from .webdataset import IMAGE_MEMBERS, read_webdataset, shard_urls  # noqa: F401  (read_webdataset: imported from here)

IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in IMAGE_MEMBERS)


def resolve_path(folder: str | Path, path: str) -> str:
    """A path written in a file in ``folder``: relative paths are relative to that folder."""
    p = Path(path)
    return str(p if p.is_absolute() else Path(folder) / p)


def read_jsonl(
    path: str | Path, list_slots: Sequence[str] | None = None, on_error: str = "error", stats: dict | None = None
) -> Iterator[Sample]:
    """``stats`` (when given) gets ``bad_rows`` (rows skipped) and ``bad_examples`` (their first messages)."""
    path = Path(path)

    def sample(row: dict, where: str) -> Sample:
        if not isinstance(row.get("image"), str):
            raise DataError(f"{where}: each line must be an object with a string field 'image'")
        caps = captions_from_row(row, where, list_slots)
        meta = {k: v for k, v in row.items() if k not in ("image", "captions", "caption")}
        return Sample(resolve_path(path.parent, row["image"]), caps, where, meta)

    def skipped(message: str) -> None:
        if stats is not None:
            stats["bad_rows"] = stats.get("bad_rows", 0) + 1
            examples = stats.setdefault("bad_examples", [])
            if len(examples) < 5:
                examples.append(message)

    for _, s in jsonl_rows(path, sample, on_error=on_error, skipped=skipped, error=DataError):
        yield s


def read_csv(
    path: str | Path, image_column: str = "image", caption_columns: Sequence[str] | None = None, delimiter: str = ","
) -> Iterator[Sample]:
    """One row per image; every other column (or ``caption_columns``) is a named slot."""
    path = Path(path)
    with open(path, "rb") as fh:
        reader = csv.DictReader(text_lines(fh, path, DataError), delimiter=delimiter)
        if reader.fieldnames is None or image_column not in reader.fieldnames:
            raise DataError(f"{path}:1: no column {image_column!r} in header {reader.fieldnames}")
        columns = list(caption_columns or [c for c in reader.fieldnames if c != image_column])
        missing = [c for c in columns if c not in reader.fieldnames]
        if missing:
            raise DataError(f"{path}:1: caption columns {missing} not in header {reader.fieldnames}")
        header = reader.fieldnames
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row or None in row.values():  # csv fills a short row with None, files a long one's rest under None
                raise DataError(_ragged_row(where, header, row, delimiter))
            yield Sample(resolve_path(path.parent, row[image_column]), {c: row[c] for c in columns}, where)


def _ragged_row(where: str, header: list[str], row: dict, delimiter: str) -> str:
    fields = [(k, v) for k, v in row.items() if k is not None and v is not None] + [
        (None, v) for v in row.get(None) or []]
    shown = ", ".join(f"{k}={v!r}" if k is not None else repr(v) for k, v in fields)
    if None in row:
        return (f"{where}: a row of {len(fields)} fields ({shown}) under a header of {len(header)} "
                f"({delimiter.join(header)}); a field holding {delimiter!r} needs double quotes")
    lacking = [k for k, v in row.items() if v is None]
    return (f"{where}: a short row of {len(fields)} fields ({shown}) under a header of {len(header)} "
            f"({delimiter.join(header)}), no field for {', '.join(lacking)}; an empty caption is an empty "
            f"field ({delimiter!r} twice), a field holding {delimiter!r} needs double quotes")


def read_samples(path: str | Path | Sequence[str], **kwargs) -> Iterator[Sample]:
    """Dispatch on the manifest type: ``.jsonl``, ``.csv``/``.tsv``, or webdataset shards
    (:func:`holiclip.data.webdataset.shard_urls`: ``.tar``, brace patterns, lists, folders of shards)."""
    urls = shard_urls(path)
    if urls is not None:
        return read_webdataset(urls, kwargs.get("list_slots"))
    text = str(path)
    if Path(path).is_dir():
        inside = sorted(p.name for p in Path(path).iterdir() if p.suffix in (".jsonl", ".csv", ".tsv", ".tar"))
        hint = f"; it holds {', '.join(inside[:5])}" if inside else ""
        raise DataError(f"{path}: is a folder; a manifest is a .jsonl / .csv / .tsv file or .tar shards{hint}")
    if text.endswith((".csv", ".tsv")):
        kw = {k: v for k, v in kwargs.items() if k in ("image_column", "caption_columns")}
        return read_csv(path, delimiter="\t" if text.endswith(".tsv") else ",", **kw)
    if not Path(path).exists():
        raise FileNotFoundError(f"manifest not found: {path}")
    kw = {k: v for k, v in kwargs.items() if k in ("list_slots", "on_error", "stats")}
    return read_jsonl(path, **kw)

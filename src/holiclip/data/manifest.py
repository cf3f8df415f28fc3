"""Training manifests held compactly, so that millions of rows fit and DataLoader workers share them.

A manifest read into Python lists costs ~1 kB per row (a str object per path, text and place,
a list per row) and, worse, every forked DataLoader worker that touches a row writes to those
objects' reference counts and so copies the pages that hold them: each worker ends up with its
own copy. Here every column is one UTF-8 byte buffer plus int64 end offsets in numpy arrays:
a handful of Python objects in all, whatever the row count. Reading a row decodes fresh strings
from the buffers and writes nothing shared, so forked workers keep sharing the parent's pages.

Columns whose values repeat a long head (image paths under a few folders, ``file:line`` places
in one file) store each distinct head once and a code per row.
"""
from __future__ import annotations

import logging
import os
from array import array
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .readers import read_samples
from .records import DataError, apply_missing_slot_policy, missing_slots

log = logging.getLogger(__name__)

# JSON may hold lone surrogates ("\ud800"), which strict UTF-8 refuses; they round-trip this way
_ERRORS = "surrogatepass"


class StringColumn:
    """Strings (or bytes, ``binary=True``) packed in one uint8 buffer; ``ends[i]`` is where value i
    stops. Indexing returns a new ``str`` / ``bytes``; a slice returns a list."""

    __slots__ = ("data", "ends", "binary")

    def __init__(self, data: np.ndarray, ends: np.ndarray, binary: bool = False):
        self.data = data
        self.ends = ends
        self.binary = binary

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.ends)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} values")
        raw = self.data[(self.ends[i - 1] if i else 0):self.ends[i]].tobytes()
        return raw if self.binary else raw.decode("utf-8", _ERRORS)

    def __iter__(self) -> Iterator:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.ends.nbytes)


class HeadColumn:
    """Strings cut after the last ``sep`` (``"/"`` for paths, ``":"`` for ``file:line``): each
    distinct head (a folder, a file) is stored once, each row keeps a code and its tail."""

    __slots__ = ("codes", "heads", "tails")

    def __init__(self, codes: np.ndarray, heads: StringColumn, tails: StringColumn):
        self.codes, self.heads, self.tails = codes, heads, tails

    def __len__(self) -> int:
        return len(self.tails)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        tail = self.tails[i]  # checks the index
        return self.heads[int(self.codes[i])] + tail

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.heads.nbytes + self.tails.nbytes)


class TextTable:
    """Every row's M texts in one flat :class:`StringColumn` (row i, slot j at ``i * M + j``);
    ``table[i]`` is row i's list of M strings."""

    __slots__ = ("flat", "num_slots")

    def __init__(self, flat: StringColumn, num_slots: int):
        self.flat, self.num_slots = flat, num_slots

    def __len__(self) -> int:
        return len(self.flat) // self.num_slots if self.num_slots else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        m, lo = self.num_slots, i * self.num_slots
        # the row's M + 1 bounds and bytes in one read each, then cut in Python
        ends = self.flat.ends[lo - 1: lo + m].tolist() if lo else [0, *self.flat.ends[:m].tolist()]
        start = ends[0]
        raw = self.flat.data[start:ends[-1]].tobytes()
        return [raw[a - start:b - start].decode("utf-8", _ERRORS) for a, b in zip(ends, ends[1:])]

    def __iter__(self) -> Iterator[list[str]]:
        for i in range(len(self)):
            yield self[i]

    def iter_all(self) -> Iterator[str]:
        """Every text of every row, row by row (slot order within a row)."""
        return iter(self.flat)

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes


class _StringsBuilder:
    """Appends values to a growing buffer (no Python object per value kept)."""

    def __init__(self, binary: bool = False):
        self.binary = binary
        self._data = bytearray()
        self._ends = array("q")

    def append(self, value) -> None:
        self._data += value if self.binary else value.encode("utf-8", _ERRORS)
        self._ends.append(len(self._data))

    def build(self) -> StringColumn:
        # views of the builder's buffers: no second copy of the data at the end of a long read
        data = np.frombuffer(self._data, dtype=np.uint8) if self._data else np.zeros(0, np.uint8)
        ends = np.frombuffer(self._ends, dtype=np.int64) if self._ends else np.zeros(0, np.int64)
        return StringColumn(data, ends, self.binary)


class _HeadBuilder:
    def __init__(self, sep: str):
        self.sep = sep
        self._codes: dict[str, int] = {}
        self._heads = _StringsBuilder()
        self._rows = array("q")
        self._tails = _StringsBuilder()

    def append(self, value: str) -> None:
        cut = value.rfind(self.sep) + 1
        if self.sep == "/" and os.sep != "/":
            cut = max(cut, value.rfind(os.sep) + 1)
        head = value[:cut]
        code = self._codes.get(head)
        if code is None:
            code = self._codes[head] = len(self._codes)
            self._heads.append(head)
        self._rows.append(code)
        self._tails.append(value[cut:])

    def build(self) -> HeadColumn:
        dtype = np.int32 if len(self._codes) < 2**31 else np.int64
        codes = np.asarray(self._rows, dtype=np.int64).astype(dtype)
        return HeadColumn(codes, self._heads.build(), self._tails.build())


def string_column(values, binary: bool = False) -> StringColumn:
    b = _StringsBuilder(binary)
    for v in values:
        b.append(v)
    return b.build()


def head_column(values, sep: str) -> HeadColumn:
    b = _HeadBuilder(sep)
    for v in values:
        b.append(v)
    return b.build()


def text_table(rows: Sequence[Sequence[str]], num_slots: int) -> TextTable:
    b = _StringsBuilder()
    for texts in rows:
        if len(texts) != num_slots:
            raise ValueError(f"every row needs {num_slots} texts, got {len(texts)}")
        for t in texts:
            b.append(t)
    return TextTable(b.build(), num_slots)


@dataclass
class LoadedManifest:
    """The usable rows of a manifest: ``images[i]`` (a path, or bytes for webdataset shards),
    ``texts[i]`` (its M texts in slot order), ``where[i]`` (``file:line`` / ``shard:key``, for
    messages), plus what was left out and why."""

    images: StringColumn | HeadColumn
    texts: TextTable
    where: HeadColumn
    dropped: int = 0
    bad_rows: int = 0
    path: str = ""
    rows: int = 0  # rows read: used + dropped + malformed
    bad_row_examples: list[str] = field(default_factory=list)
    dropped_examples: list[str] = field(default_factory=list)

    @classmethod
    def from_lists(cls, images: Sequence, texts: Sequence[Sequence[str]], where: Sequence[str],
                   **kwargs) -> "LoadedManifest":
        """A manifest from in-memory rows (tests, tools); the columns are packed as :func:`load_manifest` packs them."""
        if not (len(images) == len(texts) == len(where)):
            raise ValueError(f"images, texts and where differ in length: {len(images)}, {len(texts)}, {len(where)}")
        binary = bool(images) and isinstance(images[0], (bytes, bytearray))
        num_slots = len(texts[0]) if texts else 0
        return cls(string_column(images, True) if binary else head_column(images, "/"),
                   text_table(texts, num_slots), head_column(where, ":"), **kwargs)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def nbytes(self) -> int:
        """Bytes held by the columns (numpy buffers)."""
        return self.images.nbytes + self.texts.nbytes + self.where.nbytes

    def counts(self) -> dict[str, int]:
        return {"rows": self.rows, "bad_rows": self.bad_rows, "dropped": self.dropped}

    def summary(self) -> str | None:
        """What was left out of the manifest and why (None when every row is used)."""
        if not (self.bad_rows or self.dropped):
            return None
        lines = [f"{self.path}: {len(self.images)} of {self.rows} rows used"]
        if self.bad_rows:
            lines.append(f"  {self.bad_rows} malformed rows skipped (data.on_bad_row=skip), first: "
                         + "; ".join(self.bad_row_examples[:3]))
        if self.dropped:
            lines.append(f"  {self.dropped} samples dropped (data.missing_slot_policy=drop), first: "
                         + "; ".join(self.dropped_examples[:3]))
        return "\n".join(lines)

    def report(self) -> None:
        """Logs :meth:`summary` as a warning when rows were left out."""
        text = self.summary()
        if text:
            log.warning("%s", text)


def load_manifest(
    path, slots: Sequence[str], missing_slot_policy: str = "error", list_slots: Sequence[str] | None = None,
    on_bad_row: str = "error",
) -> LoadedManifest:
    """Reads a manifest in one streaming pass into compact columns, applying the missing-slot policy per row."""
    stats: dict = {}
    images = None  # paths, or bytes for shards: chosen by the first sample
    texts, where = _StringsBuilder(), _HeadBuilder(":")
    kept = dropped = 0
    dropped_examples: list[str] = []
    for sample in read_samples(path, list_slots=list_slots, on_error=on_bad_row, stats=stats):
        row_texts = apply_missing_slot_policy(sample.captions, slots, missing_slot_policy, sample.where)
        if row_texts is None:
            dropped += 1
            if len(dropped_examples) < 5:
                gone = missing_slots(sample.captions, slots)
                dropped_examples.append(f"{sample.where} (no {', '.join(map(repr, gone))})")
            continue
        binary = isinstance(sample.image, (bytes, bytearray))
        if images is None:
            images = _StringsBuilder(binary=True) if binary else _HeadBuilder("/")
        elif binary != isinstance(images, _StringsBuilder):
            raise DataError(f"{sample.where}: image is {'bytes' if binary else 'a path'}, unlike the rows before it")
        images.append(sample.image)
        for t in row_texts:
            texts.append(t)
        where.append(sample.where)
        kept += 1
    bad_rows = stats.get("bad_rows", 0)
    out = LoadedManifest(
        images.build() if images is not None else string_column([]), TextTable(texts.build(), len(slots)),
        where.build(), dropped=dropped, bad_rows=bad_rows, path=str(path), rows=kept + dropped + bad_rows,
        bad_row_examples=list(stats.get("bad_examples", [])), dropped_examples=dropped_examples,
    )
    if not kept:
        raise DataError(f"{path}: no usable samples (dropped {dropped}, bad rows {bad_rows})"
                        + (f"\n{out.summary()}" if out.summary() else ""))
    return out

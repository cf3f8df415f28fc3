"""Cache of a frozen text trunk's outputs, one row per unique text, on disk.

With a locked pretrained text tower only the projection trains, so each caption's trunk
output is computed once. The cache belongs to the text trunk: its folder is named by a digest
of the trunk's weights and of the tokenizer, so other text weights (``model.pretrained=``, a
fine-tuned trunk) or another tokenizer never meet old features. It grows: a run computes only
the texts it does not find, so runs on the same data with different slots (CLIP on ``web``,
O2M on all slots) share it.

Layout of ``<cache_dir>/text_trunk_<key>/`` (millions of texts, flat memory)::

    seg-000000.features.npy   (n, W) float32 trunk features, in the order they were computed
    seg-000000.keys.npy       (3, n) uint64: 128-bit text hashes (blake2b of the UTF-8 text) as
                              high and low halves, sorted by the high half, and the feature row
    seg-000001...             later appends (at most SEGMENT_ROWS rows each)
    lock                      fcntl lock taken to name and publish a segment

Texts are never stored: a lookup hashes the text and binary-searches each segment's sorted
keys (``np.searchsorted`` on a memory map of the keys), then reads just the rows it needs from
the features files, so neither the texts nor the features are held in memory. Plain ``.npy``
files, no pickle: ``np.load(path, mmap_mode="r")`` opens any of them.

Segments are immutable; a writer fills a temporary file, then under the lock takes the next
number and renames the features, then the keys, into place: readers list segments by their
keys file, so they see only complete ones. Numbers are contiguous (a writer that died before its
keys file leaves a number the next writer takes again), so a reader's segments are a prefix of
a later reader's, rows never move, and the first segment holding a text always serves it.

The single-file cache of earlier versions (``text_trunk_<key>.safetensors``) is not read: its
texts are computed again into the new layout (the old file may be deleted).
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import mmap
import os
import re
import uuid
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data.tokens import tokenizer_digest  # noqa: F401  (imported from here by callers)
from ..io import atomic_path

SEGMENT = re.compile(r"seg-(\d{6,})\.keys\.npy")
CHUNK = 65_536  # texts hashed and deduplicated at a time while filling
COMPUTE = 8_192  # missing texts tokenised and sorted by length at a time
SEGMENT_ROWS = 1 << 18  # rows per segment (384 MB at W = 384): bounds the keys a fill holds, 24 bytes a row
RELEASE = getattr(mmap, "MADV_DONTNEED", None)  # on a shared read-only map: drops pages from RSS only


class TextCacheMiss(LookupError):
    """A text looked up in a cache that was not filled with it."""


def trunk_digest(model) -> str:
    """Digest of the text trunk's weights (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.text_trunk_state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_path(cache_dir: str | Path, model, tokenizer) -> Path:
    """The cache folder of this text trunk and tokenizer."""
    key = hashlib.sha256(f"{trunk_digest(model)}|{tokenizer_digest(tokenizer)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"text_trunk_{key}"


def text_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """128-bit blake2b of each text's UTF-8 bytes as (high, low) uint64 halves."""
    # surrogatepass: a lone surrogate (valid in JSON strings) still hashes, to its own key
    raw = b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts)
    both = np.frombuffer(raw, dtype="<u8").reshape(-1, 2)
    return both[:, 0].copy(), both[:, 1].copy()


def _find(hi: np.ndarray, lo: np.ndarray, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
    """Positions of the keys (qhi, qlo) in arrays sorted by ``hi``, -1 where absent."""
    n = len(hi)
    if n == 0 or len(qhi) == 0:
        return np.full(len(qhi), -1, dtype=np.int64)
    pos = np.searchsorted(hi, qhi, side="left")
    at = np.minimum(pos, n - 1)
    same_hi = (pos < n) & (np.asarray(hi[at]) == qhi)
    same_lo = np.asarray(lo[at]) == qlo
    out = np.where(same_hi & same_lo, at, -1).astype(np.int64)
    for i in np.flatnonzero(same_hi & ~same_lo):  # another text shares the high half: scan that run
        p = int(pos[i]) + 1
        while p < n and hi[p] == qhi[i]:
            if lo[p] == qlo[i]:
                out[i] = p
                break
            p += 1
    return out


def _npy_header(rows: int, width: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, width)})
    return buf.getvalue()


def _npy_layout(fh, dtype: str, ndim: int) -> tuple[tuple[int, ...], int]:
    """Shape and data offset of an open .npy file holding a C-ordered ``dtype`` array of ``ndim`` dimensions."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, found = read(fh)
    if found != np.dtype(dtype) or fortran or len(shape) != ndim:
        raise ValueError(f"{found}{' (Fortran order)' if fortran else ''} array of shape {shape}, "
                         f"expected {ndim} dimensions of {np.dtype(dtype)}")
    return shape, fh.tell()


class _Segment:
    """One published segment: its keys memory-mapped read-only (binary search touches a few
    pages per text), its features read row by row with positioned reads.

    Why not a memory map for the features too: the kernel maps whole page-cache folios on a
    fault, so gathering 1,280 random rows from a 1.5 GB map put about 950 MB into the process's
    RSS; ``os.pread`` of the rows asked for keeps the process at the batch's size.
    """

    def __init__(self, folder: Path, number: int):
        self.number = number
        self.keys_path = folder / f"seg-{number:06d}.keys.npy"
        self.features_path = folder / f"seg-{number:06d}.features.npy"
        path = self.keys_path
        try:
            with open(path, "rb") as fh:
                shape, offset = _npy_layout(fh, "<u8", 2)
                if os.fstat(fh.fileno()).st_size < offset + 8 * int(np.prod(shape)):
                    raise ValueError("shorter than its header says")
                self._keys_map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            keys = np.ndarray(shape, dtype="<u8", buffer=self._keys_map, offset=offset)
            path = self.features_path
            self._features_file = open(path, "rb", buffering=0)
            (self.rows, self.width), self._data = _npy_layout(self._features_file, "<f4", 2)
            if os.fstat(self._features_file.fileno()).st_size < self._data + 4 * self.rows * self.width:
                raise ValueError("shorter than its header says")
        except (OSError, ValueError) as err:
            raise OSError(f"text cache file {path} is unreadable ({err}); "
                          f"delete the folder {folder} to rebuild the cache") from None
        if keys.shape[0] != 3 or keys.shape[1] != self.rows:
            raise OSError(f"text cache segment {self.keys_path}: keys {keys.shape} do not fit features "
                          f"{(self.rows, self.width)}; delete the folder {folder} to rebuild the cache")
        self.hi, self.lo, self.row = keys[0], keys[1], keys[2]

    def find(self, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
        pos = _find(self.hi, self.lo, qhi, qlo)
        hit = pos >= 0
        pos[hit] = self.row[pos[hit]].astype(np.int64)
        if RELEASE:  # unmaps the pages just searched (they stay in the page cache): RSS stays flat
            self._keys_map.madvise(RELEASE)
        return pos

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Features of local ``rows`` into ``out`` (len(rows), W), in ascending file order."""
        size, fd = 4 * self.width, self._features_file.fileno()
        for i, r in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(fd, size, self._data + r * size), dtype="<f4")


class _Pending:
    """The segment a fill is writing: features appended to a temporary .npy, keys in memory
    (24 bytes a row, at most SEGMENT_ROWS rows), sorted by the high half as they come so that
    later texts of the same fill are found."""

    def __init__(self, folder: Path, width: int):
        self.folder, self.width = folder, width
        self.tmp = folder / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.features.npy"
        self.fh = open(self.tmp, "wb")
        self.header = _npy_header(0, width)
        self.fh.write(self.header)
        self.hi = np.empty(0, np.uint64)
        self.lo = np.empty(0, np.uint64)
        self.row = np.empty(0, np.int64)
        self.rows = 0

    def find(self, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
        pos = _find(self.hi, self.lo, qhi, qlo)
        hit = pos >= 0
        pos[hit] = self.row[pos[hit]]
        return pos

    def append(self, hi: np.ndarray, lo: np.ndarray, features: np.ndarray) -> None:
        self.fh.write(np.ascontiguousarray(features, dtype="<f4").tobytes())
        order = np.argsort(hi, kind="stable")
        at = np.searchsorted(self.hi, hi[order])
        self.hi = np.insert(self.hi, at, hi[order])
        self.lo = np.insert(self.lo, at, lo[order])
        self.row = np.insert(self.row, at, self.rows + order)
        self.rows += len(hi)

    def publish(self, cache: "TextCache") -> None:
        """Sizes the header, flushes, then under the lock names and renames the segment."""
        header = _npy_header(self.rows, self.width)
        if len(header) != len(self.header):  # numpy pads the header so that the row count fits
            raise RuntimeError(f"numpy {np.__version__} wrote a .npy header that cannot be resized in place")
        self.fh.seek(0)
        self.fh.write(header)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        keys = np.stack([self.hi, self.lo, self.row.astype(np.uint64)])
        with cache._locked():
            number = cache._next_number()
            os.replace(self.tmp, self.folder / f"seg-{number:06d}.features.npy")
            with atomic_path(self.folder / f"seg-{number:06d}.keys.npy") as tmp:  # the keys file publishes it
                with open(tmp, "wb") as fh:
                    np.lib.format.write_array(fh, keys, allow_pickle=False)

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


class TextCache:
    """The trunk features of a frozen text tower, looked up by text.

    ``rows(texts)`` -> global row numbers, ``features(rows)`` -> (…, W) float32 tensor of just
    those rows read from disk, ``lookup(texts)`` both. Pickles as its folder and segment count;
    the copy (e.g. in a DataLoader worker) opens the files again instead of copying arrays, and
    sees the same rows whatever was appended since.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._segments: list[_Segment] = []
        self._offsets = np.zeros(1, dtype=np.int64)
        self.refresh()

    @classmethod
    def open(cls, cache_dir: str | Path, model, tokenizer) -> "TextCache":
        """The cache of ``model``'s text trunk and ``tokenizer`` under ``cache_dir`` (maybe empty)."""
        return cls(cache_path(cache_dir, model, tokenizer))

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def width(self) -> int | None:
        return self._segments[0].width if self._segments else None

    def refresh(self, upto: int | None = None) -> None:
        """Maps the segments published since the last look (up to number ``upto``, exclusive)."""
        numbers = []
        if self.path.is_dir():
            numbers = sorted(int(m.group(1)) for m in map(SEGMENT.fullmatch, os.listdir(self.path)) if m)
        if upto is not None:
            numbers = [n for n in numbers if n < upto]
            if len(numbers) < upto:
                raise OSError(f"text cache {self.path}: segments {upto} were listed, {len(numbers)} found")
        for n in numbers[len(self._segments):]:
            if n != len(self._segments):
                raise OSError(f"text cache {self.path}: segment {len(self._segments)} is missing "
                              f"(found {n}); delete the folder to rebuild the cache")
            seg = _Segment(self.path, n)
            if self._segments and seg.width != self.width:
                raise OSError(f"text cache {seg.features_path}: width {seg.width}, "
                              f"the other segments' is {self.width}")
            self._segments.append(seg)
        self._offsets = np.cumsum([0] + [s.rows for s in self._segments], dtype=np.int64)

    def _find(self, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
        out = np.full(len(qhi), -1, dtype=np.int64)
        for seg, offset in zip(self._segments, self._offsets):
            todo = np.flatnonzero(out < 0)
            if not len(todo):
                break
            got = seg.find(qhi[todo], qlo[todo])
            hit = got >= 0
            out[todo[hit]] = got[hit] + offset
        return out

    def rows(self, texts: Sequence[str]) -> np.ndarray:
        """Global row of each text (int64); a text not in the cache is a :class:`TextCacheMiss`."""
        texts = list(texts)
        out = self._find(*text_hashes(texts))
        if (out < 0).any():
            missing = [texts[i] for i in np.flatnonzero(out < 0)[:3]]
            shown = ", ".join(repr(t if len(t) <= 200 else t[:200] + "...") for t in missing)
            raise TextCacheMiss(
                f"{int((out < 0).sum())} text(s) not in the text cache {self.path} "
                f"({len(self)} texts), first: {shown}; the cache is filled with the training texts "
                f"before training (TextCache.ensure)"
            )
        return out

    def features(self, rows: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Trunk features of global ``rows`` (any shape) as a float32 tensor of shape rows.shape + (W,).
        Only the rows asked for are read."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"text cache {self.path}: rows outside 0..{len(self) - 1}")
        width = self.width or 0
        out = np.empty((len(flat), width), dtype=np.float32)
        which = np.searchsorted(self._offsets, flat, side="right") - 1
        for s in np.unique(which):
            at = np.flatnonzero(which == s)
            local = flat[at] - self._offsets[s]
            order = np.argsort(local, kind="stable")  # ascending reads
            got = np.empty((len(at), width), dtype=np.float32)
            self._segments[s].read(local[order], got)
            out[at[order]] = got
        return torch.from_numpy(out).view(*rows.shape, width)

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), W) trunk features of ``texts``."""
        return self.features(self.rows(texts))

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "segments": len(self._segments)}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._segments, self._offsets = [], np.zeros(1, dtype=np.int64)
        self.refresh(upto=state["segments"])  # the same rows as the original, whatever was added since

    # -- filling ---------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / "lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _next_number(self) -> int:
        self.refresh()
        return len(self._segments)

    @torch.no_grad()
    def ensure(self, texts: Iterable[str], model, tokenizer, device="cpu", batch_size: int = 256,
               progress: bool = True, chunk: int = CHUNK, segment_rows: int = SEGMENT_ROWS) -> dict[str, int]:
        """Computes and appends the trunk features of the ``texts`` not in the cache yet.

        ``texts`` is streamed (repeats welcome): ``chunk`` texts at a time are hashed,
        deduplicated and looked up, so memory does not grow with the number of texts. Returns
        counts: texts read, new rows computed, rows in the cache.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        pad = getattr(getattr(getattr(getattr(model, "clip", None), "text", None), "config", None), "pad_token_id", 0)
        was_training = model.training
        model.eval()
        pending: _Pending | None = None
        seen = new = 0
        bar = tqdm(desc="caching text features", unit=" texts", disable=not progress)
        stream = iter(texts)
        try:
            while batch := list(islice(stream, chunk)):
                seen += len(batch)
                self.refresh()  # segments other runs published meanwhile
                hi, lo = text_hashes(batch)
                _, first = np.unique(np.stack([hi, lo], axis=1), axis=0, return_index=True)
                first.sort()  # first occurrences, in stream order
                todo = first[self._find(hi[first], lo[first]) < 0]
                if pending is not None and len(todo):
                    todo = todo[pending.find(hi[todo], lo[todo]) < 0]
                for start in range(0, len(todo), COMPUTE):
                    part = todo[start: start + COMPUTE]
                    tokens = tokenizer([batch[i] for i in part])
                    # batches of similar length: the trunk trims padding per batch, so sorting saves most compute
                    order = np.argsort((tokens != pad).sum(1).numpy(), kind="stable")
                    tokens, part = tokens[torch.from_numpy(order)], part[order]
                    for b in range(0, len(part), batch_size):
                        feats = model.text_trunk(tokens[b: b + batch_size].to(device)).float().cpu().numpy()
                        rows = part[b: b + batch_size]
                        new += len(rows)
                        while len(rows):  # segments of segment_rows rows, the last one shorter
                            if pending is None:
                                pending = _Pending(self.path, feats.shape[1])
                            take = min(len(rows), segment_rows - pending.rows)
                            pending.append(hi[rows[:take]], lo[rows[:take]], feats[:take])
                            rows, feats = rows[take:], feats[take:]
                            if pending.rows == segment_rows:
                                pending.publish(self)
                                pending = None
                bar.update(len(batch))
            if pending is not None:
                pending.publish(self)
                pending = None
        finally:
            bar.close()
            model.train(was_training)
            if pending is not None:  # an error while filling: the unpublished part is dropped
                pending.discard()
        self.refresh()
        return {"texts": seen, "new": new, "rows": len(self)}

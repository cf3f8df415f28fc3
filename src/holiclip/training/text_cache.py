"""Cache of a frozen text trunk's outputs, one row per unique text, on disk.

With a locked pretrained text tower only the projection trains, so each caption's trunk
output is computed once. The cache belongs to the text trunk: its folder is named by a digest
of the trunk's weights and of the tokenizer, so other text weights (``model.pretrained=``, a
fine-tuned trunk) or another tokenizer never meet old features. It grows: a run computes only
the texts it does not find, so runs on the same data with different slots (CLIP on ``web``,
O2M on all slots) share it.

Layout of ``<cache_dir>/text_trunk_<key>/`` (millions of texts, flat memory)::

    seg-000000.claim          empty: the segment number is taken
    seg-000000.features.npy   (n, W) float32 trunk features, in the order they were computed
    seg-000000.keys.npy       (3, n) uint64: 128-bit text hashes (blake2b of the UTF-8 text) as
                              high and low halves, sorted by the high half, and the feature row
    seg-000001...             later appends (at most SEGMENT_ROWS rows each)
    complete/<source key>     a source (a shard, a block of manifest rows) whose texts are all in
                              the published segments: a later launch does not read it again
    fills/                    a fill over several ranks: each rank's "done" or "failed" (its end)

Texts are never stored: a lookup hashes the text and binary-searches each segment's sorted
keys (``np.searchsorted`` on a memory map of the keys), then reads just the rows it needs from
the features files, so neither the texts nor the features are held in memory. Plain ``.npy``
files, no pickle: ``np.load(path, mmap_mode="r")`` opens any of them.

Segments are immutable. A writer fills a temporary file, then takes a number by creating its
claim file with ``O_CREAT | O_EXCL`` (atomic on a shared file system, where ``flock`` may only
lock the node: Lustre's ``localflock``, some NFS set-ups), renames the features into place,
then the keys: readers list segments by their keys file, so they see only complete ones. A
writer that died after its claim leaves a number unused. A row is addressed as (segment
number, row in it), so rows never move whatever is published later, and a reader looks texts
up in its segments in number order.

A source's completion record is written only once its texts are published; its key is what
decides its texts without reading it (a shard: URL, samples, bytes and modification time, the
slot settings; manifest rows: the texts themselves), so a launch on a complete cache reads no
shard. :func:`fill_text_cache` spreads the sources to fill over the ranks (rank r takes the
r-th, (r + W)-th, ... of them); ranks that finish first wait on the other ranks' "done" files,
not in a collective, so a long fill does not run into the process group's timeout.

The single-file cache of earlier versions (``text_trunk_<key>.safetensors``) is not read: its
texts are computed again into the new layout (the old file may be deleted).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import mmap
import os
import re
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.tokens import tokenizer_digest  # noqa: F401  (imported from here by callers)
from ..data.records import DataError
from ..data.shards import ShardDamaged, ShardStream
from ..io import atomic_path
from .checkpoint import on_main

log = logging.getLogger(__name__)

SEGMENT = re.compile(r"seg-(\d{6,})\.keys\.npy")
TAKEN = re.compile(r"seg-(\d{6,})\.(?:claim|keys\.npy)")
CHUNK = 65_536  # texts hashed and deduplicated at a time while filling
COMPUTE = 8_192  # missing texts tokenised and sorted by length at a time
SEGMENT_ROWS = 1 << 18  # rows per segment (384 MB at W = 384): bounds the keys a fill holds, 24 bytes a row
ROW_BITS = 32  # a global row: segment number << ROW_BITS | row in the segment
MANIFEST_ROWS = 65_536  # manifest rows per source (per completion record, per share of a fill)
RELEASE = getattr(mmap, "MADV_DONTNEED", None)  # on a shared read-only map: drops pages from RSS only


class TextCacheMiss(DataError, LookupError):
    """A text looked up in a cache that was not filled with it (a DataError: the CLI names it in one line)."""


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

    def publish(self) -> int:
        """Sizes the header, flushes, claims a number, renames the features, then the keys into place."""
        header = _npy_header(self.rows, self.width)
        if len(header) != len(self.header):  # numpy pads the header so that the row count fits
            raise RuntimeError(f"numpy {np.__version__} wrote a .npy header that cannot be resized in place")
        self.fh.seek(0)
        self.fh.write(header)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        keys = np.stack([self.hi, self.lo, self.row.astype(np.uint64)])
        number = _claim(self.folder)
        os.replace(self.tmp, self.folder / f"seg-{number:06d}.features.npy")
        with atomic_path(self.folder / f"seg-{number:06d}.keys.npy") as tmp:  # the keys file publishes it
            with open(tmp, "wb") as fh:
                np.lib.format.write_array(fh, keys, allow_pickle=False)
        return number

    def discard(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


def _claim(folder: Path) -> int:
    """A segment number no other writer has, on any node: the first free one from the highest
    taken, taken by creating its claim file exclusively (an existing file fails the create)."""
    taken = [int(m.group(1)) for m in map(TAKEN.fullmatch, os.listdir(folder)) if m]
    number = max(taken, default=-1) + 1
    while True:
        try:
            os.close(os.open(folder / f"seg-{number:06d}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return number
        except FileExistsError:  # another writer took it since the listing
            number += 1


@dataclass(frozen=True)
class TextSource:
    """Texts that are cached, and recorded complete, together: ``key`` names them (what decides
    them, known without reading them), ``texts()`` reads them."""

    key: str
    name: str
    texts: Callable[[], Iterable[str]]


class _End:
    """In a fill's stream of texts: all texts of ``source`` came before."""

    __slots__ = ("source",)

    def __init__(self, source: TextSource):
        self.source = source


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def text_sources(dataset, only: Sequence[int] | None = None) -> list[TextSource]:
    """The training texts of a dataset as sources: one per shard of a :class:`ShardStream`, one per
    MANIFEST_ROWS rows of a manifest (:class:`holiclip.data.loader.MultiTextDataset`); ``only``: those
    positions alone (a rank builds only the sources it fills)."""
    if isinstance(dataset, ShardStream):
        count = len(dataset.urls)
        return [TextSource(_digest(["shard", *dataset.text_identity(i)]), dataset.urls[i],
                           partial(dataset.iter_texts, [i]))
                for i in (range(count) if only is None else only)]
    rows = dataset.manifest.texts
    count = -(-len(rows) // MANIFEST_ROWS)
    out = []
    for b in range(count) if only is None else only:
        lo, hi = b * MANIFEST_ROWS, min((b + 1) * MANIFEST_ROWS, len(rows))
        # the block's texts are read for its key and again when filled, never held (manifests are compact)
        out.append(TextSource(_digest(["rows", rows[lo:hi]]), f"manifest rows {lo}-{hi - 1}",
                              partial(_row_texts, rows, lo, hi)))
    return out


def _row_texts(rows, lo: int, hi: int) -> Iterator[str]:
    for i in range(lo, hi):
        yield from rows[i]


def _chunks(items: Iterator, size: int) -> Iterator[tuple[list[str], list[TextSource]]]:
    """(up to ``size`` texts, the sources that ended among them) from a stream of texts and _End markers."""
    texts, ended = [], []
    for item in items:
        if isinstance(item, _End):
            ended.append(item.source)
            continue
        texts.append(item)
        if len(texts) == size:
            yield texts, ended
            texts, ended = [], []
    if texts or ended:
        yield texts, ended


class TextCache:
    """The trunk features of a frozen text tower, looked up by text.

    ``rows(texts)`` -> global row numbers, ``features(rows)`` -> (…, W) float32 tensor of just
    those rows read from disk, ``lookup(texts)`` both. Pickles as its folder and segment numbers;
    the copy (e.g. in a DataLoader worker) opens the files again instead of copying arrays, and
    sees the same rows whatever was appended since.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._segments: dict[int, _Segment] = {}  # by number, ascending: the lookup order
        self.refresh()

    @classmethod
    def open(cls, cache_dir: str | Path, model, tokenizer) -> "TextCache":
        """The cache of ``model``'s text trunk and ``tokenizer`` under ``cache_dir`` (maybe empty)."""
        return cls(cache_path(cache_dir, model, tokenizer))

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(s.rows for s in self._segments.values())

    @property
    def width(self) -> int | None:
        return next(iter(self._segments.values())).width if self._segments else None

    def refresh(self, numbers: Sequence[int] | None = None) -> None:
        """Maps the segments published since the last look (or exactly the segments ``numbers``)."""
        if numbers is None:
            listed = os.listdir(self.path) if self.path.is_dir() else []
            numbers = [int(m.group(1)) for m in map(SEGMENT.fullmatch, listed) if m]
        for n in sorted(set(numbers) - set(self._segments)):
            if not (self.path / f"seg-{n:06d}.keys.npy").is_file():
                raise OSError(f"text cache {self.path}: segment {n} is missing; delete the folder to rebuild the cache")
            seg = _Segment(self.path, n)
            if self._segments and seg.width != self.width:
                raise OSError(f"text cache {seg.features_path}: width {seg.width}, "
                              f"the other segments' is {self.width}")
            self._segments[n] = seg
        self._segments = dict(sorted(self._segments.items()))

    def _find(self, qhi: np.ndarray, qlo: np.ndarray) -> np.ndarray:
        out = np.full(len(qhi), -1, dtype=np.int64)
        for number, seg in self._segments.items():
            todo = np.flatnonzero(out < 0)
            if not len(todo):
                break
            got = seg.find(qhi[todo], qlo[todo])
            hit = got >= 0
            out[todo[hit]] = got[hit] + (number << ROW_BITS)
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
                f"before training (holiclip data cache-texts, or the start of holiclip train); if its "
                f"files were deleted in part, delete the folder to rebuild it"
            )
        return out

    def features(self, rows: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Trunk features of global ``rows`` (any shape) as a float32 tensor of shape rows.shape + (W,).
        Only the rows asked for are read."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        width = self.width or 0
        out = np.empty((len(flat), width), dtype=np.float32)
        which, local = flat >> ROW_BITS, flat & ((1 << ROW_BITS) - 1)
        for s in np.unique(which).tolist():
            at = np.flatnonzero(which == s)
            seg = self._segments.get(s)
            if seg is None or flat[at].min() < 0 or local[at].max() >= seg.rows:
                raise IndexError(f"text cache {self.path}: rows outside its segments")
            order = np.argsort(local[at], kind="stable")  # ascending reads
            got = np.empty((len(at), width), dtype=np.float32)
            seg.read(local[at][order], got)
            out[at[order]] = got
        return torch.from_numpy(out).view(*rows.shape, width)

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), W) trunk features of ``texts``."""
        return self.features(self.rows(texts))

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "segments": list(self._segments)}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self._segments = {}
        self.refresh(state["segments"])  # the same rows as the original, whatever was added since

    # -- completion records ----------------------------------------------------------------
    def complete(self) -> set[str]:
        """Keys of the sources whose texts are all in the cache (none while it has no segment: a
        folder whose segments were deleted is filled again)."""
        folder = self.path / "complete"
        if not self._segments:
            self.refresh()
        return set(os.listdir(folder)) if self._segments and folder.is_dir() else set()

    def _record(self, sources: Iterable[TextSource]) -> None:
        folder = self.path / "complete"
        folder.mkdir(parents=True, exist_ok=True)
        for s in sources:
            (folder / s.key).write_text(s.name + "\n", encoding="utf-8", errors="surrogatepass")

    # -- filling ---------------------------------------------------------------------------
    def ensure(self, texts: Iterable[str], model, tokenizer, device="cpu", batch_size: int = 256,
               progress: bool = True, chunk: int = CHUNK, segment_rows: int = SEGMENT_ROWS) -> dict[str, int]:
        """Computes and appends the trunk features of the ``texts`` not in the cache yet.

        ``texts`` is streamed (repeats welcome): ``chunk`` texts at a time are hashed,
        deduplicated and looked up, so memory does not grow with the number of texts. Returns
        counts: texts read, new rows computed, rows in the cache.
        """
        return self._compute(iter(texts), model, tokenizer, device, batch_size, progress, chunk, segment_rows)

    def fill(self, sources: Sequence[TextSource], model, tokenizer, device="cpu", batch_size: int = 256,
             progress: bool = True, chunk: int = CHUNK, segment_rows: int = SEGMENT_ROWS) -> dict[str, int]:
        """:meth:`ensure` of the texts of the ``sources`` not recorded complete; each is recorded
        once its texts are published. A damaged shard is not recorded (its texts up to the damage
        are cached; a later fill reads it again). Counts: sources read, texts read, new rows, rows."""
        done = self.complete()
        todo = [s for s in sources if s.key not in done]

        def items():
            for s in todo:
                try:
                    yield from s.texts()
                except ShardDamaged as err:
                    log.warning("text cache: %s; its texts up to there are cached, it is read again next time", err)
                    continue
                yield _End(s)

        counts = self._compute(items(), model, tokenizer, device, batch_size, progress, chunk, segment_rows,
                               self._record)
        return {"sources": len(todo), **counts}

    @torch.no_grad()
    def _compute(self, items: Iterator, model, tokenizer, device, batch_size: int, progress: bool, chunk: int,
                 segment_rows: int, record: Callable[[list[TextSource]], None] | None = None) -> dict[str, int]:
        """Fills from a stream of texts and _End markers; ``record`` gets the sources whose texts are
        all published, after each publication."""
        self.path.mkdir(parents=True, exist_ok=True)
        pad = getattr(getattr(getattr(getattr(model, "clip", None), "text", None), "config", None), "pad_token_id", 0)
        # bf16 on a GPU (the features are stored as float32); a CPU computes in float32 (bf16 matmuls
        # are slow on CPUs without AVX-512 BF16)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()
        was_training = model.training
        model.eval()
        pending: _Pending | None = None
        ready: list[TextSource] = []  # sources whose texts are all in the cache or in `pending`
        seen = new = 0
        bar = tqdm(desc="caching text features", unit=" texts", disable=not progress)

        def publish():
            nonlocal pending
            pending.publish()
            pending = None
            if record is not None:
                record(ready)
            ready.clear()

        try:
            for batch, ended in _chunks(items, chunk):
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
                        with amp:
                            feats = model.text_trunk(tokens[b: b + batch_size].to(device))
                        feats = feats.float().cpu().numpy()
                        rows = part[b: b + batch_size]
                        new += len(rows)
                        while len(rows):  # segments of segment_rows rows, the last one shorter
                            if pending is None:
                                pending = _Pending(self.path, feats.shape[1])
                            take = min(len(rows), segment_rows - pending.rows)
                            pending.append(hi[rows[:take]], lo[rows[:take]], feats[:take])
                            rows, feats = rows[take:], feats[take:]
                            if pending.rows == segment_rows:
                                publish()
                ready.extend(ended)
                bar.update(len(batch))
            if pending is not None:
                publish()
            elif record is not None and ready:  # nothing new to publish: their texts were all found
                record(ready)
        finally:
            bar.close()
            model.train(was_training)
            if pending is not None:  # an error while filling: the unpublished part is dropped
                pending.discard()
        self.refresh()
        return {"texts": seen, "new": new, "rows": len(self)}


# -- a fill over the ranks of a launch ------------------------------------------------------
def fill_text_cache(cache: TextCache, dataset, model, tokenizer, device="cpu", rank: int = 0, world_size: int = 1,
                    progress: bool = True, batch_size: int = 256, poll: float = 1.0) -> dict[str, int]:
    """Fills ``cache`` with the training texts of ``dataset`` not recorded complete, spread over the
    ranks (every rank calls it; rank r fills the r-th, (r + W)-th, ... sources to fill).

    On a complete cache nothing is read (a listing of the records and the shards' sizes and times).
    A rank done with its share waits for the others' "done" files, polling every ``poll`` seconds,
    not in a collective: a fill longer than the process group's timeout does not time out. An
    error on one rank is raised on every rank (its "failed" file). Counts: ``sources`` (all),
    ``complete`` (recorded before), ``read`` (sources read), ``texts``, ``new``, ``rows``.
    """
    sources: list[TextSource] = []

    def plan():  # on rank 0: the sources to fill (positions), handed to every rank with a name for the launch
        sources.extend(text_sources(dataset))
        done = cache.complete()
        return [i for i, s in enumerate(sources) if s.key not in done], len(sources), uuid.uuid4().hex

    todo, total, launch = on_main(plan, rank == 0)
    counts = {"sources": total, "complete": total - len(todo), "read": 0, "texts": 0, "new": 0}
    if todo:
        share = todo[rank::world_size]

        def fill():  # any error in here reaches the other ranks (_fill_and_wait)
            mine = [sources[i] for i in share] if rank == 0 else text_sources(dataset, share)
            return cache.fill(mine, model, tokenizer, device, batch_size=batch_size, progress=progress and rank == 0)

        got = fill() if world_size == 1 else _fill_and_wait(cache, fill, launch, rank, world_size, poll)
        counts.update(read=got["sources"], texts=got["texts"], new=got["new"])
    cache.refresh()
    counts["rows"] = len(cache)
    return counts


def _fill_and_wait(cache: TextCache, fill: Callable[[], dict], launch: str, rank: int, world_size: int,
                   poll: float) -> dict[str, int]:
    """``fill()`` on this rank, then the sum of every rank's counts once all are done."""
    folder = cache.path / "fills"
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # what failed launches left behind
        for old in folder.iterdir():
            if time.time() - old.stat().st_mtime > 86_400:
                old.unlink(missing_ok=True)
    try:
        got = fill()
    except BaseException as err:
        _write_json(folder / f"{launch}.{rank}.failed", {"type": type(err).__name__, "error": str(err)})
        raise
    _write_json(folder / f"{launch}.{rank}.done", got)
    said = time.monotonic()
    while True:
        names = {n for n in os.listdir(folder) if n.startswith(launch)}
        for n in sorted(names):
            if n.endswith(".failed"):
                other = json.loads((folder / n).read_text(encoding="utf-8"))
                kind = DataError if other["type"] in ("DataError", "ShardDamaged") else RuntimeError
                raise kind(f"rank {n.split('.')[1]} stopped filling the text cache {cache.path}: {other['error']}")
        if sum(n.endswith(".done") for n in names) == world_size:
            break
        if rank == 0 and time.monotonic() - said >= 60:
            said = time.monotonic()
            log.info("text cache: %d of %d ranks have filled their share; waiting for the others",
                     sum(n.endswith(".done") for n in names), world_size)
        time.sleep(poll)
    total = {"sources": 0, "texts": 0, "new": 0}
    for r in range(world_size):
        part = json.loads((folder / f"{launch}.{r}.done").read_text(encoding="utf-8"))
        total = {k: total[k] + part[k] for k in total}
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank has read the files: rank 0 removes them
    if rank == 0:
        for n in names:
            (folder / n).unlink(missing_ok=True)
    return total


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data), encoding="utf-8")

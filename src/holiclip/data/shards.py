"""Streamed webdataset shards: every sample once per epoch over ranks and DataLoader workers,
an exact resume mid-epoch, bad samples replaced and counted as the map-style path does.

The epoch's order: the shards in a seeded permutation (with ``resampled``, drawn with
replacement) laid end to end. Each rank's batches come from ``V`` streams (V: the DataLoader
workers when the epoch started); each of the world_size x V streams takes a contiguous range of
that sequence (it may start or end mid-shard) holding a whole number of its rank's batches, so
every rank gets the same number of full batches and the samples past the last full global batch
are left out (drop_last). Batch ``b`` of a rank is batch ``b // V`` of its stream ``b % V``.

A stream reads its range in order and shuffles it through a buffer (``shuffle_buffer``). The
buffer's draws depend only on how many samples it holds, so the order it gives is a function of
positions alone: the buffer runs on positions, and the reader keeps only the samples the buffer
has taken and not yet given out. Skipping consumed batches on resume is therefore the buffer
replayed on positions: nothing is read for it and nothing decoded; reading starts again at the
oldest sample still in the buffer.

DataLoader worker ``w`` of ``K`` yields the rank's batches ``c + w``, ``c + w + K``, ... after
the ``c`` already consumed, and PyTorch hands worker batches out in turn, so the rank sees its
batches in order whatever ``K`` is: a resume with other ``data.workers`` continues the epoch
exactly (a worker then serves several streams, or skips the batches of a shared one that other
workers make); the next epoch splits over the new number. A resume on another number of ranks
continues the same way: the plan's rank-batches not yet trained are re-cut over the new ranks
(:class:`holiclip.data.loader.EpochSplit`), each rebuilding the streams of the plan its batches
come from; a rank then reads a stream's range while making only some of its batches.
"""
from __future__ import annotations

import json
import logging
import random
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .loader import DEFAULT_MAX_IMAGE_PIXELS, MAX_SUBSTITUTIONS, UNREADABLE, EpochSplit, SplitEpochs, open_image
from .records import DataError, apply_missing_slot_policy, missing_slots
from .tokens import stored_tokens
from .webdataset import SCHEME as _SCHEME, TEXT_MEMBERS, image_member, json_row, no_image, sample_captions
from .webdataset import shard_urls  # noqa: F401  (imported from here by callers)

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"  # {shard file name: samples}, as open_clip reads it


def _local(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(urlparse(url).path)
    return None if url.startswith("pipe:") or _SCHEME.match(url) else Path(url)


def _open(url: str):
    """A readable binary stream: webdataset's ``gopen`` (files, ``pipe:``, curl, gsutil, ...), else fsspec."""
    from holiclip._extras import require

    wds = require("webdataset", "train", "reading webdataset shards")

    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in wds.gopen_schemes:
        return wds.gopen(url, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


# -- reading one shard ------------------------------------------------------------------------------
class Missing:
    """A sample the sizes promise that the shard does not give (truncated, shorter, unreadable)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _error_text(exn: BaseException) -> str:
    first = str(exn.args[0]) if exn.args else ""
    first = first.split(" @ ")[0]  # webdataset appends the stream object's repr
    return f"{type(exn).__name__}: {first}" if first else type(exn).__name__


def read_shard(url: str, lo: int = 0, hi: int | None = None, text_only: bool = False,
               expected: int | None = None, longer: str = "warn") -> Iterator[tuple[int, dict | Missing]]:
    """``(i, sample)`` for samples ``lo .. hi - 1`` of one shard, in order, a sample being
    webdataset's dict of raw members (``__key__``, ``__url__``, ``jpg``, ``json``, ...).

    Members of samples outside the range (and, with ``text_only``, all but json / txt members)
    are passed over without being read into memory. With ``hi`` given, exactly ``hi - lo`` pairs
    come out: a sample the shard lacks (it ends early, is truncated or cannot be opened) is a
    :class:`Missing` with the reason. ``expected`` (the shard's size) goes into that reason; a
    shard found to hold more samples than ``expected`` is logged once (``longer="warn"``) or a
    DataError (``"error"``): the samples past the declared size would never be read.
    """
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

    if hi is not None and hi <= lo:
        return
    state = {"key": None, "i": -1}
    index_of: dict[str, int] = {}
    errors: list[BaseException] = []

    def select(fname: str) -> bool:
        prefix, suffix = base_plus_ext(fname)
        if prefix is None:
            return False
        if prefix != state["key"]:  # a new sample starts, as webdataset's group_by_keys sees it
            state["key"] = prefix
            state["i"] += 1
            if state["i"] >= lo:
                index_of[prefix] = state["i"]
        i = state["i"]
        if i < lo:
            return False
        if hi is not None and i >= hi:
            return i == hi  # one member of the next sample, so that the last wanted one comes out now
        return not text_only or suffix.lower().rsplit(".", 1)[-1] in TEXT_MEMBERS

    def handler(exn: BaseException) -> bool:
        errors.append(exn)
        return False  # stop this shard: the rest of it is missing

    nxt = lo
    try:
        stream = _open(url)
    except Exception as exn:  # a missing file, a failing command, an unknown scheme
        errors.append(exn)
        stream = None
    if stream is not None:
        samples = group_by_keys(
            tar_file_expander([{"url": url, "stream": stream}], handler=handler, select_files=select, eof_value=None),
            handler=handler,
        )
        try:
            for sample in samples:
                i = index_of.pop(sample.get("__key__"), None)
                if i is None or i < nxt:
                    continue
                if errors or (hi is not None and i >= hi):
                    break  # after an error the sample being assembled may lack members
                while nxt < i:  # samples with no member selected (text_only: an image alone)
                    yield nxt, Missing("not found in the shard")
                    nxt += 1
                if expected is not None and i + 1 == expected == hi and state["i"] >= expected:
                    _longer_than_declared(url, expected, longer)  # a member of sample `expected` was seen
                yield i, sample
                nxt = i + 1
                if hi is not None and nxt >= hi:
                    break
        finally:
            samples.close()
            try:
                stream.close()
            except Exception:  # a pipe's command failing on close is already in `errors` or harmless
                pass
    if hi is None:
        if errors:
            raise DataError(f"{url}: unreadable shard ({_error_text(errors[0])})")
        return
    if errors:
        reason = f"shard unreadable from here ({_error_text(errors[0])}; truncated or damaged tar?)"
    else:
        size = f"{expected} " if expected is not None else ""
        reason = f"the shard ends after {state['i'] + 1} samples, not the {size}its sizes say"
    while nxt < hi:
        yield nxt, Missing(reason)
        nxt += 1


class ShardDamaged(DataError):
    """A shard that cannot be opened (``opened`` False) or read to its end."""

    def __init__(self, message: str, opened: bool = True):
        super().__init__(message)
        self.opened = opened


def tar_members(url: str, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None]]:
    """``(name, data)`` of one shard's members, in order, as webdataset's tar iterator lists them
    (regular files, not its ``__...__`` metadata); ``data`` is read only for the names ``wanted``
    accepts, else None.

    A local shard is opened for random access: the members passed over are seeked past, not read
    (only their 512-byte headers are). Other URLs are a stream, whose skipped bytes are still read
    (but not copied out). An unreadable or damaged tar raises :class:`ShardDamaged` where it fails.
    """
    import tarfile

    from webdataset.tariterators import meta_prefix, meta_suffix

    skip_meta = re.compile(r"__[^/]*__($|/)")
    local = _local(url)
    try:  # unbuffered: a header read after a seek asks for its 512 bytes, not a buffer's 8 KiB
        fileobj = open(local, "rb", buffering=0) if local is not None else _open(url)
    except Exception as exn:  # a missing file, a failing command, an unknown scheme
        raise ShardDamaged(f"{url}: cannot open the shard ({_error_text(exn)})", opened=False) from None
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:*" if local is not None else "r|*")
    except Exception as exn:
        fileobj.close()
        raise ShardDamaged(f"{url}: damaged tar ({_error_text(exn)})") from None
    try:
        while True:
            try:
                info = tar.next()
            except Exception as exn:
                raise ShardDamaged(f"{url}: damaged tar ({_error_text(exn)})") from None
            if info is None:
                return
            tar.members = []  # the index of members read so far is not needed: memory stays flat
            name = info.name
            if not info.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)) \
                    or skip_meta.match(name):
                continue
            data = None
            if wanted(name):
                try:
                    data = tar.extractfile(info).read()
                except Exception as exn:
                    raise ShardDamaged(f"{url}: damaged tar at {name} ({_error_text(exn)})") from None
            yield name, data
    finally:
        tar.close()
        fileobj.close()


def read_texts(url: str, samples: int | None = None) -> Iterator[dict]:
    """The text members (json, txt) of the first ``samples`` samples of one shard, as dicts like
    :func:`read_shard`'s (``__key__``, ``__url__`` and the members); image members are not read
    (:func:`tar_members`), samples without a text member are passed over."""
    from webdataset.tariterators import base_plus_ext

    key, sample, seen = None, None, 0

    def wanted(name: str) -> bool:
        return (base_plus_ext(name)[1] or "").lower() in TEXT_MEMBERS

    for name, data in tar_members(url, wanted):
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        if prefix != key:  # a new sample starts, as webdataset's group_by_keys sees it
            if sample is not None and len(sample) > 2:
                yield sample
            if samples is not None and seen >= samples:
                return
            key, sample, seen = prefix, {"__key__": prefix, "__url__": url}, seen + 1
        if data is not None:
            sample[suffix.lower()] = data
    if sample is not None and len(sample) > 2:
        yield sample


_LONGER_SEEN: set[str] = set()  # shards already reported by this process


def _longer_than_declared(url: str, expected: int, longer: str) -> None:
    if url in _LONGER_SEEN and longer != "error":
        return
    _LONGER_SEEN.add(url)
    found = count_samples(url)
    message = (f"{url}: the shard holds {found} samples, its sizes ({SIZES_FILE} or *_stats.json) say {expected}: "
               f"the {found - expected} past them are never read; correct the sizes (or delete {SIZES_FILE} to "
               "have the shards counted)")
    if longer == "error":
        raise DataError(f"{message} (data.on_bad_row=skip trains on the declared samples with a warning)")
    log.warning("warning: %s", message)


def count_samples(url: str) -> int:
    """Samples in one shard: a pass over its member names, reading no member (:func:`tar_members`)."""
    from webdataset.tariterators import base_plus_ext

    keys, last = 0, None
    try:
        for name, _ in tar_members(url, lambda name: False):
            prefix, _ = base_plus_ext(name)
            if prefix is not None and prefix != last:
                keys, last = keys + 1, prefix
    except ShardDamaged as err:  # a truncated tar: the samples up to the damage count
        if not err.opened:
            raise DataError(f"{err}: its samples cannot be counted") from None
        log.warning("%s; %d samples counted before the damage", err, keys)
    return keys


def _read_json(url: str) -> dict | None:
    local = _local(url)
    try:
        if local is not None:
            if not local.is_file():
                return None
            text = local.read_text(encoding="utf-8")
        else:
            import fsspec

            with fsspec.open(url, "r", encoding="utf-8") as fh:
                text = fh.read()
    except (FileNotFoundError, ImportError, ValueError, OSError):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{url}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise DataError(f"{url}: expected a JSON object")
    return data


def _check_found(urls: Sequence[str]) -> None:
    missing = [u for u in urls if (p := _local(u)) is not None and not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards not found, first: {', '.join(missing[:3])}")


def shard_sizes(urls: Sequence[str], rank: int = 0, world_size: int = 1) -> list[int]:
    """Samples per shard: from ``sizes.json`` next to the shards ({shard file name: samples},
    open_clip's format), else img2dataset's ``<shard>_stats.json`` (``successes``), else counted
    by a pass over the shard's member names (:func:`count_samples`; logged). Under torchrun every
    rank calls it: the shards to count are spread over the ranks (rank r counts the r-th,
    (r + W)-th, ...), then gathered, so no rank waits on one counting them all."""
    _check_found(urls)
    sizes: list[int | None] = []
    tables: dict[str, dict | None] = {}
    for url in urls:
        if url.startswith("pipe:"):
            sizes.append(None)
            continue
        folder, _, name = url.rpartition("/")
        folder = folder or "."
        if folder not in tables:
            tables[folder] = _read_json(f"{folder}/{SIZES_FILE}")
        table = tables[folder] or {}
        value = table.get(name, table.get(url))
        where = f"{folder}/{SIZES_FILE}"
        if value is None:
            stats = _read_json(f"{folder}/{name.removesuffix('.tar')}_stats.json")
            value, where = (stats or {}).get("successes"), f"{folder}/{name.removesuffix('.tar')}_stats.json"
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DataError(f"{where}: samples of {name} must be a whole number >= 0, got {value!r}")
        sizes.append(value)
    unknown = [i for i, n in enumerate(sizes) if n is None]
    if unknown and rank == 0:
        log.warning("no %s or *_stats.json gives the samples of %d of %d shards (first: %s): counting them over "
                    "%d rank(s) (a pass over each shard's member names, reading no image); `holiclip data sizes "
                    "SHARDS` writes the %s once, so that no launch counts", SIZES_FILE, len(unknown), len(urls),
                    urls[unknown[0]], world_size, SIZES_FILE)
    for i, n in _count_spread([urls[i] for i in unknown], rank, world_size):
        sizes[unknown[i]] = n
    return sizes


def _count_spread(urls: Sequence[str], rank: int, world_size: int) -> list[tuple[int, int]]:
    """(position, samples) of every shard in ``urls``, each rank counting its share; an error on one
    rank reaches every rank (it travels in the gather)."""
    import torch.distributed as dist

    shared = world_size > 1 and dist.is_available() and dist.is_initialized()
    mine = range(rank, len(urls), world_size) if shared else range(len(urls))
    try:
        counted, error = [(i, count_samples(urls[i])) for i in mine], None
    except Exception as err:  # handed to the other ranks, then raised everywhere
        counted, error = [], err
    parts = [(counted, error)]
    if shared:  # also with nothing to count: every rank takes part whatever it found
        parts = [None] * world_size
        dist.all_gather_object(parts, (counted, error))
    for _, err in parts:
        if err is not None:
            raise err
    return [pair for part, _ in parts for pair in part]


def write_sizes(urls: Sequence[str], workers: int = 1, progress: bool = False) -> dict[str, tuple[int, int]]:
    """Counts the samples of local shards (:func:`count_samples`, ``workers`` processes) and writes
    them into the ``sizes.json`` beside them, one per folder (entries of other shards are kept).
    Returns {sizes.json path: (shards written, samples)}."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from ..io import atomic_path

    remote = [u for u in urls if _local(u) is None]
    if remote:
        raise DataError(f"{remote[0]}: sizes.json is written beside local shards only; for remote shards write "
                        f"{{shard file name: samples}} into a {SIZES_FILE} beside them")
    _check_found(urls)
    paths = [_local(u) for u in urls]
    bar = tqdm(total=len(urls), desc="counting samples", unit=" shards", disable=not progress)
    if workers > 1 and len(urls) > 1:
        with ProcessPoolExecutor(min(workers, len(urls))) as pool:
            counts = []
            for n in pool.map(count_samples, map(str, paths), chunksize=max(1, len(urls) // (8 * workers))):
                counts.append(n)
                bar.update()
    else:
        counts = []
        for p in paths:
            counts.append(count_samples(str(p)))
            bar.update()
    bar.close()
    by_folder: dict[Path, dict[str, int]] = {}
    for p, n in zip(paths, counts):
        by_folder.setdefault(p.parent, {})[p.name] = n
    written = {}
    for folder, found in by_folder.items():
        target = folder / SIZES_FILE
        table = {**(_read_json(str(target)) or {}), **found}
        with atomic_path(target) as tmp:
            tmp.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n", encoding="utf-8")
        written[str(target)] = (len(found), sum(found.values()))
    return written


# -- the epoch's plan ------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One epoch: the shard sequence (``shards[e]`` starts at global position ``starts[e]``),
    the samples it uses, the rank's batches and streams."""

    shards: np.ndarray
    starts: np.ndarray
    samples: int
    batches: int  # per rank
    streams: int  # per rank (V)

    def locate(self, g: int) -> tuple[int, int]:
        """Global position -> (entry in the sequence, offset in that shard)."""
        e = int(np.searchsorted(self.starts, g, side="right")) - 1
        return e, g - int(self.starts[e])

    def stream_range(self, rank: int, v: int, batch_size: int) -> tuple[int, int]:
        """(first global position, length) of stream ``v`` of ``rank``: rank-major, lengths in whole batches."""
        per = [len(range(u, self.batches, self.streams)) for u in range(self.streams)]
        start = (rank * self.batches + sum(per[:v])) * batch_size
        return start, per[v] * batch_size


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0])


class _Skip(Exception):
    """A sample left out and replaced: ``kind`` is bad (unreadable image), bad_rows or dropped."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


# -- the dataset ---------------------------------------------------------------------------------------
class ShardStream(SplitEpochs, IterableDataset):
    """Webdataset shards as a stream of collated batches of ``batch_size`` (per rank).

    Items are built as :class:`holiclip.data.loader.MultiTextDataset` builds them (``open_image``,
    ``max_pixels``, ``transform`` under a generator seeded by (seed, epoch, sample)) and batched by
    ``collate`` (:class:`holiclip.data.loader.Collate`); ``index`` is the sample's place in the
    shard list (stable over epochs). Batches also carry ``bad_rows`` and ``dropped``: messages
    of samples left out under ``on_bad_row=skip`` (malformed json, no image or captions, missing
    from a truncated or short shard) and ``missing_slot_policy=drop``; with ``error`` they stop the
    run. A left-out sample or unreadable image is replaced by the next sample of the stream's own
    order after the batch (wrapping around to its start), so no rank's batch holds a sample twice.
    """

    def __init__(self, urls: str | Sequence[str], slots: Sequence[str], batch_size: int, transform: Callable,
                 collate: Callable | None = None, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 5000, num_samples: int | None = None, resampled: bool = False,
                 list_slots: Sequence[str] | None = None, missing_slot_policy: str = "error",
                 on_bad_row: str = "error", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 sizes: Sequence[int] | None = None, workers: int = 0):
        super().__init__()
        found = shard_urls(urls)
        if not found:
            raise DataError(f"{urls}: no shards")
        self.urls = found
        _check_found(self.urls)
        self.sizes = np.asarray(list(sizes) if sizes is not None else shard_sizes(self.urls), dtype=np.int64)
        if len(self.sizes) != len(self.urls):
            raise DataError(f"{len(self.sizes)} shard sizes for {len(self.urls)} shards")
        self.bases = np.concatenate([[0], np.cumsum(self.sizes)])  # a sample's index: its place in the shard list
        self.total = int(self.bases[-1])
        if self.total == 0:
            raise DataError(f"{self.urls[0]} ...: the {len(self.urls)} shards hold no samples")
        self.slots, self.list_slots = list(slots), list(list_slots) if list_slots else None
        self.batch_size, self.transform, self.collate = batch_size, transform, collate
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        self.missing_slot_policy, self.on_bad_row, self.max_pixels = missing_slot_policy, on_bad_row, max_pixels
        if num_samples is not None and num_samples > self.total and not resampled:
            raise DataError(f"data.train_num_samples={num_samples} is more than the {self.total} samples in the "
                            f"{len(self.urls)} shards; lower it, or draw shards with replacement (data.resampled=true)")
        self.samples_per_epoch = num_samples if num_samples is not None else self.total
        self.workers = workers
        self.epoch, self.start_batch = 0, 0
        self._splits: dict[int, EpochSplit] = {}  # from a checkpoint: the split of the epoch in progress
        if self.batches_per_epoch == 0:
            raise DataError(f"{self.samples_per_epoch} samples per epoch are fewer than one global batch "
                            f"({batch_size} x {world_size} ranks)")

    # -- epochs and resume ---------------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.batch_size * self.world_size)  # drop_last

    @property
    def left_out_per_epoch(self) -> int:
        """Samples of each epoch's order past the last full global batch (drop_last)."""
        return self.samples_per_epoch - self.batches_per_epoch * self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to stream and the rank's batches of it already consumed (skipped undecoded)."""
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def epoch_samples(self) -> int:
        return self.samples_per_epoch

    @property
    def default_streams(self) -> int:  # this run's own plan: a stream per DataLoader worker when the epoch starts
        return max(1, self.workers)

    def state(self) -> dict:
        """What a checkpoint keeps to continue the epoch in progress exactly (epoch and batches are the trainer's):
        its split (:class:`holiclip.data.loader.EpochSplit`: the plan's ranks and streams) and what the shards were."""
        return {**super().state(), "shards": len(self.urls), "samples": self.total}

    def load_state(self, state: dict | None, epoch: int, batch_in_epoch: int) -> int:
        """The checkpoint's split of ``epoch``; returns the batch to go on from (0 on another world size:
        the streams' positions not yet trained, over all ranks of the checkpoint's plan, are re-cut
        over this run's ranks, see :class:`EpochSplit`). Each stream's order is a function of
        (seed, epoch, its rank and stream in the plan) and of the epoch's shard sequence (seeded by
        (seed, epoch), with or without ``resampled``) alone, so every rank rebuilds any of them."""
        if state and batch_in_epoch and (state["shards"] != len(self.urls) or state["samples"] != self.total):
            log.warning("the checkpoint's epoch %d was split over %d shards, %d samples; this run has %d, %d: the "
                        "rest of that epoch is not the exact continuation (samples may repeat or be missed until "
                        "epoch %d)", epoch, state["shards"], state["samples"], len(self.urls), self.total, epoch + 1)
            return batch_in_epoch
        return super().load_state(state, epoch, batch_in_epoch)

    def counts(self) -> dict[str, int]:
        """The trainer's data counters at the start (bad_rows and dropped grow as batches report them)."""
        return {"rows": self.total, "bad_rows": 0, "dropped": 0}

    def describe(self) -> str:
        return (f"{len(self.urls)} shards, {self.total:,} samples; {self.samples_per_epoch:,} per epoch"
                f"{' (shards drawn with replacement)' if self.resampled else ''} = {self.batches_per_epoch} batches "
                f"of {self.batch_size} x {self.world_size} ranks, the last {self.left_out_per_epoch} samples of each "
                f"epoch's order left out (drop_last)")

    def plan(self, epoch: int) -> Plan:
        rng = np.random.default_rng(_seed(self.seed, epoch, 0x5A4D))
        need = self.samples_per_epoch
        if self.resampled:
            nonempty = np.flatnonzero(self.sizes)
            picks, total = [], 0
            while total < need:  # draws with replacement until the epoch is covered
                draw = nonempty[rng.integers(len(nonempty), size=max(16, len(nonempty)))]
                for k in draw:
                    picks.append(int(k))
                    total += int(self.sizes[k])
                    if total >= need:
                        break
            order = np.asarray(picks, dtype=np.int64)
        else:
            order = rng.permutation(len(self.urls))
        starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
        split = self.split(epoch)  # the plan's ranks and streams: the stream ranges
        return Plan(order, starts, need, need // (self.batch_size * split.world_size), split.streams)

    # -- iteration ---------------------------------------------------------------------------------------------
    def loader(self, collate: Callable | None = None, workers: int = 0, **kwargs) -> "StreamLoader":
        """A DataLoader of this stream's batches (``batch_size=None``: the stream batches itself)."""
        if collate is not None:
            self.collate = collate
        self.workers = workers
        return StreamLoader(DataLoader(self, batch_size=None, num_workers=workers, collate_fn=_as_is, **kwargs))

    def _schedule(self, worker: int, num_workers: int, streams: dict) -> Iterator[tuple["_Stream", int, int]]:
        """(stream, its batch, later batches of that stream in the same global batch) for each batch of
        this rank this worker makes. Batch ``b`` of this rank is rank-batch ``(r0, b0)`` of the epoch's
        plan (:meth:`EpochSplit.rank_batch`: ``(rank, b)`` unless resumed on another world size),
        batch ``b0 // V`` of stream ``b0 % V`` of plan rank ``r0``."""
        plan, split, world = self.plan(self.epoch), self.split(self.epoch), self.world_size
        resized = split.first != 0 or split.world_size != world
        for b in range(self.start_batch + worker, self.batches(self.epoch), num_workers):
            r0, b0 = split.rank_batch(b, self.rank, world)
            key = (r0, b0 % plan.streams)
            if key not in streams:
                start, length = plan.stream_range(r0, key[1], self.batch_size)
                streams[key] = _Stream(self, plan, start, length, _seed(self.seed, self.epoch, *key))
            later = 0  # resized: other ranks of this global batch may train the next batches of the same stream
            for r in range(self.rank + 1, world) if resized else ():
                rr, bb = split.rank_batch(b, r, world)
                later += (rr, bb % plan.streams) == key
            yield streams[key], b0 // plan.streams, later

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        streams: dict[tuple[int, int], _Stream] = {}
        try:
            for made, (stream, local, later) in enumerate(self._schedule(worker, num_workers, streams), 1):
                yield stream.batch(local, later)
                if made % 32 == 0:
                    _trim_heap()
        except DataError as err:  # handed to the training process as data, raised there without a traceback
            yield {"error": str(err)}
        finally:
            for s in streams.values():
                s.close()

    def positions(self) -> Iterator[list[int]]:
        """The epoch-sequence positions (see :meth:`plan`) of this rank's batches from ``start_batch`` on, as
        iterating would give them before replacements, reading nothing."""
        for stream, local, _ in self._schedule(0, 1, {}):
            taken = stream.take(local)
            for p in taken:
                stream._done_with(p)
            yield [stream.start + p for p in taken]

    def iter_texts(self, shards: Sequence[int] | None = None) -> Iterator[str]:
        """Every training text (all slots of every sample, repeats included) of the shards (indices
        into ``urls``, all by default), read from their json / txt members only (:func:`read_texts`);
        samples the policies leave out are left out. A damaged shard raises :class:`ShardDamaged`
        after its texts up to the damage."""
        for i in range(len(self.urls)) if shards is None else shards:
            url = self.urls[i]
            for raw in read_texts(url, int(self.sizes[i])):
                try:
                    yield from self._texts(raw, f"{url}:{raw['__key__']}", image=False)
                except _Skip:
                    continue

    def text_identity(self, i: int) -> list:
        """What decides shard ``i``'s training texts, known without reading it: its URL and samples,
        its bytes and modification time when local, the slot settings."""
        local = _local(self.urls[i])
        stat = local.stat() if local is not None else None
        return [self.urls[i], int(self.sizes[i]), stat and stat.st_size, stat and stat.st_mtime_ns, self.slots,
                self.list_slots, self.missing_slot_policy]

    # -- one sample ------------------------------------------------------------------------------------------
    @property
    def _longer(self) -> str:
        """A shard longer than its size: samples left out, so the bad-row policy says stop or warn."""
        return "error" if self.on_bad_row == "error" else "warn"

    def _row_problem(self, where: str, message: str) -> _Skip:
        if self.on_bad_row == "error":
            raise DataError(f"{where}: {message} (data.on_bad_row=skip skips such samples)")
        return _Skip("bad_rows", f"{where}: {message}")

    def _bad_row(self, where: str, err: DataError) -> _Skip:
        return self._row_problem(where, str(err).removeprefix(f"{where}: "))

    def _texts(self, raw: dict, where: str, image: bool = True) -> list[str]:
        return self._parse(raw, where, image)[0]

    def _parse(self, raw: dict, where: str, image: bool = True) -> tuple[list[str], dict, dict]:
        """(texts of the run's slots, the sample's captions, its json row): the shared rule of
        :mod:`holiclip.data.webdataset`, its problems under ``on_bad_row``."""
        if image and image_member(raw) is None:
            raise self._row_problem(where, no_image(raw))
        try:
            row = json_row(raw, where)
            captions = sample_captions(raw, where, self.list_slots, row)
        except DataError as err:
            raise self._bad_row(where, err) from None
        texts = apply_missing_slot_policy(captions, self.slots, self.missing_slot_policy, where)
        if texts is None:
            gone = ", ".join(map(repr, missing_slots(captions, self.slots)))
            raise _Skip("dropped", f"{where} (no {gone}; data.missing_slot_policy=drop)")
        return texts, captions, row

    def _image(self, raw: dict, where: str, index: int) -> torch.Tensor:
        ext = image_member(raw)
        try:
            image = open_image(raw[ext], self.max_pixels)
            with torch.random.fork_rng(devices=[]):  # as MultiTextDataset: a crop per (seed, epoch, sample)
                # the CPU generator alone, as torch.manual_seed seeds it; torch.manual_seed also queues
                # the seeding of every accelerator with a stack trace each (~1.5 ms a sample)
                torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
                return self.transform(image)
        except UNREADABLE as err:
            reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)).removeprefix("<image bytes>: ")
            raise _Skip("bad", f"{where}.{ext}: {reason}") from None

    def _item(self, raw, url: str, offset: int, index: int) -> dict:
        if isinstance(raw, Missing):
            raise self._row_problem(f"{url}:#{offset}", f"sample missing: {raw.reason}")
        where = f"{url}:{raw.get('__key__')}"
        texts, captions, row = self._parse(raw, where)
        item = {"image": self._image(raw, where, index), "texts": texts, "index": index, "bad": []}
        try:  # pre-tokenised shards: Collate stacks these ids instead of tokenising
            tokens = stored_tokens(raw, row, captions, self.slots, self.missing_slot_policy, where)
        except DataError as err:
            raise self._bad_row(where, err) from None
        if tokens is not None:
            item["tokens"] = tokens
        return item


def _as_is(batch):
    return batch


def _trim_heap() -> None:
    """Hands the heap pages freed by the buffer's churn back to the system (glibc keeps them: samples
    held for random spans fragment its heap, and a worker's RSS would creep up over a long epoch)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to do
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC = None


class StreamLoader:
    """Iterates a DataLoader over a :class:`ShardStream`; a data error met in a worker is raised
    here as a :class:`DataError` with its own message (not a worker traceback)."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            if "error" in batch:
                raise DataError(batch["error"])
            yield batch


class _Stream:
    """One stream: the range ``[start, start + length)`` of the epoch's sequence, read in order,
    shuffled through the buffer. Positions below are relative to ``start``."""

    def __init__(self, owner: ShardStream, plan: Plan, start: int, length: int, seed: int):
        self.owner, self.plan = owner, plan
        self.start, self.length, self.seed = start, length, seed
        self.pending: set[int] = set()  # taken by the buffer, not given out yet
        self.held: dict[int, object] = {}  # raw samples of pending positions, read
        self.order = self._order(track=True)
        self.ahead: deque[int] = deque()  # given out by the buffer past the batch being made (substitutes)
        self.made = 0  # batches made or skipped
        self.reader: Iterator | None = None
        self.read_next = 0
        self.moved = False  # batches were skipped: reading may start later
        self.wrap: list[int] = []
        self.wrap_order: Iterator[int] | None = None

    def _order(self, track: bool) -> Iterator[int]:
        import webdataset as wds

        def positions():
            for p in range(self.length):
                if track:
                    self.pending.add(p)
                yield p

        q = self.owner.shuffle_buffer
        if q <= 1:
            return positions()
        return wds.shuffle(q, initial=q, rng=random.Random(self.seed))(positions())

    def _draw(self) -> int:
        return self.ahead.popleft() if self.ahead else next(self.order)

    def _done_with(self, p: int) -> None:
        self.pending.discard(p)
        self.held.pop(p, None)

    def take(self, local: int) -> list[int]:
        """The positions of the stream's batch ``local``, after passing over those of the batches before it
        not made here (other workers' or ranks', or consumed before a resume): positions only."""
        if local > self.made:
            for _ in range((local - self.made) * self.owner.batch_size):
                self._done_with(self._draw())
            self.made, self.moved = local, True
        positions = [self._draw() for _ in range(self.owner.batch_size)]
        self.made += 1
        return positions

    def batch(self, local: int, later: int = 0) -> dict:
        """Batch ``local``; ``later``: the stream's next batches trained in the same global batch by other
        ranks, whose samples are no replacements here (a sample twice in a global batch)."""
        positions = self.take(local)
        batch_set = set(positions)
        items, skipped = [], {"bad_rows": [], "dropped": []}
        candidates = self._candidates(batch_set, later * self.owner.batch_size)
        for p in positions:
            item, bad = self._try(p, skipped)
            tried = 0
            while item is None:
                if len(bad) >= MAX_SUBSTITUTIONS or tried >= MAX_SUBSTITUTIONS * 4:
                    raise DataError(f"{len(bad) + tried} unusable samples in a row replacing one; first: {bad[:3]}")
                q = next(candidates, None)
                if q is None:
                    raise DataError(f"no usable sample left in the stream to replace one: {bad[:3]}")
                tried += 1
                item, more = self._try(q, None)  # a replacement's left-out rows are counted at their own turn
                bad.extend(more)
            item["bad"] = bad
            items.append(item)
            self._done_with(p)
        batch = self.owner.collate(items)
        batch.update(skipped)
        return batch

    def _try(self, p: int, skipped: dict | None) -> tuple[dict | None, list[str]]:
        """The item at position ``p``, or None with the messages of an unreadable image."""
        g = self.start + p
        e, offset = self.plan.locate(g)
        shard = int(self.plan.shards[e])
        try:
            return self.owner._item(self._fetch(p), self.owner.urls[shard], offset,
                                    int(self.owner.bases[shard]) + offset), []
        except _Skip as skip:
            if skip.kind == "bad":
                return None, [skip.message]
            if skipped is not None:
                skipped[skip.kind].append(skip.message)
            return None, []

    def _candidates(self, batch: set[int], skip: int = 0) -> Iterator[int]:
        """Replacements: the stream's order after this batch (past its next ``skip`` positions), then from
        its start (wrapping around)."""
        t = skip
        while True:
            while len(self.ahead) <= t:
                nxt = next(self.order, None)
                if nxt is None:
                    break
                self.ahead.append(nxt)
            if t >= len(self.ahead):
                break
            yield self.ahead[t]
            t += 1
        k = 0
        while k < self.length:
            if k >= len(self.wrap):
                if self.wrap_order is None:
                    self.wrap_order = self._order(track=False)
                self.wrap.append(next(self.wrap_order))
            if self.wrap[k] not in batch:
                yield self.wrap[k]
            k += 1

    def _fetch(self, p: int):
        if p in self.held:
            return self.held[p]
        if p < self.read_next:  # given out long ago (a replacement from the stream's start): read it again
            return self._read_at(p)
        if self.moved:
            self.moved = False
            first = min(self.pending) if self.pending else p
            if min(first, p) > self.read_next:  # skip the part of the range no one needs any more
                self._restart(min(first, p))
        if self.reader is None:
            self._restart(self.read_next)
        found = None
        while self.read_next <= p:
            q, raw = next(self.reader)
            self.read_next = q + 1
            if q in self.pending:
                self.held[q] = raw
            if q == p:
                found = raw
        return found

    def _restart(self, p: int) -> None:
        self.close()
        self.reader, self.read_next = self._read_from(p), p

    def _read_from(self, p: int) -> Iterator[tuple[int, object]]:
        g, end = self.start + p, self.start + self.length
        e, _ = self.plan.locate(g)
        while g < end:
            s0, s1 = int(self.plan.starts[e]), min(int(self.plan.starts[e + 1]), end)
            if s1 > g:
                shard = int(self.plan.shards[e])
                for off, raw in read_shard(self.owner.urls[shard], g - s0, s1 - s0,
                                           expected=int(self.owner.sizes[shard]), longer=self.owner._longer):
                    yield s0 + off - self.start, raw
                g = s1
            e += 1

    def _read_at(self, p: int):
        e, offset = self.plan.locate(self.start + p)
        shard = int(self.plan.shards[e])
        reader = read_shard(self.owner.urls[shard], offset, offset + 1, expected=int(self.owner.sizes[shard]))
        try:
            return next(reader)[1]
        finally:
            reader.close()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

"""Embed an image collection once and search it by perspective (one faiss index per branch).

``embed_collection`` reads a folder / text list / JSONL / webdataset shards
(:class:`~holiclip.captioning.sources.ImageSource`: the image ids are its keys), encodes them with
:func:`~holiclip.evaluation.features.encode_images` in chunks, and writes an INDEX folder::

    manifest.json              model, branches, fusion modes, count, dim, index kind
    ids.json                   image ids, row order of every array below
    skipped.json               unreadable images (left out of the arrays)
    embeddings/<name>.npy      (N, D) float32, one per branch and one per fusion mode ("fused-mean")
    faiss/<name>.index         inner-product index over the same rows
    chunks/                    the finished chunks; a re-run skips them (resume after a kill)

Branch embeddings are unit vectors, so inner product is cosine similarity; the fused ones are
:func:`~holiclip.models.fusion.fuse` of them (``mean`` is renormalised too). A text query goes
through the model's text tower as in training; an image query is compared branch to branch
(its own ``background`` embedding against the collection's), or fused to fused.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .._extras import require
from ..captioning.sources import ImageSource
from ..data.records import DataError
from ..evaluation.features import encode_images, encode_texts, read_image
from ..io import atomic_path, read_json
from ..models.fusion import FUSION_MODES, fuse

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"


class SearchError(ValueError):
    """Bad input for embed / search: its message names the file, option or value."""


def require_faiss():
    return require("faiss", "search", "holiclip embed / search")


def fused_name(mode: str) -> str:
    return f"fused-{mode}"


def _write_json(path: Path, obj) -> None:
    # written beside and renamed: a kill leaves the old file or none, never half of one
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# -- embedding ---------------------------------------------------------------------------------
def _chunks(source: ImageSource, size: int):
    chunk = []
    for item in source:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _chunk_path(out: Path, i: int) -> Path:
    return out / "chunks" / f"{i:06d}.npz"


def _read_chunk(path: Path, *members: str) -> dict:
    """The named members only (an .npz reads each on access): the features of all chunks together
    may not fit in memory."""
    with np.load(path, allow_pickle=False) as z:
        out = {m: z[m] for m in members}
    for m in ("ids", "keys"):
        if m in out:
            out[m] = [str(s) for s in out[m]]
    if "skipped" in out:
        out["skipped"] = json.loads(str(out["skipped"]))
    return out


def _save_chunk(path: Path, keys: list[str], ids: list[str], features: np.ndarray, skipped: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a path
        np.savez(f, features=features, keys=np.array(keys, dtype=str), ids=np.array(ids, dtype=str),
                 skipped=np.array(json.dumps(skipped)))


def _build_faiss(vectors: np.ndarray, ivf: int | None, seed: int = 0):
    faiss = require_faiss()
    dim = vectors.shape[1]
    if not ivf:
        index = faiss.IndexFlatIP(dim)
    else:
        # k-means wants ~40-256 points per list; more only costs training time
        n_train = min(len(vectors), 256 * ivf)
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), n_train, replace=False))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, ivf, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(vectors[rows]))
    for s in range(0, len(vectors), 65536):  # from a memory map: a slice at a time
        index.add(np.ascontiguousarray(vectors[s : s + 65536]))
    return index


def embed_collection(
    model,
    transform,
    images: str | os.PathLike | ImageSource,
    out: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike,
    fusion: Sequence[str] = ("mean",),
    ivf: int | None = None,
    chunk_size: int = 2048,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Embeds every image of ``images`` into the INDEX folder ``out`` (see the module docstring)
    and returns its manifest. Finished chunks in ``out`` are kept: a re-run after an interruption
    encodes only the rest (the model, chunk size and source must be the same)."""
    from tqdm.auto import tqdm

    require_faiss()  # before hours of encoding, not after
    fusion = list(fusion)
    for mode in fusion:
        if mode not in FUSION_MODES:
            raise SearchError(f"unknown fusion mode {mode!r}; choose from {FUSION_MODES}")
    if ivf is not None and ivf < 1:
        raise SearchError(f"--ivf must be a positive number of lists, got {ivf}")
    if chunk_size < 1:
        raise SearchError(f"chunk size must be positive, got {chunk_size}")
    source = images if isinstance(images, ImageSource) else _open_source(images)
    out = Path(out)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    names = list(model.branch_names)
    # what the chunks depend on: a re-run with other settings must not mix embeddings
    job = {"checkpoint": str(Path(checkpoint).resolve()), "model": model.model_name, "branches": names,
           "source": source.src, "chunk_size": chunk_size}
    job_file = out / "chunks" / "job.json"
    if job_file.exists():
        old = read_json(job_file)
        changed = [k for k in job if old.get(k) != job[k]]
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {job[k]!r}" for k in changed)
            raise SearchError(f"{out} holds chunks of another embedding run ({detail}); "
                              "use a new --out or remove that folder")
    else:
        _write_json(job_file, job)

    model.eval()
    total = source.total()
    bar = tqdm(total=total, desc="embed", unit="img", disable=not progress)
    chunk_files, resumed = [], 0
    for i, items in enumerate(_chunks(source, chunk_size)):
        path = _chunk_path(out, i)
        keys = [it.key for it in items]
        if path.exists():
            if _read_chunk(path, "keys")["keys"] != keys:
                raise SearchError(f"{path}: its images differ from the source's images {i * chunk_size}-"
                                  f"{i * chunk_size + len(keys) - 1} ({source.src} changed); use a new --out")
            resumed += 1
        else:
            skipped: list[dict] = []
            inputs = [it.path if it.path is not None else it.data for it in items]
            try:
                feats = encode_images(model, inputs, transform, batch_size=batch_size, device=device,
                                      num_workers=num_workers, skipped=skipped).numpy()
            except DataError:  # not one readable image in this chunk: each one's reason, for skipped.json
                skipped = [{"index": j, "error": _why_unreadable(x)} for j, x in enumerate(inputs)]
                feats = np.zeros((0, model.num_branches, 0), dtype=np.float32)
            bad = {s["index"] for s in skipped}
            for s in skipped:
                s["image"] = keys[s["index"]]
                s["index"] += i * chunk_size
            ids = [k for j, k in enumerate(keys) if j not in bad]
            _save_chunk(path, keys, ids, feats.astype(np.float32), skipped)
        chunk_files.append(path)
        bar.update(len(items))
    bar.close()
    if not chunk_files:
        raise SearchError(f"{source.src}: no images found")
    if resumed:
        log.info("resumed: %d of %d chunks were already embedded in %s", resumed, len(chunk_files), out)
    return _finish(out, chunk_files, job, fusion, ivf)


def _why_unreadable(image) -> str:
    try:
        read_image(image)
    except DataError as err:
        return str(err)
    return "unreadable"


def _open_source(images) -> ImageSource:
    from ..captioning.sources import SourceError

    try:
        return ImageSource(images)
    except SourceError as err:
        raise SearchError(str(err)) from None


def _finish(out: Path, chunk_files: list[Path], job: dict, fusion: list[str], ivf: int | None) -> dict:
    """Chunks -> one memory-mappable array per branch / fusion mode, and its faiss index."""
    metas = [_read_chunk(p, "ids", "skipped") for p in chunk_files]
    ids = [k for m in metas for k in m["ids"]]
    skipped = [s for m in metas for s in m["skipped"]]
    if not ids:
        raise SearchError(f"{job['source']}: none of the {len(skipped)} images is readable")
    dim = next(_read_chunk(p, "features")["features"].shape[2] for p, m in zip(chunk_files, metas) if m["ids"])
    n = len(ids)
    if ivf is not None and ivf > n:
        raise SearchError(f"--ivf {ivf} needs at least {ivf} images to train on; the collection has {n}")
    names = job["branches"]
    targets = names + [fused_name(m) for m in fusion]
    (out / "embeddings").mkdir(exist_ok=True)
    (out / "faiss").mkdir(exist_ok=True)
    arrays = {t: np.lib.format.open_memmap(out / "embeddings" / f"{t}.npy.tmp", mode="w+", dtype=np.float32,
                                           shape=(n, dim)) for t in targets}
    row = 0
    for p, m in zip(chunk_files, metas):
        if not m["ids"]:
            continue
        f = _read_chunk(p, "features")["features"]
        for b, name in enumerate(names):
            arrays[name][row : row + len(f)] = f[:, b]
        for mode in fusion:
            arrays[fused_name(mode)][row : row + len(f)] = fuse(torch.from_numpy(f), mode).numpy()
        row += len(f)
    for a in arrays.values():
        a.flush()
    arrays.clear()  # closes the memory maps
    faiss = require_faiss()
    for t in targets:
        os.replace(out / "embeddings" / f"{t}.npy.tmp", out / "embeddings" / f"{t}.npy")
        index = _build_faiss(np.load(out / "embeddings" / f"{t}.npy", mmap_mode="r"), ivf)
        with atomic_path(out / "faiss" / f"{t}.index") as tmp:
            faiss.write_index(index, str(tmp))
    _write_json(out / "ids.json", ids)
    _write_json(out / "skipped.json", skipped)
    manifest = {
        "format": FORMAT,
        "model": job["model"],
        "checkpoint": job["checkpoint"],
        "source": job["source"],
        "branches": names,
        "fusion": fusion,
        "count": n,
        "skipped": len(skipped),
        "dim": dim,
        "dtype": "float32",
        "metric": "inner_product",
        "index": {"kind": "ivf-flat", "nlist": ivf} if ivf else {"kind": "flat"},
        "embeddings": {t: f"embeddings/{t}.npy" for t in targets},
        "faiss": {t: f"faiss/{t}.index" for t in targets},
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


# -- searching ---------------------------------------------------------------------------------
@dataclass
class Hit:
    rank: int
    score: float
    id: str
    row: int


@dataclass
class SearchIndex:
    """An INDEX folder written by :func:`embed_collection`; faiss indexes load on first use."""

    root: Path
    manifest: dict
    ids: list[str]
    _faiss: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> "SearchIndex":
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise SearchError(f"{path} not found: not an index written by `holiclip embed`"
                              + (" (or the embedding has not finished: run it again to resume)"
                                 if (root / "chunks").is_dir() else ""))
        manifest = read_json(path, SearchError)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else manifest
            raise SearchError(f"{path}: unknown index format {found!r}; expected {FORMAT}")
        index = cls(root, manifest, [])
        index.ids = index._checked_ids()
        index._check_arrays()
        return index

    # -- checks when opened: every mismatch named with its file and the way to a good index ------------
    def rebuild_hint(self) -> str:
        m = self.manifest
        ivf = f" --ivf {m['index']['nlist']}" if isinstance(m.get("index"), dict) and m["index"].get("nlist") else ""
        job = self.root / "chunks" / "job.json"  # the embedded chunks: a re-run with their settings reuses them
        try:
            chunk_size = f" --chunk-size {read_json(job)['chunk_size']}" if job.is_file() else ""
        except (ValueError, KeyError, TypeError):
            chunk_size = ""
        fusion = ",".join(m["fusion"]) if isinstance(m.get("fusion"), list) and m["fusion"] else "mean"
        return (f"rebuild it with `holiclip embed -c {m.get('checkpoint', 'MODEL')} --images {m.get('source', 'IMAGES')} "
                f"--out {self.root} --fusion {fusion}{ivf}{chunk_size}`")

    def _broken(self, where, why: str) -> SearchError:
        return SearchError(f"{where}: {why}; the index in {self.root} is damaged or was edited: {self.rebuild_hint()}")

    def _checked_ids(self) -> list[str]:
        m, path = self.manifest, self.root / MANIFEST
        for key, kind in (("count", int), ("dim", int), ("branches", list), ("fusion", list),
                          ("embeddings", dict), ("faiss", dict)):
            if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
                raise self._broken(path, f"{key!r} missing or not a {kind.__name__}")
        if m["dim"] < 1 or m["count"] < 1:
            raise self._broken(path, f"count {m['count']} and dim {m['dim']} must be positive")
        targets = list(m["branches"]) + [fused_name(f) for f in m["fusion"]]
        for key in ("embeddings", "faiss"):
            if sorted(m[key]) != sorted(targets):
                raise self._broken(path, f"{key!r} lists {sorted(m[key])}, the branches and fusion modes are {targets}")
        ids_path = self.root / "ids.json"
        if not ids_path.is_file():
            raise self._broken(ids_path, "not found")
        ids = read_json(ids_path, SearchError)
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise self._broken(ids_path, "not a list of image ids")
        if len(ids) != m["count"]:
            raise self._broken(ids_path, f"{len(ids)} image ids for the {m['count']} rows {MANIFEST} gives")
        return ids

    def _check_arrays(self) -> None:
        """Every embedding file's header (read, not the data: memory-mapped) and every faiss file there."""
        m = self.manifest
        for target in m["embeddings"]:
            path = self.root / m["embeddings"][target]
            try:
                shape = np.load(path, mmap_mode="r").shape
            except (OSError, ValueError) as err:
                raise self._broken(path, f"unreadable ({err})") from None
            if shape != (m["count"], m["dim"]):
                raise self._broken(path, f"shape {shape}; {MANIFEST} says ({m['count']}, {m['dim']})")
            if not (self.root / m["faiss"][target]).is_file():
                raise self._broken(self.root / m["faiss"][target], "not found")

    @property
    def branches(self) -> list[str]:
        return list(self.manifest["branches"])

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["faiss"])

    def target(self, branch: str | None = None, fusion: str | None = None) -> str:
        """The embedding a query runs against: a branch, a fusion mode, or the first fusion mode."""
        if branch is not None and fusion is not None:
            raise SearchError("give --branch or --fusion, not both")
        if branch is not None:
            if branch not in self.branches:
                raise SearchError(f"unknown branch {branch!r}; {self.root} has {self.branches}")
            return branch
        modes = list(self.manifest["fusion"])
        if fusion is None:
            if not modes:
                raise SearchError(f"{self.root} has no fused embedding; pick a --branch from {self.branches}")
            fusion = modes[0]
        if fusion not in modes:
            raise SearchError(f"{self.root} has no {fusion!r} fused embedding (it has {modes}); "
                              f"embed with --fusion {fusion}, or pick a --branch from {self.branches}")
        return fused_name(fusion)

    def embeddings(self, target: str) -> np.ndarray:
        """(N, D) float32, memory-mapped."""
        return np.load(self.root / self.manifest["embeddings"][target], mmap_mode="r")

    def faiss_index(self, target: str, nprobe: int | None = None):
        faiss = require_faiss()
        if target not in self._faiss:
            path = self.root / self.manifest["faiss"][target]
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as err:  # faiss's C++ exceptions: truncated, garbage, another format
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                raise self._broken(path, f"not a readable faiss index ({lines[-1] if lines else 'faiss error'})") from None
            if (index.ntotal, index.d) != (self.manifest["count"], self.manifest["dim"]):
                raise self._broken(path, f"{index.ntotal} vectors of width {index.d}; {MANIFEST} says "
                                         f"{self.manifest['count']} of width {self.manifest['dim']}")
            self._faiss[target] = index
        index = self._faiss[target]
        if hasattr(index, "nprobe"):
            # by default a tenth of the lists (at least 1): recall close to exact at a fraction of the cost
            index.nprobe = nprobe or max(1, index.nlist // 10)
        return index

    def search(self, queries: np.ndarray | torch.Tensor, target: str, k: int = 10,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top-k rows by inner product for each query vector (Q, D); fewer when the collection is smaller."""
        if k < 1:
            raise SearchError(f"-k must be at least 1, got {k}")
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.manifest["dim"]:
            # never reshaped to fit: a (1, 256) query against width 64 would become 4 queries
            raise SearchError(f"query embeddings of shape {tuple(np.shape(queries))} against {self.root}, whose "
                              f"embeddings have width {self.manifest['dim']} (model {self.manifest.get('model')!r}): "
                              "encode the queries with the model the index was embedded with")
        q = np.ascontiguousarray(q)
        scores, rows = self.faiss_index(target, nprobe).search(q, min(k, len(self.ids)))
        return [[Hit(r + 1, float(s), self.ids[i], int(i)) for r, (s, i) in enumerate(zip(sc, rw)) if i >= 0]
                for sc, rw in zip(scores, rows)]


def encode_text_query(model, tokenizer, texts: Sequence[str], device="cpu") -> torch.Tensor:
    """(Q, D) unit-norm text embeddings: the shared text tower, as every branch was trained against."""
    return encode_texts(model, tokenizer, list(texts), device=device).features


def encode_image_query(model, transform, image, target: str, device="cpu") -> torch.Tensor:
    """(1, D): the query image's embedding in the same space as the collection's ``target``
    (that branch of it, or its branches fused the same way)."""
    # read here: an unreadable query is one error naming the file
    picture = read_image(str(image) if isinstance(image, Path) else image)
    feats = encode_images(model, [picture], transform, device=device)
    names = list(model.branch_names)
    if target in names:
        return feats[:, names.index(target)]
    return fuse(feats, target.removeprefix("fused-"))

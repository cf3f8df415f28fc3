"""Image sources for captioning: a folder, a text file of paths, a JSONL, or webdataset shards.

Every image gets a stable ``key``, the ``image`` field of the caption rows and the identity
used for resuming:
- files: the absolute path (``os.path.abspath``; symlinks are kept as given), so that a re-run
  from another working directory still recognises finished work;
- webdataset samples: ``"<absolute shard path>::<__key__>"``
  (:func:`holiclip.data.webdataset.sample_id`, the id every shard reader gives a sample).

Relative paths in a JSONL or a text list are relative to that file's folder (the project's
JSONL convention). Sources are lazy: millions of paths are never held as image bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from holiclip.data import webdataset as wd
from holiclip.data.readers import IMAGE_EXTENSIONS, resolve_path
from holiclip.io import jsonl_rows, text_lines

_MIME_BY_EXT = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
    ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff",
}


class SourceError(ValueError):
    pass


@dataclass
class ImageItem:
    key: str
    path: str | None = None  # file on disk, read lazily
    data: bytes | None = None  # bytes already in memory (webdataset)
    ext: str = ""

    def load(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()


def guess_mime(data: bytes, ext: str = "") -> str:
    """MIME type from the file's magic bytes, else its extension (data URLs need one)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:2] == b"BM":
        return "image/bmp"
    return _MIME_BY_EXT.get(ext.lower(), "application/octet-stream")


def file_key(path: str, base: str | Path) -> str:
    """The key of an image file named in a file in folder ``base`` (see the module docstring)."""
    return os.path.abspath(resolve_path(base, path))


class ImageSource:
    """Iterates :class:`ImageItem` from ``src``; ``shard=(i, n)`` keeps the i-th of n parts.

    Sharding is by image index for file sources and by tar file for webdataset shards (so
    that each rank reads only its own tars).
    """

    def __init__(self, src: str | os.PathLike, shard: tuple[int, int] = (0, 1)):
        self.src = str(src)
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise SourceError(f"invalid shard {i}/{n}: need 0 <= i < n")
        self.shard = (i, n)
        p = Path(self.src)
        if p.is_dir():
            has_images = any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir())
            self.kind = "webdataset" if not has_images and wd.shard_urls(self.src) else "folder"
        elif wd.shard_urls(self.src) is not None:
            self.kind = "webdataset"
        elif not p.exists():
            raise SourceError(f"{self.src}: no such file or folder")
        elif p.suffix.lower() in (".jsonl", ".json"):
            self.kind = "jsonl"
        else:
            self.kind = "list"

    # -- file sources ---------------------------------------------------------------------
    def _paths(self) -> Iterator[str]:
        p = Path(self.src)
        if self.kind == "folder":
            for root, dirs, files in os.walk(p):
                dirs.sort()  # deterministic order, so shards are stable between runs
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        yield os.path.abspath(os.path.join(root, name))
        elif self.kind == "jsonl":
            for where, row in jsonl_rows(p, error=SourceError):
                img = row.get("image")
                if not isinstance(img, str) or not img:
                    raise SourceError(f"{where}: missing string field 'image'")
                yield file_key(img, p.parent)
        else:  # text list: one path per line, '#' starts a comment line
            with open(p, "rb") as f:
                for line in text_lines(f, p, SourceError):
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield file_key(line, p.parent)

    def __iter__(self) -> Iterator[ImageItem]:
        i, n = self.shard
        if self.kind == "webdataset":
            yield from self._iter_wds(wd.shard_urls(self.src)[i::n])
            return
        for k, path in enumerate(self._paths()):
            if k % n == i:
                yield ImageItem(key=path, path=path, ext=os.path.splitext(path)[1])

    def _iter_wds(self, urls: list[str]) -> Iterator[ImageItem]:
        for sample in wd.iter_raw(urls, "captioning webdataset shards"):
            ext = wd.image_member(sample)
            if ext is None:
                raise SourceError(f"{wd.where(sample)}: {wd.no_image(sample)}")
            yield ImageItem(key=wd.sample_id(str(sample["__url__"]), sample["__key__"]), data=sample[ext],
                            ext="." + ext)

    def total(self) -> int | None:
        """Number of images in this shard, when cheap to know (not for webdataset)."""
        if self.kind == "webdataset":
            return None
        i, n = self.shard
        count = sum(1 for _ in self._paths())
        return count // n + (1 if i < count % n else 0)

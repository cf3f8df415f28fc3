"""The append-only ``captions*.jsonl`` files: crash-safe writing and tolerant reading.

Guarantees (what ``holiclip caption run`` promises about a hard kill):
- each row is written with ``os.write`` on an ``O_APPEND`` descriptor as one complete line,
  bypassing Python's buffer (a buffered writer may flush half a long line);
- at start the writer truncates a final torn line (a kill in the middle of a write) from the
  file it owns, so the next row never glues onto half a row;
- readers skip a torn final line and report (never die on) an undecodable line, naming it;
- an exclusive ``flock`` on the file stops two runs from writing the same file (which would
  duplicate rows); the kernel drops the lock when a process dies, even by SIGKILL.

Rows: ``{"image", "perspective", "model", "prompt", "text", "finish_reason"}``.
A sharded run (``--shard i/n`` or torchrun) writes ``captions.<i>-of-<n>.jsonl``; every reader
takes all ``captions*.jsonl`` files of a folder.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from holiclip.io import jsonl_rows

try:  # POSIX only; elsewhere the same-file guard is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


def caption_file_name(shard: tuple[int, int] = (0, 1)) -> str:
    i, n = shard
    return "captions.jsonl" if n == 1 else f"captions.{i:05d}-of-{n:05d}.jsonl"


def caption_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of captions (no such folder)")
    return sorted(folder.glob("captions*.jsonl"))


@dataclass
class ReadProblems:
    """Lines a reader skipped, as ``"file:line: why"`` strings."""

    items: list[str] = field(default_factory=list)

    def add(self, path: Path, lineno: int, why: str) -> None:
        self.items.append(f"{path}:{lineno}: {why}")


def _caption_row(row: dict, where: str) -> dict:
    if any(k not in row for k in ("image", "perspective", "model", "text")):
        raise ValueError(f"{where}: not a caption row (needs image, perspective, model, text)")
    return row


def read_rows(path: str | os.PathLike, problems: ReadProblems | None = None) -> Iterator[tuple[str, dict]]:
    """Yields ``("file:line", row)``; skips (and records) a torn last line and bad lines."""
    skipped = None if problems is None else (lambda message: problems.items.append(f"{message}, skipped"))
    yield from jsonl_rows(path, _caption_row, on_error="skip", skipped=skipped, torn_tail=True)


FAILURES = "failures.jsonl"  # {"image", "perspective", "model", "error", "time"}: one line per request given up on


def _failure_row(row: dict, where: str) -> dict:
    if any(k not in row for k in ("image", "perspective", "model")):
        raise ValueError(f"{where}: not a failure row (needs image, perspective, model)")
    return row


def read_failures(folder: str | os.PathLike, problems: ReadProblems | None = None) -> Iterator[tuple[str, dict]]:
    """The folder's failed requests, as :func:`read_rows` reads captions; nothing when there were none."""
    path = Path(folder) / FAILURES
    if not path.is_file():
        return
    skipped = None if problems is None else (lambda message: problems.items.append(f"{message}, skipped"))
    yield from jsonl_rows(path, _failure_row, on_error="skip", skipped=skipped, torn_tail=True)


def repair_torn_tail(path: str | os.PathLike) -> int:
    """Truncates an unterminated last line; returns the number of bytes dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # scan back in blocks for the last newline
        pos, keep = size, 0
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            k = block.rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            pos = start
        f.truncate(keep)
        return size - keep


class CaptionWriter:
    """Appends rows to one captions file; one writer per file (enforced with flock)."""

    def __init__(self, path: str | os.PathLike, fsync_every_s: float = 2.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                raise RuntimeError(
                    f"{self.path}: another run is writing this file (same folder and shard); "
                    "stop it or use another --out/--shard"
                ) from None
        # Only now, holding the lock, is it safe to cut a torn line left by a killed run.
        self.dropped_bytes = repair_torn_tail(self.path)
        self.fsync_every_s = fsync_every_s
        self._last_sync = time.monotonic()
        self.rows_written = 0

    def write(self, row: dict) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # os.write may write less than asked (rare for files); finish the line
            n = os.write(self.fd, view)
            view = view[n:]
        self.rows_written += 1
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_every_s:
            os.fsync(self.fd)
            self._last_sync = now

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.fsync(self.fd)
            finally:
                os.close(self.fd)  # also releases the flock
                self.fd = -1

    def __enter__(self) -> "CaptionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One-off append of one full line (for the failures log)."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)

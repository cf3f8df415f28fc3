"""The resumable captioning runner: images x perspectives -> ``captions.jsonl`` rows.

Resume: at start, every ``captions*.jsonl`` of the output folder is read and each
(image, perspective, model) already present is skipped; so re-running the same command only
does what is missing (failed requests included) and never writes a row twice. A hard kill
loses at most the requests in flight (see ``store`` for the crash-safety of the file).

Throughput: a bounded queue feeds ``concurrency`` workers, each sending batches of up to
``batch_size`` requests to the backend; the queue bound keeps memory flat on millions of
images. Image files are read in a thread so the event loop keeps the HTTP requests moving.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .backends import Backend, CaptionFatalError, CaptionRequest, CaptionResult
from .perspectives import Perspective
from .sources import ImageSource, guess_mime
from .store import CaptionWriter, ReadProblems, append_jsonl, caption_file_name, caption_files, read_rows

log = logging.getLogger("holiclip.captioning")


class RunAborted(RuntimeError):
    """Too many failures in a row (the server is probably down), or a failure that every
    request would hit (a refused API key); finished rows are kept."""


@dataclass
class RunStats:
    images: int = 0  # images seen in the source (this shard)
    images_skipped: int = 0  # already complete before this run
    requests: int = 0  # requests sent (rows attempted)
    rows_written: int = 0
    failures: int = 0
    retries: int = 0
    seconds: float = 0.0
    output: str = ""
    problems: list[str] = field(default_factory=list)  # torn/bad lines found while resuming

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def load_done(out_dir: Path, model: str, perspectives: Sequence[Perspective],
              problems: ReadProblems | None = None) -> dict[str, int]:
    """image -> bit mask of the perspectives (by position) already captioned by ``model``."""
    bit = {p.name: 1 << k for k, p in enumerate(perspectives)}
    done: dict[str, int] = {}
    if not out_dir.is_dir():
        return done
    for path in caption_files(out_dir):
        for _, row in read_rows(path, problems):
            b = bit.get(row["perspective"])
            if b and row["model"] == model:
                done[row["image"]] = done.get(row["image"], 0) | b
    return done


async def run_captioning_async(
    source: ImageSource,
    perspectives: Sequence[Perspective],
    backend: Backend,
    out_dir: str | Path,
    *,
    max_new_tokens: int = 77,
    progress: bool = True,
    max_consecutive_failures: int = 100,
) -> RunStats:
    out_dir = Path(out_dir)
    perspectives = list(perspectives)
    full_mask = (1 << len(perspectives)) - 1
    stats = RunStats()
    t0 = time.monotonic()
    writer = CaptionWriter(out_dir / caption_file_name(source.shard))
    stats.output = str(writer.path)
    problems = ReadProblems()
    if writer.dropped_bytes:
        problems.add(writer.path, 0, f"cut a torn final line ({writer.dropped_bytes} bytes) left by a killed run")
    # `claimed` doubles as the done-set and the "already scheduled" set, so an image listed
    # twice in the source is still captioned once.
    claimed = load_done(out_dir, backend.model, perspectives, problems)
    stats.problems = problems.items
    for p in problems.items:
        log.warning("%s", p)

    workers_n = max(1, backend.concurrency)
    queue: asyncio.Queue = asyncio.Queue(maxsize=workers_n * backend.batch_size * 2)
    remaining: dict[str, int] = {}  # image -> requests still in flight
    failures_log = out_dir / "failures.jsonl"
    consecutive = 0
    total = source.total() if progress else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.05,
                   desc=f"caption {backend.model}")

    def image_finished() -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(fail=stats.failures, retries=getattr(backend, "retries", 0),
                            req_s=f"{stats.requests / max(1e-9, time.monotonic() - t0):.1f}", refresh=False)

    async def produce() -> None:
        for item in source:
            stats.images += 1
            mask = claimed.get(item.key, 0)
            todo = [p for k, p in enumerate(perspectives) if not mask >> k & 1]
            if not todo:
                stats.images_skipped += 1
                image_finished()
                continue
            claimed[item.key] = full_mask
            data, mime = b"", ""
            if backend.needs_image_bytes:
                try:
                    data = await asyncio.to_thread(item.load)
                    mime = guess_mime(data, item.ext)
                except OSError as err:
                    for p in todo:
                        record_failure(item.key, p, f"cannot read image: {err}")
                    image_finished()
                    continue
            remaining[item.key] = len(todo)
            for p in todo:
                await queue.put(CaptionRequest(item.key, data, mime, p.name, p.prompt,
                                               p.max_new_tokens or max_new_tokens))

    def record_failure(image: str, perspective: Perspective | str, error: str) -> None:
        nonlocal consecutive
        stats.failures += 1
        consecutive += 1
        name = perspective if isinstance(perspective, str) else perspective.name
        append_jsonl(failures_log, {"image": image, "perspective": name, "model": backend.model,
                                    "error": error, "time": time.time()})
        if consecutive >= max_consecutive_failures:
            raise RunAborted(
                f"{consecutive} failures in a row (last: {error}); stopping. "
                f"Rows so far are in {writer.path}; re-run the same command to resume."
            )

    async def work() -> None:
        nonlocal consecutive
        while True:
            req = await queue.get()
            if req is None:
                return
            batch, last = [req], False
            while len(batch) < backend.batch_size:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:  # our stop signal: finish this batch, then stop
                    last = True
                    break
                batch.append(nxt)
            stats.requests += len(batch)
            results = await backend.generate(batch)
            fatal = None
            for r, res in zip(batch, results):
                if isinstance(res, CaptionFatalError):
                    # Not the image's fault: no failure row; the rest of the batch is still kept.
                    fatal = fatal or res
                    continue
                if isinstance(res, CaptionResult):
                    consecutive = 0
                    writer.write({"image": r.image, "perspective": r.perspective, "model": backend.model,
                                  "prompt": r.prompt, "text": res.text, "finish_reason": res.finish_reason})
                    stats.rows_written += 1
                else:
                    record_failure(r.image, r.perspective, f"{type(res).__name__}: {res}")
                remaining[r.image] -= 1
                if remaining[r.image] == 0:
                    del remaining[r.image]
                    image_finished()
            if fatal is not None:
                raise RunAborted(
                    f"{fatal}. Stopped: no request is sent after that answer. Rows so far are in "
                    f"{writer.path}; once that is fixed, re-run the same command to resume."
                )
            if last:
                return

    workers = [asyncio.create_task(work()) for _ in range(workers_n)]
    producer = asyncio.create_task(produce())
    try:
        # Whichever fails first (source error, RunAborted) stops everything; workers only
        # end early by failing, so watch them while the producer runs.
        pending = await _watch({producer, *workers}, until=[producer])

        async def stop_workers() -> None:  # producer finished cleanly: one stop signal each
            for _ in workers:
                await queue.put(None)

        stopper = asyncio.create_task(stop_workers())
        try:
            await _watch(pending | {stopper}, until=workers)
        finally:
            stopper.cancel()
    finally:
        for t in (producer, *workers):
            t.cancel()
        await asyncio.gather(producer, *workers, return_exceptions=True)
        writer.close()
        await backend.aclose()
        if bar is not None:
            bar.close()
        stats.retries = getattr(backend, "retries", 0)
        stats.seconds = time.monotonic() - t0
    return stats


async def _watch(tasks: set, until: list) -> set:
    """Waits until every task of ``until`` is done; re-raises the first failure of any task."""
    pending = set(tasks)
    while not all(t.done() for t in until):
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
    return pending


def run_captioning(source, perspectives, backend, out_dir, **kwargs) -> RunStats:
    """Synchronous wrapper of :func:`run_captioning_async`."""
    return asyncio.run(run_captioning_async(source, perspectives, backend, out_dir, **kwargs))

"""The resumable captioning runner: images x perspectives -> ``captions.jsonl`` rows.

Resume: at start, every ``captions*.jsonl`` of the output folder is read and each
(image, perspective, model) already captioned is skipped; so re-running the same command only
does what is missing (failed requests included) and never writes a row twice. A hard kill
loses at most the requests in flight (see ``store`` for the crash-safety of the file).

Refusals: an empty or refused answer (``quality.is_caption``) is asked again up to
``retry_refusals`` times; one still refused is a failure (``failures.jsonl``, never a caption
row), so the run reports it and a re-run sends it again. A row an older version wrote with a
refused text does not count as captioned either.

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
from .quality import is_caption, missing_flag
from .sources import ImageSource, guess_mime
from .store import FAILURES, CaptionWriter, ReadProblems, append_jsonl, caption_file_name, caption_files, read_rows

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
    refusal_retries: int = 0  # empty / refused answers asked again
    seconds: float = 0.0
    output: str = ""
    problems: list[str] = field(default_factory=list)  # torn/bad lines found while resuming

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def load_done(out_dir: Path, model: str, perspectives: Sequence[Perspective],
              problems: ReadProblems | None = None) -> dict[str, int]:
    """image -> bit mask of the perspectives (by position) already captioned by ``model`` (a
    refused or empty text is not captioned)."""
    bit = {p.name: 1 << k for k, p in enumerate(perspectives)}
    done: dict[str, int] = {}
    if not out_dir.is_dir():
        return done
    for path in caption_files(out_dir):
        for _, row in read_rows(path, problems):
            b = bit.get(row["perspective"])
            if b and row["model"] == model and is_caption(row["text"]):
                done[row["image"]] = done.get(row["image"], 0) | b
    return done


class _Run:
    """One run's shared state; ``produce`` feeds the queue, ``concurrency`` copies of ``work``
    drain it in batches, and the counters live in ``stats``."""

    def __init__(self, source: ImageSource, perspectives: Sequence[Perspective], backend: Backend,
                 out_dir: Path, max_new_tokens: int, progress: bool, max_consecutive_failures: int,
                 retry_refusals: int = 2):
        self.source, self.backend, self.out_dir = source, backend, out_dir
        self.retry_refusals = retry_refusals
        self.perspectives = list(perspectives)
        self.full_mask = (1 << len(self.perspectives)) - 1
        self.max_new_tokens, self.max_consecutive_failures = max_new_tokens, max_consecutive_failures
        self.stats = RunStats()
        self.t0 = time.monotonic()
        self.writer = CaptionWriter(out_dir / caption_file_name(source.shard))
        self.stats.output = str(self.writer.path)
        problems = ReadProblems()
        if self.writer.dropped_bytes:
            problems.add(self.writer.path, 0,
                         f"cut a torn final line ({self.writer.dropped_bytes} bytes) left by a killed run")
        # `claimed` doubles as the done-set and the "already scheduled" set, so an image listed
        # twice in the source is still captioned once.
        self.claimed = load_done(out_dir, backend.model, self.perspectives, problems)
        self.stats.problems = problems.items
        for p in problems.items:
            log.warning("%s", p)
        self.workers_n = max(1, backend.concurrency)
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=self.workers_n * backend.batch_size * 2)
        self.remaining: dict[str, int] = {}  # image -> requests still in flight
        self.failures_log = out_dir / FAILURES
        self.consecutive = 0  # failures in a row
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=source.total(), unit="img", file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.05, desc=f"caption {backend.model}")

    def image_finished(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                fail=self.stats.failures, retries=getattr(self.backend, "retries", 0),
                req_s=f"{self.stats.requests / max(1e-9, time.monotonic() - self.t0):.1f}", refresh=False)

    def record_failure(self, image: str, perspective: str, error: str) -> None:
        self.stats.failures += 1
        self.consecutive += 1
        append_jsonl(self.failures_log, {"image": image, "perspective": perspective, "model": self.backend.model,
                                         "error": error, "time": time.time()})
        if self.consecutive >= self.max_consecutive_failures:
            raise RunAborted(
                f"{self.consecutive} failures in a row (last: {error}); stopping. "
                f"Rows so far are in {self.writer.path}; re-run the same command to resume."
            )

    async def produce(self) -> None:
        for item in self.source:
            self.stats.images += 1
            mask = self.claimed.get(item.key, 0)
            todo = [p for k, p in enumerate(self.perspectives) if not mask >> k & 1]
            if not todo:
                self.stats.images_skipped += 1
                self.image_finished()
                continue
            self.claimed[item.key] = self.full_mask
            data, mime = b"", ""
            if self.backend.needs_image_bytes:
                try:
                    data = await asyncio.to_thread(item.load)
                    mime = guess_mime(data, item.ext)
                except OSError as err:
                    for p in todo:
                        self.record_failure(item.key, p.name, f"cannot read image: {err}")
                    self.image_finished()
                    continue
            self.remaining[item.key] = len(todo)
            for p in todo:
                await self.queue.put(CaptionRequest(item.key, data, mime, p.name, p.prompt,
                                                    p.max_new_tokens or self.max_new_tokens))

    async def next_batch(self) -> tuple[list[CaptionRequest], bool]:
        """Waits for one request, adds what is already queued up to ``batch_size``; the flag
        says a stop signal came (finish this batch, then stop). An empty batch: stop now."""
        req = await self.queue.get()
        if req is None:
            return [], True
        batch = [req]
        while len(batch) < self.backend.batch_size:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def record_results(self, batch: list[CaptionRequest], results: list) -> None:
        fatal = None
        for r, res in zip(batch, results):
            if isinstance(res, CaptionFatalError):
                # Not the image's fault: no failure row; the rest of the batch is still kept.
                fatal = fatal or res
                continue
            if isinstance(res, CaptionResult) and not is_caption(res.text):
                self.record_failure(r.image, r.perspective, f"{missing_flag(res.text)} answer "
                                    f"(asked {self.retry_refusals + 1} times): {res.text[:120]!r}")
            elif isinstance(res, CaptionResult):
                self.consecutive = 0
                self.writer.write({"image": r.image, "perspective": r.perspective, "model": self.backend.model,
                                   "prompt": r.prompt, "text": res.text, "finish_reason": res.finish_reason})
                self.stats.rows_written += 1
            else:
                self.record_failure(r.image, r.perspective, f"{type(res).__name__}: {res}")
            self.remaining[r.image] -= 1
            if self.remaining[r.image] == 0:
                del self.remaining[r.image]
                self.image_finished()
        if fatal is not None:
            raise RunAborted(
                f"{fatal}. Stopped: no request is sent after that answer. Rows so far are in "
                f"{self.writer.path}; once that is fixed, re-run the same command to resume."
            )

    async def work(self) -> None:
        while True:
            batch, last = await self.next_batch()
            if batch:
                self.stats.requests += len(batch)
                self.record_results(batch, await self.ask_again(batch, await self.backend.generate(batch)))
            if last:
                return

    async def ask_again(self, batch: list[CaptionRequest], results: list) -> list:
        """Sends the requests answered with an empty or refused text again, up to ``retry_refusals`` times."""
        results = list(results)
        for _ in range(self.retry_refusals):
            again = [k for k, res in enumerate(results) if isinstance(res, CaptionResult) and not is_caption(res.text)]
            if not again:
                break
            self.stats.requests += len(again)
            self.stats.refusal_retries += len(again)
            for k, res in zip(again, await self.backend.generate([batch[k] for k in again])):
                results[k] = res
        return results

    async def run(self) -> RunStats:
        workers = [asyncio.create_task(self.work()) for _ in range(self.workers_n)]
        producer = asyncio.create_task(self.produce())
        try:
            # Whichever fails first (source error, RunAborted) stops everything; workers only
            # end early by failing, so watch them while the producer runs.
            pending = await _watch({producer, *workers}, until=[producer])

            async def stop_workers() -> None:  # producer finished cleanly: one stop signal each
                for _ in workers:
                    await self.queue.put(None)

            stopper = asyncio.create_task(stop_workers())
            try:
                await _watch(pending | {stopper}, until=workers)
            finally:
                stopper.cancel()
        finally:
            for t in (producer, *workers):
                t.cancel()
            await asyncio.gather(producer, *workers, return_exceptions=True)
            self.writer.close()
            await self.backend.aclose()
            if self.bar is not None:
                self.bar.close()
            self.stats.retries = getattr(self.backend, "retries", 0)
            self.stats.seconds = time.monotonic() - self.t0
        return self.stats


async def run_captioning_async(
    source: ImageSource,
    perspectives: Sequence[Perspective],
    backend: Backend,
    out_dir: str | Path,
    *,
    max_new_tokens: int = 77,
    progress: bool = True,
    max_consecutive_failures: int = 100,
    retry_refusals: int = 2,
) -> RunStats:
    return await _Run(source, perspectives, backend, Path(out_dir), max_new_tokens, progress,
                      max_consecutive_failures, retry_refusals).run()


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

"""What a launch pays for the text cache: the text pass over shards, a launch on a complete cache,
and the fill rate; the way launches did it before (read every byte, hash every text) measured in
the same run as the baseline.

Synthetic shards (8 x 1000 samples: a 33 KB "jpg" of random bytes, never decoded, and a json with
5 captions of 10-90 words); a stand-in trunk (bench_text_cache.py's, W = 384), so the cache and the
reading are measured, not a transformer. Bytes read: the process's ``rchar`` (read syscalls; pages
already in the page cache count too).

    python bench/bench_text_cache_launch.py [--shards 8] [--samples 1000]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_text_cache import Tokenizer, Trunk  # noqa: E402

SLOTS = ["web", "detail", "background", "main", "style"]
WORDS = "the a dog cat sits on wooden table beside window sunlight warm cozy room background green trees car".split()


def write_shards(root: Path, shards: int, samples: int) -> list[str]:
    rng, pick = np.random.default_rng(0), random.Random(0)
    payload = rng.integers(0, 255, 33 * 1024, dtype=np.uint8).tobytes()
    lengths = dict(zip(SLOTS, (10, 90, 35, 20, 25)))
    urls = []
    for s in range(shards):
        path = root / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(samples):
                caps = {k: f"{s}-{i} " + " ".join(pick.choice(WORDS) for _ in range(n)) for k, n in lengths.items()}
                for ext, data in (("jpg", payload), ("json", json.dumps({"captions": caps}).encode())):
                    info = tarfile.TarInfo(f"{s:04d}{i:05d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        urls.append(str(path))
    (root / "sizes.json").write_text(json.dumps({Path(u).name: samples for u in urls}))
    return urls


def rchar() -> int:
    return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])


def measured(fn):
    r0, t0 = rchar(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, rchar() - r0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=1000, help="per shard")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from holiclip.data import shards as S
    from holiclip.training.text_cache import TextCache, fill_text_cache

    root = Path(tempfile.mkdtemp(prefix="bench_text_cache_launch_"))
    try:
        urls = write_shards(root, args.shards, args.samples)
        n = args.shards * args.samples
        total = sum(os.path.getsize(u) for u in urls)
        stream = S.ShardStream(urls, SLOTS, 8, transform=None)
        opened = []
        for name in ("tar_members", "_open"):  # every way a shard is opened
            def counted(url, *a, _real=getattr(S, name), **k):
                opened.append(url)
                return _real(url, *a, **k)
            setattr(S, name, counted)

        def streamed_texts():  # the text pass before: the tar streamed (every byte read), text members kept
            for u in urls:
                for _, raw in S.read_shard(u, 0, args.samples, text_only=True):
                    yield from stream._texts(raw, u, image=False)

        def stream_pass():
            return sum(1 for _ in streamed_texts())

        rows = []
        _, dt, rd = measured(stream_pass)
        rows.append(("text pass, tar streamed (before)", n / dt, rd, len(urls)))
        opened.clear()
        _, dt, rd = measured(lambda: sum(1 for _ in stream.iter_texts()))
        rows.append(("text pass, text members only (after)", n / dt, rd, len(opened)))

        cache = TextCache(root / "cache")
        opened.clear()
        filled, fill_s, rd = measured(lambda: fill_text_cache(cache, stream, Trunk(), Tokenizer(), progress=False))
        rows.append(("first fill (1 rank)", n / fill_s, rd, len(opened)))
        opened.clear()
        _, dt, rd = measured(lambda: TextCache(root / "cache").ensure(streamed_texts(), Trunk(), Tokenizer(),
                                                                     progress=False))
        before = dt
        rows.append(("complete cache: every text streamed, hashed (before)", n / dt, rd, len(urls)))
        opened.clear()
        again, dt, rd = measured(lambda: fill_text_cache(TextCache(root / "cache"), stream, Trunk(), Tokenizer(),
                                                         progress=False))
        assert again["read"] == 0 and not opened
        after = dt
        rows.append(("complete cache: completion records (after)", n / dt, rd, len(opened)))
        print(f"{args.shards} shards x {args.samples} samples, {total / 2**20:.0f} MiB; {filled['texts']:,} texts "
              f"({filled['new']:,} unique); stand-in trunk W = 384; {os.cpu_count()} CPUs")
        print(f"| {'step':<52} | {'samples/s':>12} | {'MiB read':>9} | {'of shards':>9} | {'shards opened':>13} |")
        print(f"|{'-' * 54}|{'-' * 13}:|{'-' * 10}:|{'-' * 10}:|{'-' * 14}:|")
        for name, rate, rd, count in rows:
            print(f"| {name:<52} | {rate:>12,.0f} | {rd / 2**20:>9.1f} | {rd / total:>8.2f}x | {count:>13} |")
        print(f"complete-cache launch: {before * 1e3:.0f} ms before, {after * 1e3:.1f} ms after "
              f"({before / after:,.0f}x); fill {filled['texts'] / fill_s:,.0f} texts/s on one rank")
        print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

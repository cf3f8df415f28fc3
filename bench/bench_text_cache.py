"""Text cache at scale: peak memory of filling, then reading, a cache of 100k vs 1M texts.

A stand-in trunk (a fixed random projection of the text's first bytes, W = 384) replaces the
text tower, so the bench measures the cache (hashing, chunked deduplication, the on-disk
segments, binary search, row gathers), not a transformer. Each phase runs in a fresh process;
its peak RSS (VmHWM) and its anonymous RSS at the end are read from /proc/self/status.

- fill: ``TextCache.ensure`` over N texts plus N/10 repeats (streamed from a generator);
- read: ``TextCache.lookup`` of random batches of 256 x 5 texts, as the loader's workers do
  (the same number of batches at every size), checked against the stand-in trunk.

    python bench/bench_text_cache.py                 # 100k and 1M texts (1.5 GB on disk at 1M)
    python bench/bench_text_cache.py --sizes 10000 100000 --batches 50
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WIDTH = 384
LENGTH = 16
WORDS = ("red", "green", "blue", "small", "large", "dog", "cat", "house", "tree", "car", "boat", "field", "river",
         "mountain", "street", "child", "woman", "man", "bird", "horse", "table", "chair", "window", "sky")


def text(i: int) -> str:
    """A distinct caption-like text per i (about 60 characters)."""
    w = WORDS
    return (f"picture {i}: a {w[i % 24]} {w[(i // 24) % 24]} near a {w[(i // 576) % 24]} "
            f"{w[(i // 13824) % 24]} in the collection")


class Tokenizer:
    """Stand-in tokenizer: the text's first LENGTH bytes + 1 (no padding)."""

    context_length = LENGTH

    def __call__(self, texts):
        raw = b"".join(t.encode()[:LENGTH].ljust(LENGTH, b" ") for t in texts)
        return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(-1, LENGTH).astype(np.int64) + 1)


class Trunk(torch.nn.Module):
    """Stand-in frozen trunk: tanh of a fixed random projection of the token ids."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(LENGTH, WIDTH, generator=torch.Generator().manual_seed(0)) / 256,
                                       requires_grad=False)

    def text_trunk(self, tokens):
        return torch.tanh(tokens.float() @ self.proj)


def memory() -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    mb = {k: int(status[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon", "RssFile")}
    return {"peak_rss_mb": mb["VmHWM"], "anon_mb": mb["RssAnon"], "file_mb": mb["RssFile"]}


def phase_fill(folder: Path, n: int) -> dict:
    from holiclip.training.text_cache import TextCache

    def stream():
        yield from (text(i) for i in range(n))
        yield from (text(i) for i in range(0, n, 10))  # repeats: found, not computed again

    t0 = time.perf_counter()
    filled = TextCache(folder).ensure(stream(), Trunk(), Tokenizer(), batch_size=4096, progress=False)
    seconds = time.perf_counter() - t0
    assert filled["new"] == n and filled["rows"] == n, filled
    disk = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
    return {**memory(), "seconds": seconds, "texts_per_s": filled["texts"] / seconds, "disk_mb": disk}


def phase_read(folder: Path, n: int, batches: int) -> dict:
    from holiclip.training.text_cache import TextCache

    cache = TextCache(folder)
    rng = np.random.default_rng(0)
    trunk, tok = Trunk(), Tokenizer()
    find = gather = cpu = 0.0
    for b in range(batches):
        texts = [text(int(i)) for i in rng.integers(0, n, 256 * 5)]
        c0, t0 = time.process_time(), time.perf_counter()
        rows = cache.rows(texts)
        t1 = time.perf_counter()
        feats = cache.features(rows)
        find, gather = find + t1 - t0, gather + time.perf_counter() - t1
        cpu += time.process_time() - c0
        if b % 20 == 0:  # the gathered rows are the trunk's features of those texts
            with torch.no_grad():
                torch.testing.assert_close(feats[:64], trunk.text_trunk(tok(texts[:64])))
    return {**memory(), "segments": len(list(folder.glob("seg-*.keys.npy"))),
            "lookups_per_s": batches * 256 * 5 / (find + gather), "cpu_lookups_per_s": batches * 256 * 5 / cpu,
            "rows_ms": 1000 * find / batches,
            "features_ms": 1000 * gather / batches}


def run_phase(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--batches", type=int, default=200, help="read batches of 256 x 5 texts per size")
    ap.add_argument("--dir", default=None, help="where to build the caches (a temporary folder by default)")
    ap.add_argument("--phase", choices=["fill", "read"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.phase:  # one measured phase in this fresh process
        folder = Path(args.dir)
        result = phase_fill(folder, args.n) if args.phase == "fill" else phase_read(folder, args.n, args.batches)
        print(json.dumps(result))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_text_cache_"))
    rows = []
    try:
        for n in args.sizes:
            folder = root / f"cache_{n}"
            shutil.rmtree(folder, ignore_errors=True)
            fill = run_phase("--phase", "fill", "--n", str(n), "--dir", str(folder))
            read = run_phase("--phase", "read", "--n", str(n), "--dir", str(folder), "--batches", str(args.batches))
            rows.append((n, fill, read))
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0]
    print(f"text cache, W = {WIDTH} float32, stand-in trunk; read: {args.batches} batches of 256 x 5 random texts; "
          f"{os.cpu_count()} CPUs")
    print(f"{'texts':>10} | {'segments':>8} | {'disk MB':>8} | {'fill peak RSS MB':>16} | {'fill texts/s':>12} | "
          f"{'read peak RSS MB':>16} | {'read anon MB':>12} | {'lookups/s':>10} | {'CPU lookups/s':>13} | "
          f"{'rows() ms':>9} | {'features() ms':>13}")
    for n, fill, read in rows:
        print(f"{n:>10,} | {read['segments']:>8} | {fill['disk_mb']:>8.0f} | {fill['peak_rss_mb']:>16.0f} | "
              f"{fill['texts_per_s']:>12,.0f} | {read['peak_rss_mb']:>16.0f} | {read['anon_mb']:>12.0f} | "
              f"{read['lookups_per_s']:>10,.0f} | {read['cpu_lookups_per_s']:>13,.0f} | {read['rows_ms']:>9.2f} | "
              f"{read['features_ms']:>13.2f}")
    print("lookups/s: wall clock (includes disk reads and a busy machine's waits); CPU lookups/s: this process's CPU "
          "time; rows() / features() ms: wall per batch of 256 x 5 texts (hash + binary search / positioned reads)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for n, fill, read in rows[1:]:
        print(f"{n:,} vs {base[0]:,} texts: fill peak RSS x{fill['peak_rss_mb'] / base[1]['peak_rss_mb']:.2f}, "
              f"read peak RSS x{read['peak_rss_mb'] / base[2]['peak_rss_mb']:.2f}, "
              f"lookups/s x{read['lookups_per_s'] / base[2]['lookups_per_s']:.2f}")


if __name__ == "__main__":
    main()

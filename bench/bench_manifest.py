"""Memory of a loaded training manifest: Python lists per row (how load_manifest held rows before)
against the compact columns (numpy byte buffers + offsets), on the same synthetic JSONL.

    .venv/bin/python bench/bench_manifest.py                 # 100k and 1M rows (a few minutes on 2 cores)
    .venv/bin/python bench/bench_manifest.py --sizes 100000  # quicker
    .venv/bin/python bench/bench_manifest.py --huge          # adds 10M rows (~5 GB of JSONL in the temp folder)

Rows: an image path under 1000 folders, M = 5 caption slots of ~60 characters each. Each layout
is loaded in its own fresh process (the same reader, one streaming pass); reported per layout:
- RSS: the process's resident memory after loading minus before (after imports), in MB and bytes/row;
- worker copy: what one forked DataLoader worker that reads every row once (an epoch) makes
  private (Private_Dirty grown in the worker), i.e. what each extra worker costs;
- load: seconds to read the file.
"""
from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLOTS = ("web", "detail", "background", "main", "style")
WORDS = ("a", "red", "dog", "runs", "across", "the", "green", "field", "near", "old", "stone", "wall", "under",
         "bright", "summer", "sky", "while", "children", "watch", "from", "wooden", "bench")


def _text(i: int, s: int) -> str:
    """~60 characters, different for every row and slot."""
    words, k = [], i * 7 + s * 13
    while sum(len(w) + 1 for w in words) < 52:
        words.append(WORDS[k % len(WORDS)])
        k = k * 31 + 17
    return f"{' '.join(words)} #{i}"


def write_jsonl(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            row = {"image": f"images/{i % 1000:05d}/{i:09d}.jpg",
                   "captions": {s: _text(i, k) for k, s in enumerate(SLOTS)}}
            fh.write(json.dumps(row) + "\n")


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def _private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as fh:
        return sum(int(line.split()[1]) for line in fh if line.startswith("Private_Dirty:"))


def load_lists(path: Path, slots):
    """What load_manifest built before: one Python list per column, a list per row's texts,
    the row's other fields as a dict."""
    from holiclip.data.readers import read_samples
    from holiclip.data.records import apply_missing_slot_policy

    images, texts, where, meta = [], [], [], []
    for s in read_samples(path):
        t = apply_missing_slot_policy(s.captions, slots, "error", s.where)
        images.append(s.image)
        texts.append(t)
        where.append(s.where)
        meta.append(s.meta)
    return {"images": images, "texts": texts, "where": where, "meta": meta}


def _read_all(m, queue) -> None:
    before = _private_dirty_kb()
    images, texts, where = (m.images, m.texts, m.where) if hasattr(m, "texts") else (m["images"], m["texts"], m["where"])
    n = 0
    for i in range(len(images)):  # one epoch of a DataLoader worker: every row read once
        n += len(images[i]) + sum(map(len, texts[i])) + len(where[i])
    queue.put(_private_dirty_kb() - before)


def child(layout: str, path: Path) -> dict:
    from holiclip.data.manifest import load_manifest

    gc.collect()
    base = _rss_kb()
    t0 = time.perf_counter()
    m = load_manifest(path, SLOTS) if layout == "compact" else load_lists(path, SLOTS)
    seconds = time.perf_counter() - t0
    gc.collect()
    rss = _rss_kb() - base
    rows = len(m) if layout == "compact" else len(m["images"])
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    worker = ctx.Process(target=_read_all, args=(m, queue))
    worker.start()
    copied = queue.get()
    worker.join()
    return {"rows": rows, "rss_kb": rss, "worker_kb": copied, "seconds": seconds,
            "nbytes": m.nbytes if layout == "compact" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000", help="row counts, comma-separated")
    ap.add_argument("--huge", action="store_true", help="add 10M rows")
    ap.add_argument("--child", nargs=2, metavar=("LAYOUT", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()] + ([10_000_000] if args.huge else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = Path(tmp) / f"rows-{n}.jsonl"
            write_jsonl(path, n)
            got = {}
            for layout in ("lists", "compact"):
                out = subprocess.run([sys.executable, __file__, "--child", layout, str(path)], check=True,
                                     capture_output=True, text=True).stdout
                got[layout] = json.loads(out.strip().splitlines()[-1])
                print(f"{n:>10,} rows  {layout:<8} done", file=sys.stderr, flush=True)
            rows.append((n, path.stat().st_size, got))
            path.unlink()

    print(f"\nmanifest memory, M = {len(SLOTS)} slots of ~60 characters, one process per layout "
          f"({os.cpu_count()} CPUs)\n")
    print("| rows | JSONL MB | layout | RSS MB | RSS bytes/row | column bytes/row | worker copy MB | load s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for n, size, got in rows:
        for layout in ("lists", "compact"):
            g = got[layout]
            col = f"{g['nbytes'] / n:.0f}" if g["nbytes"] is not None else "-"
            print(f"| {n:,} | {size / 2**20:.0f} | {layout} | {g['rss_kb'] / 1024:.0f} | {g['rss_kb'] * 1024 / n:.0f} "
                  f"| {col} | {g['worker_kb'] / 1024:.1f} | {g['seconds']:.1f} |")
    print("\n| rows | RSS lists / compact | worker copy lists / compact |")
    print("|---:|---:|---:|")
    for n, _, got in rows:
        a, b = got["lists"], got["compact"]
        print(f"| {n:,} | {a['rss_kb'] / max(b['rss_kb'], 1):.1f}x | {a['worker_kb'] / max(b['worker_kb'], 1):.0f}x |")


if __name__ == "__main__":
    main()

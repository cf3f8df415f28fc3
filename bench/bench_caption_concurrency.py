"""Throughput of `holiclip caption run --backend openai` against a loopback server with a fixed
per-request latency, at concurrency 1 / 8 / 32: shows that the requests really overlap.

The server (tests/helpers/loopback.py) runs in its own process so that its
threads do not share the client's interpreter lock. Each row runs the full resumable
pipeline (image reads, base64, HTTP, JSONL writes) on a fresh output folder.

    .venv/bin/python bench/bench_caption_concurrency.py [--latency 0.05] [--seconds 2]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from holiclip.captioning.backends.openai import OpenAIBackend
from holiclip.captioning.perspectives import resolve_perspectives
from holiclip.captioning.pipeline import run_captioning
from holiclip.captioning.sources import ImageSource

LOOPBACK = Path(__file__).resolve().parents[1] / "tests" / "helpers" / "loopback.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.05, help="server seconds per request")
    ap.add_argument("--seconds", type=float, default=2.0, help="target length of each measurement")
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    server = subprocess.Popen([sys.executable, str(LOOPBACK), "--latency", str(args.latency),
                               "--lifetime", "600"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}/v1"
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            n_max = int(max(levels) / args.latency * args.seconds)
            for i in range(n_max):  # small distinct JPEGs, like thumbnails
                Image.new("RGB", (64, 64), (i % 256, i // 256 % 256, 90)).save(tmp / f"{i:05d}.jpg", quality=85)
            persp = resolve_perspectives("detail")
            rows = []
            for c in levels:
                n = max(8, int(c / args.latency * args.seconds))
                listing = tmp / f"list{c}.txt"
                listing.write_text("".join(f"{i:05d}.jpg\n" for i in range(n)))
                be = OpenAIBackend("bench", base_url=url, concurrency=c, timeout=30)
                st = run_captioning(ImageSource(listing), persp, be, tmp / f"out{c}", progress=False)
                assert st.rows_written == n and st.failures == 0, st
                ideal = c / args.latency
                rows.append((c, n, st.seconds, st.requests_per_s, ideal))
    finally:
        server.terminate()
        server.wait(10)

    print(f"loopback chat-completions server, fixed latency {args.latency * 1000:.0f} ms per request")
    print(f"{'concurrency':>11} {'requests':>9} {'seconds':>8} {'req/s':>8} {'ideal req/s':>12} {'efficiency':>11}")
    for c, n, s, rps, ideal in rows:
        print(f"{c:>11} {n:>9} {s:>8.2f} {rps:>8.1f} {ideal:>12.1f} {rps / ideal:>10.0%}")


if __name__ == "__main__":
    main()

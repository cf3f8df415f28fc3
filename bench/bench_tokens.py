"""Pre-tokenised shards against tokenising while training: the text side of one DataLoader worker.

    .venv/bin/python bench/bench_tokens.py            # 2000 samples, 5 slots, best of 3
    .venv/bin/python bench/bench_tokens.py --quick    # 500 samples, best of 2

The same manifest (5 captions per image: a ~60-character web caption and four ~250-character
ones, as VLM perspectives run; 16 px PNG images so that decoding costs next to nothing) is written
twice by ``shard_manifest``: plainly, and with ``tokenizer=`` (a ``tokens.npy`` member per sample).
One ShardStream epoch over each (batch 64, no DataLoader workers: the rate of one worker, open_clip's
SimpleTokenizer in the Collate) is timed, alternating, ``--repeats`` times, the best counting (the
machine may be shared). Printed: samples/s, the text side's ms per sample (the epoch's time less the
image side's, which is the same stream with a Collate that stacks images only), and the shards' size.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench_manifest import SLOTS, _text  # the same synthetic captions (bench/ is on sys.path when run)


def _manifest(root: Path, n: int) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (16, 16), (i % 256, 40, 90)).save(root / "img" / f"{i}.png")
        caps = {s: _text(i, j) if s == "web" else " ".join(_text(i + k, j) for k in range(4))
                for j, s in enumerate(SLOTS)}
        rows.append({"image": f"img/{i}.png", "captions": caps})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class _ImagesOnly:
    def __call__(self, items):
        import torch

        return {"images": torch.stack([it["image"] for it in items])}


def _epoch(shards: Path, collate) -> tuple[float, int]:
    import numpy as np
    import torch

    from holiclip.data.shards import ShardStream

    def transform(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32).copy())

    s = ShardStream(str(shards), list(SLOTS), 64, transform, collate, shuffle_buffer=256)
    t = time.perf_counter()
    n = sum(len(b["images"]) for b in s.loader(workers=0))
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.repeats = 500, 2
    from open_clip.tokenizer import SimpleTokenizer

    from holiclip.data.loader import Collate
    from holiclip.data.sharding import shard_manifest

    tokenizer = SimpleTokenizer(context_length=77)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = _manifest(root / "m", args.samples)
        shard_manifest(manifest, root / "plain", shard_size=500, progress=False)
        shard_manifest(manifest, root / "tokens", shard_size=500, progress=False, tokenizer=tokenizer)
        runs = {"images only (the image side)": (root / "plain", _ImagesOnly()),
                "tokenised while training": (root / "plain", Collate(tokenizer, 77)),
                "pre-tokenised shards": (root / "tokens", Collate(tokenizer, 77))}
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):
            for name, (shards, collate) in runs.items():
                took, n = _epoch(shards, collate)
                if name not in best or took < best[name][0]:
                    best[name] = (took, n)
        size = {p: sum(f.stat().st_size for f in (root / p).glob("shard-*.tar")) for p in ("plain", "tokens")}
    base = best["images only (the image side)"][0]
    print(f"{args.samples} samples x {len(SLOTS)} captions, batch 64, one worker (no DataLoader workers), "
          f"best of {args.repeats}\n")
    print("| collate | samples | samples/s | text ms / sample | vs tokenised |")
    print("|---|---|---|---|---|")
    ref = best["tokenised while training"][0]
    for name, (took, n) in best.items():
        text = "-" if name.startswith("images") else f"{1000 * (took - base) / n:.2f}"
        print(f"| {name} | {n} | {n / took:.0f} | {text} | {ref / took:.2f}x |")
    print(f"\nshards: {size['plain'] / 2**20:.1f} MiB plain, {size['tokens'] / 2**20:.1f} MiB pre-tokenised "
          f"({size['tokens'] / size['plain']:.2f}x; {(size['tokens'] - size['plain']) / args.samples:.0f} bytes "
          f"per sample)")


if __name__ == "__main__":
    main()

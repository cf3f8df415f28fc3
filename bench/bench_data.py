"""Loader throughput from webdataset shards, holiclip's ShardStream against open_clip_train's
webdataset pipeline on the same synthetic shards, and peak memory while streaming many samples.

    .venv/bin/python bench/bench_data.py            # 4k samples for the rate; RSS at 100k and 1M samples
    .venv/bin/python bench/bench_data.py --quick    # 1k samples; RSS at 20k and 200k
    .venv/bin/python bench/bench_data.py --samples 8000 --rss-sizes 100000,1000000 --workers 2
    .venv/bin/python bench/bench_data.py --workers 1,2 --baseline-src ../main --rss-sizes ""  # before / after

Throughput: both loaders decode the JPEG, apply the same training transform (open_clip's
``image_transform(224, is_train=True)``: RandomResizedCrop, to tensor, normalise) and tokenise with
the same tokenizer, in ``--workers`` DataLoader workers (a list: one row each) with batches of
``--batch``, over one epoch of the same shards (jpg + txt + json with 5 named captions,
``--image-px`` square images). open_clip's pipeline is ``open_clip_train.data.get_wds_dataset``
(built from an argparse namespace as its trainer does) with the webdataset it requires (0.2.86, put
on that process's path only: with webdataset 1.x it fails); it reads the txt caption and gives
normalised float batches. holiclip is measured with one slot (the txt caption: the same work) and
with five slots (five texts tokenised per image), giving what its trainer takes: uint8 batches,
normalised on the device (``split_normalize``), and with ``--baseline-src`` (another checkout of the
project, e.g. the main branch) that checkout's holiclip too, with what its trainer took then. Each
loader runs in a fresh process, alternating, ``--repeats`` times; the best rate counts (the machine
may be shared: the spread is printed). Samples/s per worker = images/s / workers.

Memory: ShardStream (2 workers, shuffle buffer 5000, sizes.json present) streams every sample of
``--rss-sizes`` small samples (16 px images, texts collated by a stub tokenizer) in a fresh
process each; reported: peak RSS
(``ru_maxrss``) of the main process and of the largest worker. Flat means the stream holds the
shuffle buffer, not the data set.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from holiclip.io import cache_root
from bench_manifest import SLOTS, _text  # the same synthetic captions (bench/ is on sys.path when run)

SLOTS = list(SLOTS)


def _jpegs(px: int, count: int = 32) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):  # smooth gradients plus noise: JPEGs of a realistic size
        base = np.linspace(0, 255, px)[None, :, None] * rng.random(3)[None, None, :]
        noise = rng.normal(0, 20, (px, px, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def captions(i: int, long: bool = False) -> dict[str, str]:
    """Sample ``i``'s captions: ~60 characters each, or (``long``) the web one and four of ~250
    characters, as VLM perspectives run (bench_tokens.py's)."""
    return {s: _text(i, j) if s == "web" or not long else " ".join(_text(i + k, j) for k in range(4))
            for j, s in enumerate(SLOTS)}


def write_shards(root: Path, samples: int, shard_size: int, px: int, long: bool = False) -> str:
    """``samples`` samples in shards of ``shard_size`` with sizes.json; returns the brace pattern."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    images, sizes = _jpegs(px), {}
    shards = (samples + shard_size - 1) // shard_size
    for k in range(shards):
        name = f"shard-{k:06d}.tar"
        n = min(shard_size, samples - k * shard_size)
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(k * shard_size, k * shard_size + n):
                caps = captions(i, long)
                sink.write({"__key__": f"{i:09d}", "jpg": images[i % len(images)], "txt": caps["web"].encode(),
                            "json": json.dumps({"captions": caps}).encode()})
        sizes[name] = n
    (root / "sizes.json").write_text(json.dumps(sizes))
    return str(root / f"shard-{{000000..{shards - 1:06d}}}.tar")


# -- one measurement, in its own process -----------------------------------------------------------------
def _workers_cpu() -> float:
    """CPU seconds of this process's finished children: the DataLoader workers, once the epoch is over
    (a cost per sample that a busy machine distorts far less than the wall-clock rate)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _batch_kind(images) -> str:
    """dtype and MiB per 256 images of a batch's image tensor (what goes through shared memory,
    pinning and the copy to the GPU)."""
    per_image = images.element_size() * images[0].numel()
    return f"{str(images.dtype).removeprefix('torch.')}, {per_image * 256 / 2**20:.0f}"


def run_holiclip(pattern: str, slots: int, batch: int, workers: int, image_size: int, shuffle: int) -> dict:
    import open_clip

    from holiclip.data import loader
    from holiclip.data.shards import ShardStream

    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    transform = open_clip.image_transform(image_size, is_train=True)
    if hasattr(loader, "split_normalize"):  # as the trainer: uint8 out, normalised on the device
        transform = loader.split_normalize(transform)[0]
    stream = ShardStream(pattern, SLOTS[:slots], batch, transform, shuffle_buffer=shuffle, workers=workers)
    t0, images, batches, kind = time.perf_counter(), 0, 0, ""
    for b in stream.loader(loader.Collate(tokenizer, 77), workers):
        images += len(b["index"])
        batches += 1
        kind = kind or _batch_kind(b["images"])
    return {"images": images, "seconds": time.perf_counter() - t0, "batches": batches, "kind": kind,
            "worker_cpu_s": _workers_cpu()}


def run_open_clip(pattern: str, samples: int, batch: int, workers: int, image_size: int) -> dict:
    import open_clip

    try:
        from open_clip_train.data import get_wds_dataset
    except ModuleNotFoundError as err:  # open_clip_train.data imports pandas (for its CSV dataset)
        raise SystemExit(f"open_clip_train's data module needs {err.name}: pip install {err.name}") from None

    args = argparse.Namespace(train_data=pattern, val_data=None, dataset_resampled=False, train_num_samples=samples,
                              train_data_upsampling_factors=None, seed=0, batch_size=batch, world_size=1,
                              workers=workers)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    transform = open_clip.image_transform(image_size, is_train=True)
    data = get_wds_dataset(args, transform, is_train=True, epoch=0, floor=True, tokenizer=tokenizer)
    t0, images, batches, kind = time.perf_counter(), 0, 0, ""
    for imgs, _texts in data.dataloader:
        images += imgs.shape[0]
        batches += 1
        kind = kind or _batch_kind(imgs)
    seconds = time.perf_counter() - t0
    del data, imgs, _texts  # its workers are persistent: released with the loader, they end (and count)
    gc.collect()
    return {"images": images, "seconds": seconds, "batches": batches, "kind": kind, "worker_cpu_s": _workers_cpu()}


def run_rss(pattern: str, batch: int, workers: int) -> dict:
    import torch

    from holiclip.data.loader import Collate
    from holiclip.data.shards import ShardStream
    def transform(image):  # the images are 16 px: decode + a tensor, as small as a sample gets
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(image).float().div_(255.0)

    def tokenizer(texts):  # the stream's memory is the question here, not tokenising speed
        return torch.zeros(len(texts), 77, dtype=torch.long)

    torch.set_num_threads(1)
    stream = ShardStream(pattern, SLOTS, batch, transform, shuffle_buffer=5000, workers=workers)
    t0, images = time.perf_counter(), 0
    for b in stream.loader(Collate(tokenizer, 77), workers):
        images += len(b["index"])
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": seconds,
            "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


# open_clip_torch[training] 3.x requires webdataset <= 0.2.86: with webdataset 1.x its tar reader stops
# at the end-of-shard marker that tar_file_expander now yields (KeyError 'fname')
BASELINE_WEBDATASET = "webdataset==0.2.86"


# open_clip_train.data imports pandas (for its CSV dataset), which holiclip does not need
BASELINE_PANDAS = ("pandas", "pytz", "tzdata")


def baseline_site(folder: Path) -> str | None:
    """A folder holding what open_clip_train's pipeline needs beyond holiclip's environment: the
    webdataset it runs with when the one installed is 1.x, and pandas when it is missing
    (installed there once with pip; only the baseline's process puts the folder on its path)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> bool:
        try:
            return bool(version(name))
        except PackageNotFoundError:
            return False

    wanted = [] if int(version("webdataset").split(".")[0]) < 1 else [BASELINE_WEBDATASET]
    wanted += [] if installed("pandas") else list(BASELINE_PANDAS)
    if not wanted:
        return None
    missing = [w for w in wanted if not (folder / w.split("==")[0]).is_dir()]
    if missing:
        print(f"# open_clip_train's webdataset pipeline needs {', '.join(missing)} (webdataset installed: "
              f"{version('webdataset')}); installing into {folder} for the baseline's process only", flush=True)
        # --no-deps: numpy and the rest come from this environment, never a second copy
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), *missing],
                       check=True)
    return str(folder)


def child(kind: str, site: str | None = None, **kw) -> dict:
    """One measurement in a fresh process; ``site``: a folder put first on its path."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"kind": kind, **kw})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if site:
        env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(args, pattern: str, site: str | None) -> None:
    """The rate table: every loader at every worker count, alternating, best of ``--repeats``."""
    workers = [int(w) for w in str(args.workers).split(",") if w]
    base_src = str(Path(args.baseline_src).resolve() / "src") if args.baseline_src else None
    if base_src and not (Path(base_src) / "holiclip").is_dir():
        raise SystemExit(f"--baseline-src {args.baseline_src}: no src/holiclip there")
    ours = "holiclip ShardStream"
    theirs = f"holiclip @ {args.baseline_src} ShardStream"
    loaders = {"open_clip_train get_wds_dataset (txt)": ("open_clip", site, {"samples": args.samples}),
               **({f"{theirs}, 1 slot (txt)": ("holiclip", base_src, {"slots": 1, "shuffle": 5000}),
                   f"{theirs}, 5 slots": ("holiclip", base_src, {"slots": 5, "shuffle": 5000})} if base_src else {}),
               f"{ours}, 1 slot (txt)": ("holiclip", None, {"slots": 1, "shuffle": 5000}),
               f"{ours}, 5 slots": ("holiclip", None, {"slots": 5, "shuffle": 5000})}
    runs = {(name, w): [] for w in workers for name in loaders}
    for _ in range(args.repeats):
        for w in workers:
            for name, (kind, path, kw) in loaders.items():
                runs[name, w].append(child(kind, path, pattern=pattern, batch=args.batch, workers=w,
                                           image_size=args.image_size, **kw))
    rate = {k: sorted(r["images"] / r["seconds"] for r in v) for k, v in runs.items()}
    cpu = {k: min(r["worker_cpu_s"] / r["images"] * 1e3 for r in v) for k, v in runs.items()}
    base = "open_clip_train get_wds_dataset (txt)"
    print(f"\n| loader | workers | images / epoch | batch dtype, MiB / 256 images | images/s (best of {args.repeats}; "
          f"range) | per worker | vs open_clip | worker CPU ms / sample | vs open_clip |"
          + (" per worker vs baseline src | CPU / sample vs baseline src |" if base_src else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|---|" if base_src else ""))
    for (name, w), v in runs.items():
        best = rate[name, w][-1]
        row = (f"| {name} | {w} | {v[0]['images']} | {v[0]['kind']} | {best:.0f} ({rate[name, w][0]:.0f}-{best:.0f}) | "
               f"{best / w:.0f} | {best / rate[base, w][-1]:.2f}x | {cpu[name, w]:.2f} | "
               f"{cpu[base, w] / cpu[name, w]:.2f}x |")
        if base_src:
            then = (name.replace(ours, theirs), w) if name.startswith(ours) else None
            row += f" {best / rate[then][-1]:.2f}x | {cpu[then] / cpu[name, w]:.2f}x |" if then else " | |"
        print(row, flush=True)
    print("(vs columns: rates as a ratio, > 1 is faster; CPU per sample as the inverse ratio, > 1 is cheaper)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000, help="samples in the throughput shards")
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--image-px", type=int, default=256, help="side of the throughput JPEGs")
    ap.add_argument("--image-size", type=int, default=224, help="model resolution of the transform")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="2", help="DataLoader workers, or a list (1,2): one row each")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rss-sizes", default="100000,1000000", help="samples streamed for the memory rows")
    ap.add_argument("--rss-shard-size", type=int, default=5000)
    ap.add_argument("--quick", action="store_true", help="1k samples, one repeat, RSS at 20k and 200k")
    ap.add_argument("--work-dir", default=None, help="where the shards go (default: a temporary folder)")
    ap.add_argument("--baseline-site", default=str(cache_root() / "bench-webdataset-0.2.86"),
                    help=f"folder with {BASELINE_WEBDATASET} for open_clip_train's pipeline (filled if empty)")
    ap.add_argument("--long-captions", action="store_true",
                    help="four of the five captions ~250 characters (VLM perspectives), not ~60")
    ap.add_argument("--baseline-src", default=None,
                    help="another checkout of this project (e.g. the main branch): its holiclip measured too")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import holiclip  # noqa: F401  (installs the torchvision shim before open_clip is imported)

        spec = json.loads(args.child)
        kind = spec.pop("kind")
        result = {"holiclip": run_holiclip, "open_clip": run_open_clip, "rss": run_rss}[kind](**spec)
        print(json.dumps(result))
        return
    if args.quick:
        args.samples, args.repeats, args.rss_sizes = 1000, 1, "20000,200000"
    rss_sizes = [int(x) for x in args.rss_sizes.split(",") if x]
    site = baseline_site(Path(args.baseline_site).resolve())
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pattern = write_shards(root / "rate", args.samples, args.shard_size, args.image_px, args.long_captions)
        print(f"# {args.samples} samples ({args.image_px} px JPEG + txt + json of {len(SLOTS)} "
              f"{'captions, 4 of ~250 characters' if args.long_captions else 'captions of ~60 characters'}) in "
              f"{args.samples // args.shard_size} shards, written in {time.perf_counter() - t0:.1f} s; batch "
              f"{args.batch}, {args.workers} workers, transform at {args.image_size} px", flush=True)
        throughput(args, pattern, site)
        rows = []
        for n in rss_sizes:
            t0 = time.perf_counter()
            pat = write_shards(root / f"rss{n}", n, args.rss_shard_size, 16)
            written = time.perf_counter() - t0
            r = child("rss", pattern=pat, batch=256, workers=2)
            rows.append((n, written, r))
            print(f"# streamed {n} samples: {r['seconds']:.0f} s (shards written in {written:.0f} s)", flush=True)
        if rows:
            print("\n| samples streamed | shards | images out | peak RSS main (MB) | peak RSS largest worker (MB) | s |")
            print("|---|---|---|---|---|---|")
            for n, _, r in rows:
                print(f"| {n:,} | {(n + args.rss_shard_size - 1) // args.rss_shard_size} | {r['images']:,} | "
                      f"{r['self_mb']:.0f} | {r['worker_mb']:.0f} | {r['seconds']:.0f} |")
            if len(rows) > 1:
                (n0, _, a), (n1, _, b) = rows[0], rows[-1]
                print(f"\n{n1:,} vs {n0:,} samples: main {b['self_mb'] / a['self_mb']:.3f}x, "
                      f"worker {b['worker_mb'] / a['worker_mb']:.3f}x (target: within 1.10x)")


if __name__ == "__main__":
    main()

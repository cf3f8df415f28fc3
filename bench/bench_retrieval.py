"""Retrieval evaluation at scale: 100k images x 5 captions, D = 512, random unit features.

    .venv/bin/python bench/bench_retrieval.py               # about 2 min on 2 busy cores
    .venv/bin/python bench/bench_retrieval.py --chunks 20 --rounds 5
    .venv/bin/python bench/bench_retrieval.py --full        # also one complete run (10-30 min on 2 cores)

Compares ``holiclip.evaluation.recall_at_k`` (R@1/5/10 both ways, chunked rank counting)
against the matrix products alone (the same blocks, ``matmul(out=)`` into a reused buffer,
nothing else). Both make one pass over all 100k x 500k scores (2.6e13 multiply-adds): exact
recall needs every score, so the matrix products are the floor.

* Peak memory: a fresh subprocess per measurement (features only, matmul, recall), read from
  ``ru_maxrss``; all features are allocated at full size, the peak is reached in the first
  block, so two blocks suffice (recall's worker also holds the full run's setup arrays).
* Time: one subprocess holding the full-size features times ``--chunks`` blocks (of texts
  against all images, recall_at_k's own blocking) of the matmul and of recall_at_k,
  alternating over ``--rounds`` rounds so that load from other users hits both alike; medians.
  The per-block time is scaled to all blocks; recall's one-off setup (scoring all correct
  pairs) is timed apart at full size and added once.
Before timing, a 2,000-image check compares the chunked result with a dense ``torch.topk``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x.div_(x.norm(dim=1, keepdim=True))  # in place: no second copy at 1 GB


def setup(args):
    import holiclip  # noqa: F401  (torchvision shim)
    from holiclip.evaluation.retrieval import DEFAULT_BLOCK_ELEMENTS

    torch.set_num_threads(args.threads)
    images = unit_rows(args.images, args.dim, 0)
    texts = unit_rows(args.images * args.captions, args.dim, 1)
    # recall_at_k's own default blocks: texts (the larger side) x all images
    step = max(1, DEFAULT_BLOCK_ELEMENTS // images.shape[0])
    return images, texts, step


def matmul_pass(images, texts, n_sub: int, step: int) -> float:
    """The first n_sub texts against all images, in the same blocks as recall_at_k."""
    t0 = time.perf_counter()
    block = torch.empty(step, images.shape[0])
    for s in range(0, n_sub, step):
        e = min(s + step, n_sub)
        torch.matmul(texts[s:e], images.T, out=block[: e - s])
    return time.perf_counter() - t0


def recall_pass(images, texts, n_sub: int, caps: int) -> dict:
    """recall_at_k for the first n_sub texts against all images (the same blocks as in a
    full run; images without a text among them are left out of image-to-text)."""
    from holiclip.evaluation import recall_at_k

    timings = {}
    recall_at_k(images, texts[:n_sub], torch.arange(n_sub) // caps, timings=timings)
    return timings


def worker(args) -> dict:
    images, texts, step = setup(args)
    total = -(-texts.shape[0] // step)
    out = {"chunk_rows": step, "chunks_total": total}
    if args.worker == "matmul":
        matmul_pass(images, texts, 2 * step, step)
    elif args.worker == "recall":
        # the full run's setup arrays (all 500k correct pairs, sorted both ways, and their
        # scores) held alongside a two-block pass: the same peak as the complete run
        from holiclip.evaluation.retrieval import correct_scores, positive_pairs

        pairs = positive_pairs(torch.arange(texts.shape[0]) // args.captions)
        held = (pairs, pairs[torch.argsort(pairs[:, 1])], correct_scores(images, texts, pairs))
        recall_pass(images, texts, 2 * step, args.captions)
        del held
    elif args.worker == "timing":
        n_sub = args.chunks * step
        mm, rc, su = [], [], []
        from holiclip.evaluation.retrieval import correct_scores, positive_pairs

        for r in range(args.rounds):
            # recall's one-off setup at full size: all correct pairs, sorted, and their scores
            t0 = time.perf_counter()
            pairs = positive_pairs(torch.arange(texts.shape[0]) // args.captions)
            correct_scores(images, texts, pairs)
            pairs[torch.argsort(pairs[:, 1], stable=True)]
            su.append(time.perf_counter() - t0)
            for mode in (("matmul", "recall") if r % 2 == 0 else ("recall", "matmul")):
                if mode == "matmul":
                    mm.append(matmul_pass(images, texts, n_sub, step) / args.chunks)
                else:
                    t = recall_pass(images, texts, n_sub, args.captions)
                    rc.append(t["chunks_s"] / args.chunks)

        out |= {"matmul_chunk_s": statistics.median(mm), "recall_chunk_s": statistics.median(rc),
                "recall_setup_s": statistics.median(su)}
    elif args.worker == "full":
        out["matmul_s"] = matmul_pass(images, texts, texts.shape[0], step)
        t = recall_pass(images, texts, texts.shape[0], args.captions)
        out["recall_s"] = t["setup_s"] + t["chunks_s"]
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_worker(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--images", str(args.images), "--captions", str(args.captions),
           "--dim", str(args.dim), "--threads", str(args.threads), "--chunks", str(args.chunks), "--rounds", str(args.rounds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_against_dense() -> bool:
    import holiclip  # noqa: F401
    from holiclip.evaluation import recall_at_k

    n, caps, d = 2000, 5, 64
    images = unit_rows(n, d, 2)
    t2i = torch.arange(n * caps) // caps
    texts = images[t2i] + 0.9 * unit_rows(n * caps, d, 3)
    texts = texts / texts.norm(dim=1, keepdim=True)
    sim = images @ texts.T
    dense = {}
    for k in (1, 5, 10):
        dense[f"i2t_R@{k}"] = (t2i[sim.topk(k, 1).indices] == torch.arange(n)[:, None]).any(1).double().mean().item()
        dense[f"t2i_R@{k}"] = (sim.T.topk(k, 1).indices == t2i[:, None]).any(1).double().mean().item()
    chunked = recall_at_k(images, texts, t2i, chunk_size=37)
    return all(abs(chunked[k] - dense[k]) < 1e-12 for k in dense)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--captions", type=int, default=5)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="blocks per timed pass")
    ap.add_argument("--rounds", type=int, default=3, help="alternating matmul / recall rounds (medians)")
    ap.add_argument("--full", action="store_true", help="also time one complete matmul pass and recall_at_k")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--worker", choices=["features", "matmul", "recall", "timing", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(f"chunked == dense (2,000 images x 5 captions, D=64): {check_against_dense()}")
    mem = {mode: run_worker(args, mode) for mode in ("features", "matmul", "recall")}
    timing = run_worker(args, "timing")
    full = run_worker(args, "full") if args.full else None

    n_img, n_txt = args.images, args.images * args.captions
    step, total = timing["chunk_rows"], timing["chunks_total"]
    base = mem["features"]["maxrss_mb"]
    print(f"\n{n_img:,} images x {args.captions} captions = {n_txt:,} texts, D = {args.dim}, float32, {args.threads} threads")
    print(f"blocks of {step} texts x {n_img:,} images, {total} blocks; timed {args.chunks} blocks x {args.rounds} rounds "
          f"(medians), scaled to {total}")
    print(f"features: {(n_img + n_txt) * args.dim * 4 / 2**20:,.0f} MB; a dense score matrix would be "
          f"{n_img * n_txt * 4 / 2**30:,.0f} GB\n")
    matmul_full = timing["matmul_chunk_s"] * total
    recall_full = timing["recall_setup_s"] + timing["recall_chunk_s"] * total
    header = f"{'measurement':<28}{'s / block':>11}{'full run s':>12}{'peak RSS MB':>13}{'over features MB':>18}"
    print(header)
    print("-" * len(header))
    print(f"{'features only':<28}{'':>11}{'':>12}{base:13.0f}{0:18.0f}")
    for label, per, whole, rss in (
        ("matmul only (same blocks)", timing["matmul_chunk_s"], matmul_full, mem["matmul"]["maxrss_mb"]),
        ("recall_at_k (R@1/5/10 x2)", timing["recall_chunk_s"], recall_full, mem["recall"]["maxrss_mb"]),
    ):
        print(f"{label:<28}{per:11.3f}{whole:12.1f}{rss:13.0f}{rss - base:18.0f}")
    print(f"(recall's one-off setup, scoring the {n_txt:,} correct pairs: {timing['recall_setup_s']:.2f} s, in its full-run time)")
    over_mm = mem["matmul"]["maxrss_mb"] - base
    print(f"\nrecall / matmul: time x{recall_full / matmul_full:.2f}, "
          f"memory over features x{(mem['recall']['maxrss_mb'] - base) / max(1.0, over_mm):.2f}")
    if full:
        print(f"complete run: matmul {full['matmul_s']:.1f} s, recall_at_k {full['recall_s']:.1f} s "
              f"(x{full['recall_s'] / full['matmul_s']:.2f}), peak RSS {full['maxrss_mb']:.0f} MB")


if __name__ == "__main__":
    main()

"""`holiclip search` latency on 100k embeddings: exact (IndexFlatIP) vs IVF.

    .venv/bin/python bench/bench_search.py                 # about a minute on 2 busy cores
    .venv/bin/python bench/bench_search.py --n 1000000 --threads 2

Writes an INDEX folder the way ``holiclip embed`` does (chunks -> arrays -> faiss indexes, the
same code) from random unit vectors standing in for image embeddings (latency depends on N, D
and the index, not on the values; IVF recall does, so it is measured on queries that are noisy
copies of stored vectors, the way an image-by-example query is: the share of queries whose
source vector is in the top k; random vectors have no neighbourhoods beyond that, so recall of
the exact top k would say nothing about real embeddings).
Times one query at a time (the command's case) and a batch of 100, medians over rounds, with
faiss limited to ``--threads`` threads. Model loading and query encoding are not included:
they are the same for both indexes (the command line's total is printed apart).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (default 4 sqrt(N))")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()

    import faiss

    from holiclip.integrations import search as SR

    faiss.omp_set_num_threads(args.threads)
    nlist = args.nlist or int(4 * np.sqrt(args.n))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        chunk = 50_000
        for kind, ivf in (("flat", None), ("ivf", nlist)):
            out = Path(tmp) / kind
            (out / "chunks").mkdir(parents=True)
            files = []
            for i, s in enumerate(range(0, args.n, chunk)):
                m = min(chunk, args.n - s)
                feats = unit(np.random.default_rng(s).standard_normal((m, args.dim)))[:, None]  # H = 1
                path = SR._chunk_path(out, i)
                ids = [f"img{j}" for j in range(s, s + m)]
                SR._save_chunk(path, ids, ids, feats, [])
                files.append(path)
            job = {"checkpoint": "-", "model": "random", "branches": ["b"], "source": "-", "chunk_size": chunk}
            t0 = time.perf_counter()
            SR._finish(out, files, job, [], ivf)
            print(f"{kind}: arrays + index built in {time.perf_counter() - t0:.1f} s")
            roots[kind] = SR.SearchIndex.open(out)

        stored = roots["flat"].embeddings("b")
        picks = rng.choice(args.n, 100)
        queries = unit(stored[picks] + 0.5 * unit(rng.standard_normal((100, args.dim))))
        print(f"N = {args.n:,}, D = {args.dim}, k = {args.k}, faiss threads = {args.threads}, IVF nlist = {nlist}")
        for kind, nprobe in (("flat", None), ("ivf", None), ("ivf", nlist // 4)):
            index = roots[kind]
            index.search(queries[:1], "b", k=args.k, nprobe=nprobe)  # loads the index
            one, batch = [], []
            for r in range(args.rounds):
                t0 = time.perf_counter()
                index.search(queries[r % 100 : r % 100 + 1], "b", k=args.k, nprobe=nprobe)
                one.append(time.perf_counter() - t0)
            for _ in range(max(3, args.rounds // 5)):
                t0 = time.perf_counter()
                hits = index.search(queries, "b", k=args.k, nprobe=nprobe)
                batch.append(time.perf_counter() - t0)
            found = np.mean([p in {h.row for h in hs} for hs, p in zip(hits, picks)])
            probe = "" if kind == "flat" else f" nprobe={index.faiss_index('b', nprobe).nprobe}"
            print(f"{kind + probe:18} one query {1e3 * statistics.median(one):7.2f} ms   "
                  f"100 queries {1e3 * statistics.median(batch):8.1f} ms   source in top {args.k}: {found:.2f}")


if __name__ == "__main__":
    main()

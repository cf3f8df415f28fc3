"""Per-perspective search on the emoji benchmark: one branch vs the fused embedding.

    .venv/bin/python scripts/search_example.py            # about a minute on 2 CPU cores

Embeds the test split of the emoji benchmark (``holiclip data emoji`` -> ~/.cache/holiclip/emoji-default)
with a trained model (``holiclip demo`` -> runs/demo/holistic_cls/seed0/model) through
:func:`holiclip.integrations.search.embed_collection`, then runs a background query on the
``background`` branch and an object query on the ``main`` branch, each also on the fused
(mean) embedding, and draws the top results as a grid (docs/search_example.png). Each result is
labelled with its ground truth from the benchmark's rows (background colour family and pattern,
main object) and framed green when it matches the query (background: colour family and pattern;
object: the main object).

One pair of queries can be lucky (the default pair was picked among those where the branch does
better), so it also prints precision@k averaged over every background (colour family, pattern)
pair and every main-object class of the split, one templated query each, branch vs fused, and
writes all numbers beside the PNG (search_example.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from holiclip.evaluation import load_eval_model
from holiclip.integrations.search import SearchIndex, embed_collection, encode_text_query
from holiclip.io import cache_root, jsonl_rows

ROOT = Path(__file__).resolve().parents[1]


def main_object(row: dict) -> str:
    return next(o["name"] for o in row["objects"] if o["class"] == row["main"])


# one background description per pattern, in the benchmark's caption wording
PATTERNS = {
    "solid": "A plain {} background.", "gradient": "A smooth {} gradient background.",
    "stripes": "Diagonal {} stripes.",
    "noise": "A mottled {} background with a noisy texture.", "dots": "A {} background with polka dots.",
    "checker": "A {} checkerboard pattern.",
}


def relevant(row: dict, kind: str, value) -> bool:
    """background: value = (colour family, pattern); object: value = main object name."""
    if kind == "background":
        return (row["background_name"], row["background_pattern"]) == tuple(value)
    return main_object(row) == value


def precision(index: SearchIndex, rows: dict, queries: torch.Tensor, match, values: list, target: str, k: int):
    hits = index.search(queries, target, k=k)
    return float(np.mean([np.mean([match(rows[h.id], v) for h in hs]) for hs, v in zip(hits, values)]))


def draw(path: Path, panels: list[dict], rows: dict, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from PIL import Image

    rows_n = len(panels)
    fig, axes = plt.subplots(rows_n, k, figsize=(1.5 * k + 1.2, 2.05 * rows_n), squeeze=False,
                             gridspec_kw={"left": 0.13, "right": 0.99, "top": 0.93, "bottom": 0.01,
                                          "wspace": 0.12, "hspace": 0.55})
    for r, p in enumerate(panels):
        for c, hit in enumerate(p["hits"]):
            ax = axes[r, c]
            row = rows[hit.id]
            ax.imshow(Image.open(hit.id).convert("RGB"))
            ok = relevant(row, p["kind"], p["value"])
            for side in ax.spines.values():
                side.set_edgecolor("#1a9850" if ok else "#d73027")
                side.set_linewidth(4)
            label = (f"{row['background_name']} {row['background_pattern']}" if p["kind"] == "background"
                     else f"main: {main_object(row)}")
            ax.set_title(f"{label}\n{hit.score:.3f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(f"{p['target']}\nP@{k} = {p['precision']:.2f}", fontsize=9)
        if r == 0 or panels[r - 1]["query"] != p["query"]:  # the query once above its rows
            box = axes[r, 0].get_position()
            fig.text(0.01, box.y1 + 0.42 / fig.get_figheight(), f"\u201c{p['query']}\u201d", fontsize=10,
                     fontweight="bold", ha="left", va="bottom")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=ROOT / "runs/demo/holistic_cls/seed0/model", type=Path)
    ap.add_argument("--data", default=cache_root() / "emoji-default", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--index", default=ROOT / "runs/search_example/index", type=Path)
    ap.add_argument("--out", default=ROOT / "docs/search_example.png", type=Path)
    ap.add_argument("--background-query", default="A smooth yellow gradient background.")
    ap.add_argument("--background", default="yellow,gradient", help="its ground truth: colour family,pattern")
    ap.add_argument("--object-query", default="The main object is a car.")
    ap.add_argument("--object", default="car", help="its ground truth: the main object's name")
    ap.add_argument("-k", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    jsonl = args.data / f"{args.split}.jsonl"
    rows = {str((jsonl.parent / row["image"]).resolve()): row for _, row in jsonl_rows(jsonl)}
    em = load_eval_model(args.model)
    embed_collection(em.model, em.transform, jsonl, args.index, checkpoint=args.model, fusion=["mean"])
    index = SearchIndex.open(args.index)

    backgrounds = sorted({(r["background_name"], r["background_pattern"]) for r in rows.values()})
    objects = sorted({main_object(r) for r in rows.values()})
    background = tuple(args.background.split(","))
    if background not in backgrounds or args.object not in objects:
        sys.exit(f"error: --background must be one of {[','.join(b) for b in backgrounds]} "
                 f"and --object one of {objects}")

    panels = []
    for kind, query, value, branch in (("background", args.background_query, background, "background"),
                                       ("object", args.object_query, args.object, "main")):
        q = encode_text_query(em.model, em.tokenizer, [query])
        for target in (branch, "fused-mean"):
            hits = index.search(q, target, k=args.k)[0]
            p = float(np.mean([relevant(rows[h.id], kind, value) for h in hits]))
            panels.append({"kind": kind, "query": query, "value": value, "target": target, "hits": hits,
                           "precision": p})

    # every background and every main object of the split as a query: not just the two above
    sweep = {}
    for kind, values, texts, branch in (
        ("background", backgrounds, [PATTERNS[p].format(f) for f, p in backgrounds], "background"),
        ("object", objects, [f"The main object is a {o}." for o in objects], "main"),
    ):
        q = encode_text_query(em.model, em.tokenizer, texts)
        match = lambda row, v, kind=kind: relevant(row, kind, v)  # noqa: E731
        sweep[kind] = {"queries": len(values), "example": texts[0],
                       **{t: precision(index, rows, q, match, values, t, args.k) for t in (branch, "fused-mean")}}
        if kind == "background":  # the colour family alone, pattern aside
            family = lambda row, v: row["background_name"] == v[0]  # noqa: E731
            sweep["background colour only"] = {
                "queries": len(values), "example": texts[0],
                **{t: precision(index, rows, q, family, values, t, args.k) for t in (branch, "fused-mean")}}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(args.out, panels, rows, args.k)
    summary = {
        "model": str(args.model), "data": str(jsonl), "images": index.manifest["count"], "k": args.k,
        "queries": [{k: p[k] for k in ("kind", "query", "value", "target", "precision")}
                    | {"results": [{"id": Path(h.id).name, "score": round(h.score, 4)} for h in p["hits"]]}
                    for p in panels],
        f"mean_precision_at_{args.k}": sweep,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    for p in panels:
        print(f"{p['query']!r:40} {p['target']:12} P@{args.k} = {p['precision']:.2f}")
    for kind, s in sweep.items():
        cells = ", ".join(f"{t} {v:.3f}" for t, v in s.items() if t not in ("queries", "example"))
        print(f"mean P@{args.k} over {s['queries']} {kind} queries (e.g. {s['example']!r}): {cells}")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`holiclip embed` (a collection -> per-branch and fused embeddings + faiss indexes) and
`holiclip search` (a text or an example image against one branch or a fused embedding)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import comma_list

Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 ...")]


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(2) from None


def embed(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="holiclip model folder.")],
    images: Annotated[str, typer.Option("--images", help=(
        "Image folder, text list of paths, JSONL with an 'image' field, or webdataset shards "
        "(a folder of .tar or a brace pattern)."))],
    out: Annotated[Path, typer.Option("--out", "-o", help="INDEX folder to write (a re-run resumes it).")],
    fusion: Annotated[str, typer.Option("--fusion", help=(
        "Comma-separated fusion modes to store: mean, mean-logits, max, norm-max."))] = "mean",
    ivf: Annotated[Optional[int], typer.Option("--ivf", help=(
        "IVF index with this many lists (for millions of images) instead of the exact flat one."))] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help=(
        "Images per saved chunk (the unit of resuming)."))] = 2048,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image decoding processes.")] = 0,
    device: Device = "cpu",
) -> None:
    """Embed a collection of images: per-branch and fused embeddings plus a faiss index of each."""
    from holiclip.integrations.search import SearchError, embed_collection, require_faiss

    try:
        require_faiss()
        from holiclip.evaluation import load_eval_model

        em = load_eval_model(checkpoint, device=device)
        manifest = embed_collection(em.model, em.transform, images, out, checkpoint=checkpoint,
                                    fusion=comma_list(fusion) or [], ivf=ivf, chunk_size=chunk_size,
                                    batch_size=batch_size, device=em.device, num_workers=workers)
    except (SearchError, FileNotFoundError, ValueError) as err:
        _fail(err)
    skipped = f", {manifest['skipped']} unreadable (see {out / 'skipped.json'})" if manifest["skipped"] else ""
    typer.echo(f"embedded {manifest['count']} images{skipped}: {len(manifest['faiss'])} "
               f"{manifest['index']['kind']} indexes ({', '.join(manifest['faiss'])}) in {out}")


def search(
    index: Annotated[Path, typer.Argument(help="INDEX folder written by `holiclip embed`.")],
    query: Annotated[Optional[str], typer.Argument(help="Text query.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", help=(
        "Search by this example image instead of a text."))] = None,
    branch: Annotated[Optional[str], typer.Option("--branch", "-b", help=(
        "Search this branch's embeddings (e.g. background)."))] = None,
    fusion: Annotated[Optional[str], typer.Option("--fusion", help=(
        "Search a fused embedding stored at embed time (default: the first)."))] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of results.")] = 10,
    nprobe: Annotated[Optional[int], typer.Option("--nprobe", min=1, help=(
        "IVF lists to visit (default a tenth)."))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help=(
        "Model to encode the query (default: the one in the index's manifest)."))] = None,
    device: Device = "cpu",
) -> None:
    """Search an embedded collection by a text or an example image, on one branch or fused."""
    from holiclip.integrations.search import (SearchError, SearchIndex, encode_image_query, encode_text_query,
                                              require_faiss)

    try:
        if (query is None) == (image is None):
            raise SearchError("give a text QUERY or --image PATH (one of them)")
        require_faiss()
        idx = SearchIndex.open(index)
        target = idx.target(branch, fusion)
        from holiclip.evaluation import load_eval_model

        model_src = checkpoint or idx.manifest["checkpoint"]
        em = load_eval_model(model_src, device=device)
        if list(em.branch_names) != idx.branches:
            raise SearchError(f"model {model_src} has branches {list(em.branch_names)}, the index {idx.branches}")
        if image is not None:
            q = encode_image_query(em.model, em.transform, image, target, device=em.device)
        else:
            q = encode_text_query(em.model, em.tokenizer, [query], device=em.device)
        if q.shape[-1] != idx.manifest["dim"]:
            raise SearchError(f"model {model_src} gives embeddings of width {q.shape[-1]}, the index {index} has "
                              f"width {idx.manifest['dim']} (embedded with {idx.manifest['checkpoint']}): search "
                              "with the index's own model (leave out --checkpoint) or embed again with this one")
        hits = idx.search(q, target, k=k, nprobe=nprobe)[0]
    except (SearchError, FileNotFoundError, ValueError) as err:
        _fail(err)
    what = f"image {image}" if image is not None else repr(query)
    if as_json:
        typer.echo(json.dumps({"query": str(image) if image is not None else query,
                               "kind": "image" if image is not None else "text",
                               "target": target, "index": str(index),
                               "results": [{"rank": h.rank, "score": h.score, "id": h.id} for h in hits]}, indent=1))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    title = f"{what} on {target}"
    table = Table( box=box.SIMPLE_HEAD, show_edge=False, header_style="bold")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("image id", overflow="fold")
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", h.id)
    console = Console()
    if not console.is_terminal:  # a pipe or file has no width to respect: whole ids, one per line
        console = Console(width=max(console.width, len(title), max((len(h.id) for h in hits), default=0) + 20))
    console.print(title, markup=False, highlight=False)  # a table's title would wrap at the table's width
    console.print(table)

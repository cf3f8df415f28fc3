"""`holiclip eval TASK --checkpoint DIR --data PATH`: retrieval, long-retrieval, zeroshot,
dense, diversity. Each prints a compact table (one row per branch variant) and writes JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import comma_list

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Evaluate a checkpoint.")

# -- shared options ------------------------------------------------------------------------
Checkpoint = Annotated[Optional[Path], typer.Option("--checkpoint", "-c", metavar="PATH", help="holiclip model folder (or its model.safetensors).")]
ModelName = Annotated[Optional[str], typer.Option("--model", help="Architecture name, instead of --checkpoint (plain CLIP = H 1).")]
Pretrained = Annotated[Optional[str], typer.Option("--pretrained", help="With --model: open_clip tag or weights file.")]
Data = Annotated[Path, typer.Option("--data", "-d", metavar="PATH", help="Dataset path (see docs/evaluation.md for formats).")]
Fusion = Annotated[str, typer.Option("--fusion", help="mean | mean-logits | max | norm-max")]
Branches = Annotated[Optional[str], typer.Option("--branches", help="Comma-separated branch subset, e.g. main,detail.")]
PerBranch = Annotated[bool, typer.Option("--per-branch", help="Also one row per branch alone.")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE", help="Result JSON path (default results/<task>-<dataset>.json).")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 ...")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
Workers = Annotated[int, typer.Option("--workers", help="Image loading workers.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Only the first N images (quick checks).")]
StratifiedLimit = Annotated[Optional[int], typer.Option(
    "--limit", help="Only N images (quick checks): a seeded subset taking every class in turn.")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="No progress bars.")]  # one name: help stays narrow
Templates = Annotated[str, typer.Option("--templates", help="openai | simple | a file with one '{}' template per line.")]
Ties = Annotated[str, typer.Option("--ties", help="A correct item tied with wrong ones: pessimistic (ranks below them), "
                                   "optimistic, or clip-benchmark (torch.topk's order, as CLIP_benchmark).")]


def _run(task: str, checkpoint, model, pretrained, device, out, percent: bool = True, **options) -> dict:
    from holiclip.data.records import DataError
    from holiclip.evaluation import load_eval_model, print_rows, run_task, write_json

    try:
        em = load_eval_model(checkpoint, model, pretrained, device)
        result = run_task(task, em, **options)
    except (DataError, FileNotFoundError, KeyError, ValueError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    title = f"{result['task']} - {result['dataset']} - {em.name} ({em.pretrained})" + (" [%]" if percent else "")
    print_rows(result["rows"], result["columns"], title=title, percent=percent)
    for note in result.get("notes", []):
        typer.secho(note, fg="yellow", err=True)
    skipped = result.get("skipped_images") or []
    if skipped:  # left out of the metrics: say so, naming the files
        shown = "; ".join(f"{s['image']} ({s['error']})" for s in skipped[:5])
        more = f"; and {len(skipped) - 5} more (all in the JSON)" if len(skipped) > 5 else ""
        typer.secho(f"{len(skipped)} unreadable image{'s' if len(skipped) > 1 else ''} skipped, left out of the "
                    f"metrics: {shown}{more}", fg="yellow", err=True)
    if "text_stats" in result and result["text_stats"]["truncated"]:
        s = result["text_stats"]
        typer.echo(f"{s['truncated']} of {s['texts']} texts were truncated at the context length (longest: {s['max_tokens']} tokens)")
    out = out or Path("results") / f"{task}-{Path(str(result['dataset'])).stem}.json"
    typer.echo(f"wrote {write_json(out, result)}")
    return result


@app.command()
def retrieval(
    data: Data,
    checkpoint: Checkpoint = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    fmt: Annotated[str, typer.Option("--format", help="auto | manifest | coco | karpathy | long | urban1k | clip-benchmark")] = "auto",
    image_root: Annotated[Optional[Path], typer.Option("--image-root", metavar="DIR", help="Folder the image paths are relative to.")] = None,
    split: Annotated[str, typer.Option("--split", help="Karpathy split; CLIP_benchmark webdataset: test | train.")] = "test",
    slots: Annotated[Optional[str], typer.Option("--slots", help="Our manifests: caption slots used as texts (all by default).")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="Long-caption files: the caption field.")] = None,
    long_text: Annotated[str, typer.Option("--long-text", help="truncate | split (sentence embeddings averaged).")] = "truncate",
    identical_as_hits: Annotated[bool, typer.Option("--identical-as-hits", help="Images sharing a caption count as each other's match.")] = False,
    fusion: Fusion = "mean",
    branches: Branches = None,
    per_branch: PerBranch = False,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size", help="Images per score block (default: about 32M scores).")] = None,
    ties: Ties = "pessimistic",
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    no_progress: NoProgress = False,
) -> None:
    """Image-text recall@1/5/10 both ways (several captions per image)."""
    _run(
        "retrieval", checkpoint, model, pretrained, device, out, data=data, fmt=fmt, image_root=image_root, split=split,
        slots=comma_list(slots), text_field=text_field, long_text=long_text, identical_captions_as_hits=identical_as_hits,
        fusion=fusion, branches=comma_list(branches), per_branch=per_branch, chunk_size=chunk_size, ties=ties,
        batch_size=batch_size, num_workers=workers, limit=limit, progress=not no_progress,
    )


@app.command("long-retrieval")
def long_retrieval(
    data: Data,
    checkpoint: Checkpoint = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    fmt: Annotated[str, typer.Option("--format", help="auto | manifest | long | urban1k | coco | karpathy")] = "auto",
    image_root: Annotated[Optional[Path], typer.Option("--image-root")] = None,
    slots: Annotated[Optional[str], typer.Option("--slots", help="Our manifests: the long slot (default detail).")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field")] = None,
    long_text: Annotated[str, typer.Option("--long-text", help="truncate | split (sentence embeddings averaged).")] = "truncate",
    fusion: Fusion = "mean",
    branches: Branches = None,
    per_branch: PerBranch = False,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    no_progress: NoProgress = False,
) -> None:
    """Retrieval with long captions (detail slot, ShareGPT4V / Urban1k / DCI-style files)."""
    _run(
        "long-retrieval", checkpoint, model, pretrained, device, out, data=data, fmt=fmt, image_root=image_root,
        slots=comma_list(slots), text_field=text_field, long_text=long_text, fusion=fusion, branches=comma_list(branches),
        per_branch=per_branch, batch_size=batch_size, num_workers=workers, limit=limit, progress=not no_progress,
    )


@app.command()
def zeroshot(
    data: Data,
    checkpoint: Checkpoint = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    classnames: Annotated[Optional[str], typer.Option(
        "--classnames", help="imagenet | a .txt/.json file (default: folder names, or the set's classnames.txt).")] = None,
    templates: Annotated[Optional[str], typer.Option("--templates", help="openai | simple | a file with one '{}' "
                                                     "template per line (default: the set's own file, else openai).")] = None,
    split: Annotated[str, typer.Option("--split", help="CLIP_benchmark webdataset: test | train.")] = "test",
    fusion: Fusion = "mean",
    branches: Branches = None,
    per_branch: PerBranch = False,
    batch_size: BatchSize = 64,
    workers: Workers = 0,
    limit: StratifiedLimit = None,
    device: Device = "cpu",
    out: Out = None,
    no_progress: NoProgress = False,
) -> None:
    """Zero-shot classification on an ImageFolder or a CLIP_benchmark webdataset: top-1/top-5, per-class recall."""
    _run(
        "zeroshot", checkpoint, model, pretrained, device, out, data=data, classnames=classnames, templates=templates, split=split,
        fusion=fusion, branches=comma_list(branches), per_branch=per_branch, batch_size=batch_size, num_workers=workers,
        limit=limit, progress=not no_progress,
    )


@app.command()
def dense(
    data: Data,
    checkpoint: Checkpoint = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    classes: Annotated[Optional[Path], typer.Option("--classes", help="Class names by mask value (default classes.json/.txt beside the data).")] = None,
    templates: Templates = "openai",
    fusion: Fusion = "mean",
    branches: Branches = None,
    per_branch: PerBranch = False,
    batch_size: BatchSize = 16,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    no_progress: NoProgress = False,
) -> None:
    """Open-vocabulary segmentation from patch tokens; mIoU against class-index masks."""
    _run(
        "dense", checkpoint, model, pretrained, device, out, data=data, classes=classes, templates=templates,
        fusion=fusion, branches=comma_list(branches), per_branch=per_branch, batch_size=batch_size, limit=limit,
        progress=not no_progress,
    )


@app.command()
def diversity(
    data: Data,
    checkpoint: Checkpoint = None,
    model: ModelName = None,
    pretrained: Pretrained = None,
    slots: Annotated[Optional[str], typer.Option("--slots", help="Slots to compare (default all).")] = None,
    limit: Limit = None,
    device: Device = "cpu",
    out: Out = None,
    no_progress: NoProgress = False,
) -> None:
    """Mean cosine similarity between an image's texts, per slot pair (paper Table 9)."""
    _run(
        "diversity", checkpoint, model, pretrained, device, out, percent=False, data=data, slots=comma_list(slots),
        limit=limit, progress=not no_progress,
    )


@app.command("clip-benchmark", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def clip_benchmark(
    ctx: typer.Context,
    checkpoint: Annotated[str, typer.Option("--checkpoint", "-c", help="A model or run folder, a .safetensors file or hf-hub:ORG/NAME.")],
    fusion: Fusion = "mean",
    branches: Branches = None,
    ties: Annotated[str, typer.Option("--ties", help="clip-benchmark (torch.topk's order: its published numbers) or "
                                      "pessimistic (ties ranked below, as holiclip eval retrieval).")] = "clip-benchmark",
) -> None:
    """CLIP_benchmark's own evaluation on a holiclip model: `holiclip eval clip-benchmark -c DIR -- --dataset
    wds/NAME --dataset_root ... --task zeroshot_retrieval` (any `clip_benchmark eval` arguments after `--`)."""
    from holiclip.integrations.clip_benchmark import BenchError, run_clip_benchmark

    try:
        status = run_clip_benchmark(checkpoint, ctx.args, fusion, comma_list(branches), ties)
    except (BenchError, FileNotFoundError, KeyError, ValueError, AssertionError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(status)

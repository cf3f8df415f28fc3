"""`holiclip data`: build and inspect datasets (the built-in emoji benchmark); convert manifests into shards;
prepare shards for a multi-GPU launch (sizes.json, the text-feature cache)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ._options import comma_list, model_tokenizer, train_config

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Build and inspect datasets (built-in emoji benchmark), convert manifests to shards.")
console = Console()


@app.command()
def emoji(
    out: Optional[Path] = typer.Option(None, "--out", help="Dataset folder (default emoji-<preset> in the cache root, ~/.cache/holiclip or $HOLICLIP_CACHE)."),
    preset: str = typer.Option("default", "--preset", help="default (120 classes, 8000 train) or tiny (tests)."),
    size: Optional[int] = typer.Option(None, "--size", help="Image side in pixels (default 64)."),
    classes: Optional[int] = typer.Option(None, "--classes", help="Number of object classes."),
    train: Optional[int] = typer.Option(None, "--train", help="Training scenes."),
    val: Optional[int] = typer.Option(None, "--val", help="Validation scenes."),
    test: Optional[int] = typer.Option(None, "--test", help="Test scenes."),
    heldout: Optional[int] = typer.Option(None, "--heldout", help="Scenes per held-out artwork style."),
    heldout_styles: Optional[str] = typer.Option(None, "--heldout-styles",
                                                 help="Comma-separated held-out styles (twemoji,openmoji)."),
    max_objects: Optional[int] = typer.Option(None, "--max-objects", help="Objects per scene, 1 to 4."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                             help="Source cache (default emoji-sources in the cache root)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a cached build matches."),
) -> None:
    """Build the emoji benchmark (cached: same parameters and sources return at once)."""
    from holiclip.benchmarks.emoji.data import build as B
    from holiclip.benchmarks.emoji.data.sources import MissingSourcesError

    styles = tuple(comma_list(heldout_styles) or ()) if heldout_styles is not None else None
    if max_objects is not None and not 1 <= max_objects <= 4:
        raise typer.BadParameter("--max-objects must be 1 to 4")
    try:
        params = B.preset(preset, size=size, classes=classes, train=train, val=val, test=test,
                          heldout=heldout, heldout_styles=styles, max_objects=max_objects, seed=seed)
        from holiclip.io import cache_root

        root = out or cache_root() / f"emoji-{preset}"
        with console.status("building emoji benchmark..."):
            meta = B.build(root, params, cache_dir=cache_dir, force=force)
    except MissingSourcesError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1)
    except (ValueError, FileExistsError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2)
    _print_summary(meta)


def _print_summary(meta: dict) -> None:
    root = Path(meta["root"])
    p = meta["params"]
    state = "cached (no rebuild)" if meta.get("cached") else f"built in {meta['build_seconds']} s"
    table = Table(title=f"emoji benchmark: {meta['n_classes']} classes, {meta['n_backgrounds']} background "
                        f"colours, {p['size']} px, {state}")
    # Narrow headers so the table fits 80 columns: objects per scene (1/2/3/4), distinct web
    # captions, and the strict web-caption R@1 ceiling (distinct / scenes).
    for col in ("split", "style", "scenes", "objs 1/2/3/4", "web uniq", "R@1 max"):
        table.add_column(col, justify="left" if col in ("split", "style") else "right", no_wrap=True)
    for split, s in meta["splits"].items():
        counts = "/".join(str(s["objects_per_scene"].get(str(k), 0)) for k in range(1, 5))
        table.add_row(split, s["style"], str(s["n"]), counts, str(s["unique_web_captions"]),
                      f"{s['web_strict_r1_ceiling']:.3f}")
    console.print(table)
    console.print(f"root: {root}")
    console.print("splits: " + "  ".join(f"{split}.jsonl" for split in meta["splits"]))
    console.print(f"classes: {root / 'classes.json'}   meta: {root / 'meta.json'}   "
                  f"arrays: {root / 'arrays'}   licences: {root / 'LICENSES.md'}")
    console.print(f"text slots: {', '.join(meta['slots'])}")


@app.command()
def sources(
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Default: emoji-sources in the cache root."),
    styles: str = typer.Option("twemoji,openmoji", "--styles", help="Held-out artwork styles."),
) -> None:
    """Show the emoji benchmark's installed sources: font, Unicode data, held-out artwork
    (`make emoji-sources` installs them)."""
    from holiclip.benchmarks.emoji.data.sources import MissingSourcesError, require_sources

    wanted = tuple(comma_list(styles) or ())
    try:
        src = require_sources(cache_dir, styles=wanted)
    except ValueError as err:  # an unknown style
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2)
    except MissingSourcesError as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1)
    table = Table(title="emoji benchmark sources")
    table.add_column("source")
    table.add_column("version")
    table.add_column("path")
    table.add_row("noto", src.versions.get("noto", "-"), str(src.noto_font))
    table.add_row("emoji-test.txt", src.versions.get("emoji_test", "-"), str(src.emoji_test))
    table.add_row("CLDR annotations", src.versions.get("cldr", "-"), ", ".join(map(str, src.cldr)))
    for name, d in src.art_dirs.items():
        table.add_row(name, src.versions.get(name, "-"), str(d))
    console.print(table)


@app.command()
def shard(
    manifest: Path = typer.Argument(..., help="JSONL or CSV manifest (image paths relative to its folder)."),
    out: Path = typer.Option(..., "--out", help="Folder for shard-000000.tar ... and sizes.json."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Samples per shard."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes writing shards in parallel."),
    slots: Optional[str] = typer.Option(None, "--slots", help="Caption slots to keep, in order (default: every caption of each row)."),
    missing: str = typer.Option("error", "--missing", help="With --slots, a row missing one: error | drop | fill:<slot>."),
    list_slots: Optional[str] = typer.Option(None, "--list-slots", help="Slot names for a research-format 'caption' list (as data.list_slots)."),
    on_bad_row: str = typer.Option("error", "--on-bad-row", help="A malformed row: error (stop, naming file:line) | skip (count it)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Also store the captions' token ids for this model's tokenizer (its model.name), so training tokenises nothing."),
) -> None:
    """Convert a JSONL / CSV manifest and its images into webdataset shards (jpg|png|webp + json
    with named captions) and sizes.json. Resumable: re-run the same command after an interruption."""
    from holiclip.data.records import DataError, parse_policy
    from holiclip.data.sharding import shard_manifest

    try:
        parse_policy(missing)
        if on_bad_row not in ("error", "skip"):
            raise ValueError(f"--on-bad-row must be error or skip, got {on_bad_row!r}")
        rep = shard_manifest(manifest, out, shard_size=shard_size, workers=workers, slots=comma_list(slots),
                             missing_slot_policy=missing, list_slots=comma_list(list_slots),
                             on_bad_row=on_bad_row, progress=progress, tokenizer=model_tokenizer(tokenizer))
    except (DataError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    for line in rep.lines():
        typer.echo(line)


@app.command()
def sizes(
    shards: List[str] = typer.Argument(..., help="Shards: a folder of .tar files, a brace pattern "
                                                 "(dir/shard-{000000..000099}.tar) or .tar files."),
    workers: int = typer.Option(4, "--workers", min=1, help="Processes counting shards in parallel."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Count the samples of webdataset shards and write sizes.json beside them.

    A pass over each shard's tar headers (no image is read); with sizes.json no training launch
    counts the shards."""
    from holiclip.data.records import DataError
    from holiclip.data.shards import shard_urls, write_sizes

    try:
        urls = []
        for item in shards:
            found = shard_urls(item)
            if not found:
                raise DataError(f"{item}: no webdataset shards (.tar files) found")
            urls += found
        written = write_sizes(urls, workers=workers, progress=progress)
    except DataError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    for path, (count, samples) in written.items():
        typer.echo(f"{path}: {count} shards, {samples:,} samples")


@app.command("cache-texts")
def cache_texts(
    config: Optional[Path] = typer.Argument(None, help="The training config: a shipped name (holiclip configs list) or a YAML file."),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides, as for train."),
) -> None:
    """Fill the locked text trunk's feature cache with a training config's texts, before torchrun.

    What the start of `holiclip train` does: run it once before a multi-GPU launch, so that the
    launch reads no shard for the cache. Under torchrun the ranks share the work; shards recorded
    complete are not read again."""
    from holiclip.data.records import DataError
    from holiclip.training.trainer import cache_texts as fill

    try:
        got = fill(train_config(config, overrides))
    except (DataError, KeyError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"text cache {got['path']}: {got['sources']} sources ({got['complete']} complete already, "
               f"{got['read']} read), {got['texts']:,} texts read, {got['new']:,} new features, {got['rows']:,} in all")

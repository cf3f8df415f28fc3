"""`holiclip train CONFIG.yaml [section.key=value ...] [--resume latest [--allow-world-size-change] | --overwrite]`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def app(
    config: Optional[Path] = typer.Argument(None, help="YAML config (see configs/)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="section.key=value overrides, e.g. optim.steps=500"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint path."),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (same as run.out=...)."),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Start over in a run folder that holds a previous run: first delete that run's checkpoints/, "
             "metrics.jsonl, tensorboard/, model/ and config.yaml (other files stay). Without it (or --resume), "
             "training into such a folder stops."),
    allow_world_size_change: bool = typer.Option(
        False, "--allow-world-size-change",
        help="With --resume latest: go on over another number of GPUs than the checkpoint's (the global batch "
             "changes with it; the rest of the epoch is re-split over the new ranks, no sample repeated). "
             "Without it such a resume stops."),
) -> None:
    """Train Holistic CLIP (or the CLIP / O2M baselines) in one process or under torchrun."""
    from ..data.records import DataError
    from ..training.trainer import NonFiniteLoss, train
    from ._options import train_config

    try:
        cfg = train_config(config, overrides, *([f"run.out={out}"] if out else []))
        result = train(cfg, resume=resume, overwrite=overwrite, allow_world_size_change=allow_world_size_change)
    except (DataError, NonFiniteLoss, KeyError, ValueError, FileNotFoundError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    last = result["last"]
    if result["trained_steps"] == 0:  # resumed at the end: report the last logged loss, not a nan
        logged = f" (last logged loss {last['loss']:.4f} at step {last['step']})" if "loss" in last else ""
        typer.echo(f"nothing to train: the run was already complete at step {result['step']} of {cfg.optim.steps}"
                   f"{logged}, run folder {result['out']}")
        return
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    typer.echo(f"done: step {result['step']}{loss}, run folder {result['out']}")

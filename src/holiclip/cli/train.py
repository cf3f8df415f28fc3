"""`holiclip train NAME|CONFIG.yaml [section.key=value ...] [--resume latest [--allow-world-size-change] | --overwrite]`."""
from __future__ import annotations

from typing import List, Optional

import typer


def app(
    config: Optional[str] = typer.Argument(
        None, help="A shipped config by name (holistic_cls, clip, o2m, ...: holiclip configs list) or a YAML file."),
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
    from ..io import torchrun_env
    from ..training.presets import names_hint
    from ._options import train_config

    if config is None and not overrides:
        _fail(f"holiclip train needs a config: a shipped one by name ({names_hint()}) or a "
              "YAML file, then section.key=value overrides; e.g. holiclip train holistic_cls data.train=train.jsonl")
    try:  # before torch loads: a typo is reported at once
        cfg = train_config(config, overrides, *([f"run.out={out}"] if out else []))
    except ValueError as err:
        _fail(str(err))
    from ..training.trainer import NonFiniteLoss, train

    try:
        result = train(cfg, resume=resume, overwrite=overwrite, allow_world_size_change=allow_world_size_change)
    except (DataError, NonFiniteLoss, KeyError, ValueError, FileNotFoundError) as err:
        _fail(str(err))
    if torchrun_env().rank != 0:  # one final line per run, not one per rank
        return
    last = result["last"]
    if result["trained_steps"] == 0:  # resumed at the end: report the last logged loss, not a nan
        logged = f" (last logged loss {last['loss']:.4f} at step {last['step']})" if "loss" in last else ""
        typer.echo(f"nothing to train: the run was already complete at step {result['step']} of {cfg.optim.steps}"
                   f"{logged}, run folder {result['out']}")
        return
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    typer.echo(f"done: step {result['step']}{loss}, run folder {result['out']}")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)

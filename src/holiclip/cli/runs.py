"""`holiclip runs [RUN_DIR ...]`: where each run stands (step, ETA, last metrics and eval, checkpoints),
read from its folder while it trains; no torch is imported."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def app(
    run_dirs: Optional[List[Path]] = typer.Argument(
        None, help="Run folders (run.out); default: every run folder under ./runs."),
) -> None:
    """Where runs stand: step / total, ETA from the recent samples/s, last metrics, last evaluation, checkpoints."""
    from ..training.status import describe, find_runs, run_status

    dirs = list(run_dirs or []) or find_runs("runs")
    if not dirs:
        typer.secho("error: no run folders given and none under ./runs (holiclip runs RUN_DIR ...)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    failed = False
    for path in dirs:
        try:
            lines = describe(run_status(path))
        except (FileNotFoundError, ValueError, OSError) as err:  # yaml errors are ValueErrors too
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            failed = True
            continue
        typer.echo("\n".join(lines))
    if failed:
        raise typer.Exit(2)

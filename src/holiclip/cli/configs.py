"""`holiclip configs`: the training configs that ship with the package (`holiclip train NAME`)."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """Shipped configs: the baselines, the demo's variants (demo/...) and the ablations' (ablations/...)."""
    from ..training.presets import describe, shipped_configs

    table = Table("name", "what")
    for name, path in shipped_configs().items():
        table.add_row(name, describe(path))
    Console().print(table)
    typer.echo("Train one with: holiclip train NAME data.train=... (holiclip configs show NAME prints it)")


@app.command("show")
def show(name: str = typer.Argument(..., help="A name from holiclip configs list.")) -> None:
    """Prints a shipped config (copy it to edit: holiclip configs show NAME > my.yaml)."""
    from ..training.config import ConfigError, find_config
    from ..training.presets import shipped_configs

    path = shipped_configs().get(name.removesuffix(".yaml"))
    try:
        path = path or find_config(name)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(path.read_text(encoding="utf-8"), nl=False)

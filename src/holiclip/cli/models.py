"""`holiclip models`: list and inspect architectures."""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ._options import comma_list

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_cmd() -> None:
    """Architectures in holiclip's registry."""
    from ..models.registry import config_summary, get_model_config, list_models

    table = Table("name", "architecture")
    for name in list_models():
        table.add_row(name, config_summary(get_model_config(name)))
    Console().print(table)


@app.command("info")
def info(name: str, encoder: str = "cls", branches: str = "web,detail,background,main,style") -> None:
    """Parameter counts of a model with the given branches."""
    from ..models.registry import create_model

    names = comma_list(branches) or []
    model = create_model(name, encoder=encoder, branches=names, pretrained_text=False)
    base = create_model(name, encoder=encoder, branches=names[:1], pretrained_text=False)
    total = sum(p.numel() for p in model.parameters())
    extra = total - sum(p.numel() for p in base.parameters())
    typer.echo(f"{name} {encoder} H={len(names)}: {total:,} parameters ({extra:,} for the extra branches)")

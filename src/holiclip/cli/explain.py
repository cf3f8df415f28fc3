"""`holiclip explain IMAGE --checkpoint DIR --out maps.png`: the image and each branch's
last-block class-token attention map, titled with the branch names (paper Fig. 3)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def app(
    image: Annotated[Path, typer.Argument(help="Image file.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="holiclip model folder.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Architecture name, instead of --checkpoint.")] = None,
    pretrained: Annotated[Optional[str], typer.Option("--pretrained", help="With --model: open_clip tag or weights file.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("explain.png"),
    branches: Annotated[Optional[str], typer.Option("--branches", help="Comma-separated branches to show (default all).")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
) -> None:
    """Per-branch attention maps of an image."""
    from holiclip.evaluation import explain_image, load_eval_model

    try:
        em = load_eval_model(checkpoint, model, pretrained, device)
        pick = [b.strip() for b in branches.split(",") if b.strip()] if branches else None
        path = explain_image(em.model, image, out, branches=pick, device=em.device, title=f"{em.name} ({Path(em.pretrained).name})")
    except (FileNotFoundError, KeyError, ValueError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {path}")

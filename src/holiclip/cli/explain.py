"""`holiclip explain IMAGE --checkpoint DIR --out maps.png`: the image and each branch's
last-block class-token attention map, titled with the branch names (paper Fig. 3); a table of
each map's peak patch and entropy, and the raw maps in maps.json beside the PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._options import comma_list


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
    from holiclip.evaluation import explain_image, load_eval_model, print_rows, write_json
    from holiclip.evaluation.explain import attention_summary

    try:
        em = load_eval_model(checkpoint, model, pretrained, device)
        pick = comma_list(branches)
        path = explain_image(em.model, image, out, branches=pick, device=em.device, title=f"{em.name} ({Path(em.pretrained).name})")
        rows = [r for r in attention_summary(em.model, image, em.device) if pick is None or r["branch"] in pick]
    except (FileNotFoundError, KeyError, ValueError) as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(2) from None
    print_rows(rows, ["branch", "peak_row", "peak_col", "entropy"], title=f"attention, last block: {image.name}", percent=False)
    sidecar = write_json(path.with_suffix(".json"), {"image": str(image), "model": em.name, "pretrained": em.pretrained, "branches": rows})
    typer.echo(f"wrote {path} and {sidecar}")

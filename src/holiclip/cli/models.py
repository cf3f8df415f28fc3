"""`holiclip models`: list and inspect architectures.

Both commands read the architectures' JSON files and count parameters from them, without
importing torch (which takes seconds and hundreds of MB); an architecture the count does not
cover (a Hugging Face text tower, options beyond open_clip's defaults) is built to be counted.
"""
from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..models import builtin_configs
from ._options import comma_list

app = typer.Typer(no_args_is_help=True)


# The keys whose default values the count below assumes; any other key: build the model to count it.
_VISION_KEYS = {"image_size", "layers", "width", "head_width", "patch_size", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _blocks(layers: int, width: int, mlp_ratio: float) -> int:
    """open_clip's ResidualAttentionBlock x layers: 2 LayerNorms, attention (in + out projection), MLP."""
    hidden = int(width * mlp_ratio)
    per_block = 4 * width + (3 * width * width + 3 * width) + (width * width + width) \
        + (width * hidden + hidden) + (hidden * width + width)
    return layers * per_block


def count_parameters(cfg: dict, encoder: str, branches: int, mlp_layers: int | None = None) -> tuple[int, int] | None:
    """(total, extra for branches 2..H) of a HolisticCLIP built from an open_clip-format config;
    None where the config uses what this count does not model."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if set(cfg) - {"embed_dim", "vision_cfg", "text_cfg", "holistic"} or set(v) - _VISION_KEYS or set(t) - _TEXT_KEYS:
        return None
    width, dim = v["width"], cfg["embed_dim"]
    grid = v["image_size"] // v["patch_size"]
    vision = 3 * v["patch_size"] ** 2 * width + width + (grid * grid + 1) * width + 4 * width \
        + _blocks(v["layers"], width, v.get("mlp_ratio", 4.0)) + width * dim
    tw = t["width"]
    text = t["vocab_size"] * tw + t["context_length"] * tw + _blocks(t["layers"], tw, t.get("mlp_ratio", 4.0)) \
        + 2 * tw + tw * dim
    if encoder == "cls":  # a class token and its positional row per extra branch
        extra = (branches - 1) * 2 * width
    else:  # the forked blocks' second MLP layer per extra branch
        layers = mlp_layers if mlp_layers is not None else cfg.get("holistic", {}).get("mlp_layers", 3)
        hidden = int(width * v.get("mlp_ratio", 4.0))
        extra = (branches - 1) * layers * (hidden * width + width)
    return vision + text + 1 + extra, extra  # + 1: the logit scale


@app.command("list")
def list_cmd() -> None:
    """Architectures in holiclip's registry."""
    from ..models import config_summary

    table = Table("name", "architecture")
    for name, cfg in builtin_configs().items():
        table.add_row(name, config_summary(cfg))
    Console().print(table)


@app.command("info")
def info(name: str, encoder: str = "cls", branches: str = "web,detail,background,main,style") -> None:
    """Parameter counts of a model with the given branches."""
    from ..models import ENCODERS

    names = comma_list(branches) or []
    if encoder not in ENCODERS or not names:
        typer.secho(f"error: --encoder must be one of {'|'.join(ENCODERS)} and --branches name at least one branch",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    cfg = builtin_configs().get(name)
    counted = count_parameters(cfg, encoder, len(names)) if cfg is not None else None
    if counted is None:  # another architecture (open_clip's names) or one the count does not model
        from ..models.registry import create_model

        model = create_model(name, encoder=encoder, branches=names, pretrained_text=False)
        base = create_model(name, encoder=encoder, branches=names[:1], pretrained_text=False)
        total = sum(p.numel() for p in model.parameters())
        counted = total, total - sum(p.numel() for p in base.parameters())
    total, extra = counted
    typer.echo(f"{name} {encoder} H={len(names)}: {total:,} parameters ({extra:,} for the extra branches)")

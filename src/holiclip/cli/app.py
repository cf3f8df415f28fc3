"""`holiclip` command line: one module per command group, wired here."""
from __future__ import annotations

import importlib

import typer
from typer.core import TyperGroup

from holiclip import console
from holiclip._extras import MissingExtra


class _Group(TyperGroup):
    """Every command: an optional package missing is one line naming the extra, exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MissingExtra as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(2) from None


# no local variables in an unexpected traceback: they can hold an API key
app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Holistic CLIP: train, caption, evaluate, demo.")

# (module, attribute, name, help); a group module exposes a typer.Typer named `app`,
# a single command module a function. Each module imports its heavy dependencies inside its
# commands, so that --help stays fast.
_GROUPS = [
    ("holiclip.cli.models", "app", "models", "List and inspect architectures."),
    ("holiclip.cli.train", "app", "train", "Train Holistic CLIP / CLIP / O2M from a shipped config or a YAML file."),
    ("holiclip.cli.runs", "app", "runs", "Where runs stand: step, ETA, last metrics and evaluation, checkpoints."),
    ("holiclip.cli.configs", "app", "configs", "List and print the training configs that ship with holiclip."),
    ("holiclip.cli.data", "app", "data", "Build and inspect datasets (built-in emoji benchmark)."),
    ("holiclip.cli.caption", "app", "caption", "Caption images from several perspectives with VLMs."),
    ("holiclip.cli.eval", "app", "eval", "Evaluate a checkpoint: retrieval, zero-shot, dense, diversity."),
    ("holiclip.cli.explain", "app", "explain", "Per-branch attention maps of an image."),
    ("holiclip.cli.demo", "app", "demo", "CLIP vs O2M vs Holistic CLIP on the built-in emoji benchmark."),
    ("holiclip.cli.search", "embed", "embed", "Embed a collection of images: per-branch and fused faiss indexes."),
    ("holiclip.cli.search", "search", "search", "Search an embedded collection by text or example image, per branch."),
]



def _version(value: bool) -> None:
    if value:
        from holiclip import __version__

        typer.echo(f"holiclip {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    pass


for module_name, attr, name, help_text in _GROUPS:
    obj = getattr(importlib.import_module(module_name), attr)
    if isinstance(obj, typer.Typer):
        app.add_typer(obj, name=name, help=help_text)
    else:
        app.command(name=name, help=help_text)(obj)


def main() -> None:
    console.setup()
    app()


if __name__ == "__main__":
    main()

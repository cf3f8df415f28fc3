"""Compact rich tables of result rows and JSON result files (NaN -> null, tensors -> lists)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch


def to_jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(obj), indent=2) + "\n")
    return path


def _cell(value, percent: bool) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{100 * value:.2f}" if percent else f"{value:.4f}"
    return "" if value is None else str(value)


def print_rows(
    rows: Sequence[dict],
    columns: Sequence[str],
    title: str | None = None,
    percent: bool = True,
    console=None,
) -> None:
    """One table row per dict; float metrics shown as percentages when ``percent``."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cells = [[_cell(row.get(c), percent) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        # the branch label keeps its full width; numbers fold only on a too-narrow terminal
        table.add_column(col, justify="left" if i == 0 else "right", min_width=widths[0] if i == 0 else None,
                         no_wrap=i == 0, overflow="fold")
    for r in cells:
        table.add_row(*r)
    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or file has no width to respect
            console = Console(width=max(console.width, sum(widths) + 3 * len(widths)))
    console.print(table)

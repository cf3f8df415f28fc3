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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_edge=False, pad_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        # fold rather than ellipsise: the first column (the branch label) must stay readable
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(c), percent) for c in columns))
    (console or Console()).print(table)

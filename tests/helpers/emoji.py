"""Reading back a built emoji dataset."""
from __future__ import annotations

from holiclip.benchmarks.emoji.data import build as B


def all_rows(root) -> dict[str, list[dict]]:
    """Every split's rows, by split name."""
    return {s: B.read_rows(root, s) for s in B.split_names(root)}

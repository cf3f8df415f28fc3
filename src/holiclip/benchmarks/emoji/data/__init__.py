"""The emoji benchmark's data: multi-perspective captioned scenes of emoji (see docs/emoji.md).

Modules, in data-flow order: sources (find the installed artwork and Unicode data) -> classes
(which emoji, names, synonyms) -> sprites (artwork as arrays) -> backgrounds, scenes
(layouts, compositing, masks) -> captions (six perspectives) -> splits, build (cached
dataset, loaders).
"""
# Note: ``build`` here is the module (``from holiclip.benchmarks.emoji.data import build``);
# the function is ``build.build``.
from . import build
from .build import (
    PRESETS,
    EmojiParams,
    load_classes,
    load_masks,
    load_split,
    preset,
    read_rows,
    split_names,
)
from .sources import MissingSourcesError, require_sources

__all__ = [
    "PRESETS", "EmojiParams", "build", "load_classes", "load_masks", "load_split", "preset",
    "read_rows", "split_names", "MissingSourcesError", "require_sources",
]

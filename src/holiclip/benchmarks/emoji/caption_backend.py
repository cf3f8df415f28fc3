"""The ``scene`` captioning backend: returns each emoji scene's precomputed layout caption.

The emoji benchmark (``holiclip.benchmarks.emoji.data``) renders scenes whose captions come from
the scene layout, not from a VLM, and writes them into its dataset JSONL
(``{"image": ..., "captions": {"detail": ..., "background": ...}}``). This adapter looks up
``captions[perspective]`` for the requested image, so that the emoji benchmark goes through
exactly the same captioning -> merge path as real data (and tests need no model).
``holiclip caption run --backend scene`` finds it through the ``holiclip.captioning.backends``
entry point (pyproject.toml), so the captioning package never names the benchmark.

- ``index``: the emoji dataset JSONL (``--backend-option index=FILE``); by default the
  ``source`` being captioned when that is a JSONL (``--images train.jsonl``);
- ``caption_fn``: alternatively a function ``(image_key, perspective) -> str`` (e.g. the
  emoji package's scene captioner), used for images absent from the index.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from holiclip.captioning.backends import CaptionError, CaptionRequest, CaptionResult
from holiclip.captioning.sources import ImageSource


class SceneBackend:
    needs_image_bytes = False  # a look-up: no need to read the image files

    def __init__(self, model: str | None = "scene", *, index: str | os.PathLike | None = None,
                 caption_fn: Callable[[str, str], str] | None = None, batch_size: int = 64,
                 concurrency: int = 1, source: ImageSource | None = None):
        if index is None and source is not None and source.kind == "jsonl":
            index = source.src
        if index is None and caption_fn is None:
            raise CaptionError("scene backend: give the emoji dataset JSONL (--images FILE.jsonl or "
                               "--backend-option index=FILE) or a caption_fn")
        self.model = model or "scene"
        self.batch_size, self.concurrency = batch_size, concurrency
        self.caption_fn = caption_fn
        self.retries = 0
        self._index: dict[str, tuple[dict, str]] = {}
        if index is not None:
            self._load(Path(index))

    def _load(self, path: Path) -> None:
        from holiclip.data.readers import read_jsonl  # the project's reader: errors name file:line

        for sample in read_jsonl(path):
            self._index[os.path.abspath(sample.image)] = (sample.captions, sample.where)

    async def aclose(self) -> None:
        return None

    async def generate(self, batch: Sequence[CaptionRequest]) -> list:
        return [self._one(r) for r in batch]

    def _one(self, req: CaptionRequest):
        hit = self._index.get(req.image)
        if hit is not None:
            caps, where = hit
            text = caps.get(req.perspective)
            if isinstance(text, str):
                return CaptionResult(text=text, finish_reason="stop")
            if self.caption_fn is None:
                return CaptionError(
                    f"{where}: field 'captions' has no {req.perspective!r} (has: {', '.join(caps)})"
                )
        if self.caption_fn is not None:
            return CaptionResult(text=self.caption_fn(req.image, req.perspective), finish_reason="stop")
        return CaptionError(f"{req.image}: not in the scene index")

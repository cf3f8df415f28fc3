"""Tiny webdataset shards for the stream tests: samples numbered across shards, each with a
small PNG and a json of named captions that carry its number."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from tests.helpers.datasets import captions, draw

SLOTS = ["web", "detail", "main"]


def png(i: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    draw(i, size).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, sizes: Sequence[int], sizes_file: bool = True, image_size: int = 16,
                 members=None) -> list[Path]:
    """Shards ``shard-000000.tar`` ... with ``sizes[k]`` samples each; sample numbers run on over
    shards (key ``%06d`` of the number). ``members(i) -> dict`` overrides a sample's members."""
    root.mkdir(parents=True, exist_ok=True)
    paths, n = [], 0
    for k, size in enumerate(sizes):
        path = root / f"shard-{k:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(size):
                sample = {"__key__": f"{n:06d}", "png": png(n, image_size),
                          "json": json.dumps({"captions": captions(n)}).encode()}
                if members is not None:
                    sample = {"__key__": sample["__key__"], **members(n, sample)}
                sink.write(sample)
                n += 1
        paths.append(path)
    if sizes_file:
        (root / "sizes.json").write_text(json.dumps({p.name: s for p, s in zip(paths, sizes)}))
    return paths


def number(text: str) -> int:
    """The sample number a caption of :func:`tests.helpers.datasets.captions` carries."""
    return int(text.split("#")[1]) if "#" in text else int(text.rsplit(" ", 1)[1])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A transform for stream tests: the image as it is, (3, H, W) floats."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


class TextCollate:
    """Collate without a tokenizer: keeps the texts, so tests can read which samples came."""

    def __call__(self, items: list[dict]) -> dict:
        return {"images": torch.stack([it["image"] for it in items]), "index": torch.tensor([it["index"] for it in items]),
                "bad": [b for it in items for b in it["bad"]], "texts": [it["texts"] for it in items],
                "num_texts": sum(len(it["texts"]) for it in items), "truncated": 0}


def noisy(image: Image.Image) -> torch.Tensor:
    """A transform that draws from torch's generator, as augmentation does."""
    return to_tensor(image) + torch.rand(1)

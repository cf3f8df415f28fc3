"""Captioning test inputs and outputs: tiny images made on the spot, JSONL rows read back."""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def make_images(folder: Path, n: int, size: int = 12, ext: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.{ext}"
        Image.new("RGB", (size, size), (i * 37 % 256, i * 11 % 256, 200)).save(p)
        paths.append(p)
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

"""Tiny on-disk datasets for data and training tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20),
       "purple": (150, 30, 160), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (5, 5, 5)}
SHAPES = ["square", "stripe", "dot", "cross"]


def draw(i: int, size: int = 64) -> Image.Image:
    colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    arr = np.full((size, size, 3), 128, np.uint8)
    c = RGB[colour]
    q = size // 4
    if shape == "square":
        arr[q:3 * q, q:3 * q] = c
    elif shape == "stripe":
        arr[:, q:2 * q] = c
    elif shape == "dot":
        yy, xx = np.mgrid[:size, :size]
        arr[(yy - 2 * q) ** 2 + (xx - 2 * q) ** 2 < q * q] = c
    else:
        arr[q:3 * q, 2 * q - 3:2 * q + 3] = c
        arr[2 * q - 3:2 * q + 3, q:3 * q] = c
    return Image.fromarray(arr)


def captions(i: int) -> dict:
    colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
    return {
        "web": f"{colour} {shape} #{i}",
        "detail": f"a {shape} painted {colour} in the middle of a grey canvas, picture number {i}",
        "main": f"the main object is a {colour} {shape}",
    }


def make_dataset(root: Path, n: int = 16, name: str = "train.jsonl") -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    path = root / name
    with open(path, "w") as fh:
        for i in range(n):
            draw(i).save(root / "img" / f"{i}.png")
            fh.write(json.dumps({"image": f"img/{i}.png", "captions": captions(i)}) + "\n")
    return path


def with_latin1_line(path: Path, line: int) -> None:
    """Puts a Latin-1 byte (not valid UTF-8) into line ``line`` of a manifest written by make_dataset."""
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b"painted", b"peint\xe9")
    path.write_bytes(b"\n".join(lines))


def dataset_with_corrupt_image(root: Path, n: int = 6) -> Path:
    """make_dataset with image 2 not a readable PNG."""
    path = make_dataset(root, n=n)
    (root / "img" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return path

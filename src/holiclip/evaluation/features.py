"""Batched feature extraction for evaluation: images -> (N, H, D), texts -> (N, D).

An unreadable image (corrupt, truncated, over the pixel limit) is skipped and listed when the
caller passes a ``skipped`` list, otherwise it is an error naming the file.

Texts longer than the model's context are either truncated (the default; the count is
reported) or, with ``long_text="split"``, split into sentences whose embeddings are averaged
and renormalised (a sentence that is itself too long is still truncated and counted).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data.loader import UNREADABLE, open_image
from ..data.tokens import token_lengths
from ..data.records import DataError

LONG_TEXT_MODES = ("truncate", "split")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


def image_name(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return "<image bytes>"
    return "<PIL image>" if isinstance(source, Image.Image) else str(source)


def unreadable(index: int, source, err: Exception) -> dict:
    """The record of a skipped image: its row, name and why."""
    name = image_name(source)
    return {"index": index, "image": name, "error": str(err).removeprefix(f"{name}: ")}


def read_image(source):
    """:func:`open_image` for one image the user named: unreadable is a DataError naming it."""
    try:
        return open_image(source)
    except UNREADABLE as err:
        raise DataError(f"{image_name(source)}: unreadable image ({unreadable(0, source, err)['error']})") from None


def no_readable_images(skipped: list[dict]) -> DataError:
    listing = "\n  ".join(f"{s['image']}: {s['error']}" for s in skipped[:5])
    return DataError(f"no readable images among {len(skipped)}; first:\n  {listing}")


@dataclass
class Shard:
    """This process's share of an evaluation spread over ``world_size`` processes (torchrun ranks):
    each encodes a contiguous slice of the images / texts / classes, and ``gather(obj, error)``
    returns every rank's ``obj`` in rank order, or raises on every rank the error of the first rank
    that had one (``error``: this rank's, or None). Every rank then holds all features and computes
    the same metrics: no rank waits on another's whole pass. ``shared`` becomes true once a gather
    raised, on every rank alike (the caller need not hand that error over again)."""
    rank: int
    world_size: int
    gather: Callable[[Any, BaseException | None], list]
    shared: bool = False

    def slice(self, n: int) -> slice:
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def map(self, items: Sequence, encode: Callable[[Sequence, int], Any]) -> list:
        """``encode(my_slice, offset)`` on this rank's slice (None for an empty one); every rank's result."""
        part, local, error = self.slice(len(items)), None, None
        try:
            if part.stop > part.start:
                local = encode(items[part], part.start)
        except Exception as err:  # handed to every rank by the gather
            error = err
        try:
            return self.gather(local, error)
        except Exception:
            self.shared = True
            raise


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, images: Sequence, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(open_image(self.images[i])), None
        except UNREADABLE as err:
            return i, None, unreadable(i, self.images[i], err)


def _collate(items: list) -> tuple[torch.Tensor | None, list[dict]]:
    good = [x for _, x, _ in items if x is not None]
    return (torch.stack(good) if good else None), [bad for _, _, bad in items if bad is not None]


@torch.no_grad()
def encode_images(
    model,
    images: Sequence,
    transform: Callable,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    skipped: list | None = None,
    shard: Shard | None = None,
) -> torch.Tensor:
    """Unit-norm branch embeddings (N, H, D) of images given as paths / bytes / PIL images.

    With a ``skipped`` list, unreadable images are left out (the rows keep the order of the
    readable ones) and one record ``{"index", "image", "error"}`` per image is appended to it;
    without one, an unreadable image is a :class:`DataError` naming it. No readable image at
    all is always an error. ``shard``: this rank encodes its slice; every rank gets all rows."""
    if not len(images):
        raise ValueError("no images to encode")

    def encode(part, offset: int) -> tuple[list[torch.Tensor], list[dict]]:
        loader = torch.utils.data.DataLoader(_ImageList(part, transform), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=_collate)
        out, bad = [], []
        for batch, errors in tqdm(loader, desc="images", unit="batch", disable=not progress):
            bad.extend({**e, "index": e["index"] + offset} for e in errors)
            if batch is not None:
                out.append(model.encode_image(batch.to(device), normalize=True).float().cpu())
        return out, bad

    if shard is None:
        out, bad = encode(images, 0)
    else:
        parts = [p for p in shard.map(images, encode) if p is not None]
        out, bad = [f for p in parts for f in p[0]], [e for p in parts for e in p[1]]
    return _readable(out, bad, skipped)


def _readable(out: list[torch.Tensor], bad: list[dict], skipped: list | None) -> torch.Tensor:
    if not out:
        raise no_readable_images(bad)
    if bad and skipped is None:
        listing = "\n  ".join(f"{s['image']}: {s['error']}" for s in bad[:5])
        raise DataError(f"{len(bad)} unreadable images; first:\n  {listing}")
    if skipped is not None:
        skipped.extend(bad)
    return torch.cat(out)


def split_sentences(text: str) -> list[str]:
    parts = [p.strip() for p in _SENTENCE_END.split(text)]
    return [p for p in parts if p] or [text]


@dataclass
class TextEncoding:
    features: torch.Tensor  # (N, D), unit norm
    num_texts: int = 0
    num_truncated: int = 0  # texts (or, with split, sentences) cut at the context length
    num_split: int = 0  # texts encoded as a mean of sentence embeddings
    max_tokens: int = 0

    def summary(self) -> dict:
        return {
            "texts": self.num_texts,
            "truncated": self.num_truncated,
            "split_into_sentences": self.num_split,
            "max_tokens": self.max_tokens,
        }


@torch.no_grad()
def encode_texts(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    long_text: str = "truncate",
    context_length: int | None = None,
    progress: bool = False,
    shard: Shard | None = None,
) -> TextEncoding:
    """Unit-norm text embeddings (N, D) plus truncation statistics. ``shard``: this rank encodes its
    slice; every rank gets all rows and the counts of all texts."""
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    texts = list(texts)
    if shard is not None and texts:
        parts = [p for p in shard.map(texts, lambda part, _: encode_texts(
            model, tokenizer, part, batch_size, device, long_text, context_length, progress)) if p is not None]
        return TextEncoding(torch.cat([p.features for p in parts]), sum(p.num_texts for p in parts),
                            sum(p.num_truncated for p in parts), sum(p.num_split for p in parts),
                            max(p.max_tokens for p in parts))
    ctx = context_length or getattr(tokenizer, "context_length", None) or model.context_length
    lengths = token_lengths(tokenizer, texts)
    # pieces[i] -> owner text; a text that fits is its own single piece
    pieces, owner, num_split = [], [], 0
    for i, (text, n) in enumerate(zip(texts, lengths)):
        if long_text == "split" and n > ctx:
            parts = split_sentences(text)
            num_split += len(parts) > 1
        else:
            parts = [text]
        pieces.extend(parts)
        owner.extend([i] * len(parts))
    piece_lengths = lengths if len(pieces) == len(texts) else token_lengths(tokenizer, pieces)
    truncated = sum(n > ctx for n in piece_lengths)

    feats = []
    for s in tqdm(range(0, len(pieces), batch_size), desc="texts", unit="batch", disable=not progress):
        tokens = tokenizer(pieces[s : s + batch_size]).to(device)
        feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    if not feats:
        raise ValueError("no texts to encode")
    feats = torch.cat(feats)
    if len(pieces) != len(texts):  # mean of sentence embeddings, renormalised
        sums = torch.zeros(len(texts), feats.shape[1]).index_add_(0, torch.tensor(owner), feats)
        feats = F.normalize(sums, dim=-1)
    return TextEncoding(feats, len(texts), truncated, num_split, max(lengths, default=0))

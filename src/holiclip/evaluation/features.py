"""Batched feature extraction for evaluation: images -> (N, H, D), texts -> (N, D).

Texts longer than the model's context are either truncated (the default; the count is
reported) or, with ``long_text="split"``, split into sentences whose embeddings are averaged
and renormalised (a sentence that is itself too long is still truncated and counted).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data.loader import open_image, token_lengths

LONG_TEXT_MODES = ("truncate", "split")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, images: Sequence, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_image(self.images[i]))


@torch.no_grad()
def encode_images(
    model,
    images: Sequence,
    transform: Callable,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Unit-norm branch embeddings (N, H, D) of images given as paths / bytes / PIL images."""
    loader = torch.utils.data.DataLoader(_ImageList(images, transform), batch_size=batch_size, num_workers=num_workers)
    out = []
    for batch in tqdm(loader, desc="images", unit="batch", disable=not progress):
        out.append(model.encode_image(batch.to(device)).float().cpu())
    if not out:
        raise ValueError("no images to encode")
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
    stats: dict = field(default_factory=dict)

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
) -> TextEncoding:
    """Unit-norm text embeddings (N, D) plus truncation statistics."""
    if long_text not in LONG_TEXT_MODES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_MODES}, got {long_text!r}")
    texts = list(texts)
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
        feats.append(model.encode_text(tokens).float().cpu())
    if not feats:
        raise ValueError("no texts to encode")
    feats = torch.cat(feats)
    if len(pieces) != len(texts):  # mean of sentence embeddings, renormalised
        sums = torch.zeros(len(texts), feats.shape[1]).index_add_(0, torch.tensor(owner), feats)
        feats = F.normalize(sums, dim=-1)
    return TextEncoding(feats, len(texts), truncated, num_split, max(lengths, default=0))

"""Text diversity of a multi-text training set (paper Table 9): the mean cosine similarity
between the texts of the same image, per slot pair and overall, in a text encoder's space.

Overall = the mean over images of each image's mean pairwise similarity (over the slot pairs
it has); per pair = the mean over images having both slots. Lower means more diverse texts.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch

from ..data.readers import read_samples
from ..data.records import has_text
from .features import encode_texts


def slot_similarity(features: torch.Tensor, present: torch.Tensor, slots: Sequence[str]) -> dict:
    """features (N, M, D) unit-norm, present (N, M) bool -> ``{"pairs": {"a|b": mean cos},
    "pair_counts": {...}, "mean": overall, "images": n}`` (images with < 2 texts skipped)."""
    n, m, _ = features.shape
    present = present.bool()
    sim = torch.einsum("nad,nbd->nab", features.float(), features.float())  # (N, M, M)
    both = present[:, :, None] & present[:, None, :]
    pairs, counts = {}, {}
    for a, b in itertools.combinations(range(m), 2):
        k = int(both[:, a, b].sum())
        counts[f"{slots[a]}|{slots[b]}"] = k
        pairs[f"{slots[a]}|{slots[b]}"] = float(sim[both[:, a, b], a, b].mean()) if k else math.nan
    off_diag = both & ~torch.eye(m, dtype=torch.bool)[None]
    n_pairs = off_diag.sum((1, 2))
    keep = n_pairs > 0
    per_image = (sim * off_diag).sum((1, 2))[keep] / n_pairs[keep]
    return {
        "slots": list(slots),
        "pairs": pairs,
        "pair_counts": counts,
        "mean": float(per_image.mean()) if keep.any() else math.nan,
        "images": int(keep.sum()),
    }


def text_diversity(
    model,
    tokenizer,
    manifest,
    slots: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Reads a training JSONL / webdataset and measures :func:`slot_similarity` with the
    model's text tower. ``slots``: the slots to compare (all slots seen when None)."""
    rows = []
    for sample in read_samples(manifest):
        if limit is not None and len(rows) >= limit:
            break
        rows.append({k: v for k, v in sample.captions.items() if has_text(v)})
    if not rows:
        raise ValueError(f"{manifest}: no samples")
    if slots is None:
        slots = list(dict.fromkeys(k for r in rows for k in r))
    texts, where = [], []
    for i, r in enumerate(rows):
        for j, slot in enumerate(slots):
            if slot in r:
                texts.append(r[slot])
                where.append((i, j))
    if not texts:
        raise ValueError(f"{manifest}: none of the slots {list(slots)} has text")
    enc = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device, progress=progress)
    feats = torch.zeros(len(rows), len(slots), enc.features.shape[1])
    present = torch.zeros(len(rows), len(slots), dtype=torch.bool)
    idx = torch.tensor(where)
    feats[idx[:, 0], idx[:, 1]] = enc.features
    present[idx[:, 0], idx[:, 1]] = True
    out = slot_similarity(feats, present, slots)
    out["truncated"] = enc.num_truncated
    return out

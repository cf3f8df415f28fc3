"""Combining the H branch embeddings of an image into one (paper section 4, Tables 7-8)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import FUSION_MODES  # noqa: F401 (defined free of torch, for config checks)


def select_branches(
    image_features: torch.Tensor,
    branches: Sequence[str | int] | str | int | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Pick a subset of branches (by name or index) from (B, H, D) features."""
    if branches is None:
        return image_features
    if isinstance(branches, (str, int)):
        branches = [branches]
    index = []
    for b in branches:
        if not isinstance(b, str) and hasattr(b, "__index__"):  # int, numpy / torch integers
            b = b.__index__()
        if isinstance(b, int):
            if not -image_features.shape[1] <= b < image_features.shape[1]:
                raise IndexError(f"branch index {b} out of range for H={image_features.shape[1]}")
            index.append(b % image_features.shape[1])
        else:
            if names is None or b not in names:
                raise KeyError(f"unknown branch {b!r}; branches are {list(names or [])}")
            index.append(list(names).index(b))
    if not index:
        raise ValueError("empty branch subset")
    return image_features[:, index]


def fuse(
    image_features: torch.Tensor,
    mode: str = "mean",
    branches: Sequence[str | int] | str | int | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(B, H, D) unit-norm branch embeddings -> (B, D).

    mean         renormalised mean embedding (a unit vector); the default.
    mean-logits  the plain mean; its dot product with a text equals the research code's
                 mean of per-branch logits.
    max          element-wise max over branches (not renormalised).
    norm-max     element-wise max, renormalised.
    """
    if image_features.dim() == 2:
        image_features = image_features.unsqueeze(1)
    if image_features.dim() != 3:
        raise ValueError(f"expected (B, H, D) features, got shape {tuple(image_features.shape)}")
    x = select_branches(image_features, branches, names)
    if mode == "mean":
        return F.normalize(x.mean(dim=1), dim=-1)
    if mode == "mean-logits":
        return x.mean(dim=1)
    if mode == "max":
        return x.max(dim=1).values
    if mode == "norm-max":
        return F.normalize(x.max(dim=1).values, dim=-1)
    raise ValueError(f"unknown fusion mode {mode!r}; choose from {FUSION_MODES}")

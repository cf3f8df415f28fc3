"""Helpers shared by the core tests (a plain module: `conftest` names collide across folders)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Registry configs the model tests run on (timm-style parametrisation); ViT-B ones are too slow.
SMALL_CONFIGS = ("holi-tiny", "holi-small")


def unit(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Random L2-normalised features (last dim)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)

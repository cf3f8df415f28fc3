"""Feature tensors for the loss and fusion tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unit(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Random L2-normalised features (last dim)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)

"""Shared helpers for the core tests: small, CPU-only, deterministic."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import holiclip  # noqa: F401  (installs the torchvision shim before open_clip is imported)

# Registry configs the model tests run on (timm-style parametrisation); ViT-B ones are too slow.
SMALL_CONFIGS = ("holi-tiny", "holi-small")


def unit(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Random L2-normalised features (last dim)."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


@pytest.fixture
def single_thread():
    """Seeded, one torch thread (the test box is shared; tiny models gain nothing from threads)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Shared helpers for the core tests: small, CPU-only, deterministic."""
from __future__ import annotations

import pytest
import torch

import holiclip  # noqa: F401  (installs the torchvision shim before open_clip is imported)


@pytest.fixture(autouse=True, scope="session")
def console_messages():
    """holiclip's log messages on stdout / stderr as the command line shows them (tests read them with capsys)."""
    from holiclip import console

    console.setup()


@pytest.fixture
def single_thread():
    """Seeded, one torch thread (the test box is shared; tiny models gain nothing from threads)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""The Hugging Face Hub, offline: a local cache laid out as hf_hub_download leaves it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import constants


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: hf_hub_download answers from it or fails, never the network."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def publish(cache: Path, repo_id: str, folder: Path, revision: str = "main", commit: str = "a" * 40) -> None:
    """Lays files out as hf_hub_download caches them: refs/<revision> -> snapshots/<commit>/<file>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)

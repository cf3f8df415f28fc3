"""The installed emoji sources and one tiny build, shared by the data tests.

Uses the installed sources (no network): a missing source makes these tests fail with the
exact install command (run scripts/install_emoji_sources.sh), never skip.
"""
from __future__ import annotations

import pytest

from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S

TINY = B.preset("tiny")


@pytest.fixture(scope="session")
def sources():
    # the installed sources: tests never download; a missing source fails with the install commands.
    return S.require_sources(styles=TINY.heldout_styles)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("emoji") / "tiny"
    meta = B.build(root, TINY, sources=sources)
    return root, meta

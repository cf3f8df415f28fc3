"""Fixtures shared by every test folder: small, CPU-only, deterministic."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import holiclip  # (also installs the torchvision shim before open_clip is imported)


@pytest.fixture(autouse=True, scope="session")
def cache_root_in_a_temporary_folder(tmp_path_factory):
    """What the tests build, cache or download goes to a temporary cache root, never the user's
    ~/.cache; the emoji sources stay where `make emoji-sources` installed them."""
    from holiclip.benchmarks.emoji.data.sources import default_cache_dir

    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOLICLIP_EMOJI_SOURCES", str(default_cache_dir()))  # resolved before the root moves
        env.setenv("HOLICLIP_CACHE", str(tmp_path_factory.mktemp("holiclip-cache")))
        yield


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


# -- a random-weight holi-tiny model with three named branches, saved once --------------------------
BRANCHES = ("web", "detail", "main")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = holiclip.create_model("holi-tiny", branches=BRANCHES)
    return holiclip.save_model(model, tmp_path_factory.mktemp("ckpt") / "holi-tiny")


@pytest.fixture(scope="session")
def eval_model(tiny_checkpoint):
    from holiclip.evaluation import load_eval_model

    return load_eval_model(tiny_checkpoint)


def _solid_image(path, color, size=(40, 48)):
    Image.fromarray(np.full((*size, 3), color, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def solid_image():
    """solid_image(path, (r, g, b), size=(h, w)) writes a one-colour image and returns its path."""
    return _solid_image

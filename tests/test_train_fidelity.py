"""Training as the paper trains: augmentation, the same resize for cached images and evaluation,
the loss in fp32 outside autocast."""
from __future__ import annotations

import json

import torch
from PIL import Image

from holiclip.data.loader import open_image
from holiclip.models.registry import get_transforms
from holiclip.training.trainer import Trainer

from tests.helpers.datasets import draw, make_dataset
from tests.helpers.training import cfg_for


def _wide_dataset(tmp_path, n=8):
    """Non-square images (96 x 64): a squash and a centre crop give different pixels."""
    path = make_dataset(tmp_path, n=n)
    for i in range(n):
        im = draw(i, 96)
        im.crop((0, 16, 96, 80)).save(tmp_path / "img" / f"{i}.png")
    return path


def _trainer(tmp_path, data, *extra) -> Trainer:
    t = Trainer(cfg_for(tmp_path, data, tmp_path / "run", *extra))
    t._build()
    return t


def test_augmentation_is_on_by_default_and_seeded_per_sample(tmp_path):
    # square images: on 3:2 ones every RandomResizedCrop draw (scale >= 0.9, ratio <= 4/3) is out of
    # bounds and torchvision falls back to a fixed centre crop
    data = make_dataset(tmp_path, n=8)
    for cached in ("false", "true"):
        t = _trainer(tmp_path, data, f"data.cache_images={cached}")
        assert t.cfg.data.augment
        first = t.dataset[3]["image"]
        assert torch.equal(first, t.dataset[3]["image"])  # same (seed, epoch, sample): same crop
        t.dataset.set_epoch(1)
        assert not torch.allclose(first, t.dataset[3]["image"])  # a new crop each epoch
        state = torch.get_rng_state()
        t.dataset[4]
        assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is not consumed


def test_no_augmentation_cached_and_uncached_resize_as_evaluation(tmp_path):
    data = _wide_dataset(tmp_path)
    plain = _trainer(tmp_path, data, "data.augment=false")
    cached = _trainer(tmp_path, data, "data.augment=false", "data.cache_images=true")
    evaluation = get_transforms(plain.model, is_train=False)  # open_clip's: resize shortest side + centre crop
    row = json.loads(data.read_text().splitlines()[2])
    want = evaluation(open_image(data.parent / row["image"]))
    torch.testing.assert_close(plain.dataset[2]["image"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.dataset[2]["image"], want, rtol=0, atol=1e-5)
    plain.dataset.set_epoch(3)
    torch.testing.assert_close(plain.dataset[2]["image"], want, rtol=0, atol=1e-6)


def test_loss_runs_in_fp32_outside_autocast(tmp_path):
    data = make_dataset(tmp_path, n=8)
    t = _trainer(tmp_path, data, "run.precision=bf16", "data.cache_images=true")
    seen = {}
    inner = t.loss_fn.forward

    def spy(image_features, text_features, logit_scale, output_dict=False):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["dtypes"] = {image_features.dtype, text_features.dtype}
        return inner(image_features, text_features, logit_scale, output_dict=output_dict)

    t.loss_fn.forward = spy
    batch = t.collate([t.dataset[i] for i in range(4)])
    losses = t._forward_loss(batch)
    assert seen == {"autocast": False, "dtypes": {torch.float32}}
    assert all(v.dtype == torch.float32 for v in losses.values())

"""The linear probe of dense features: patch targets, a probe that must find a planted answer,
and the token streams it reads (shared for Psi_CLS, one per branch for Psi_MLP)."""
from __future__ import annotations

import pytest
import torch

import holiclip
from holiclip.evaluation.dense_probe import linear_probe, patch_targets, patch_token_streams

GRID, PATCH, CLASSES, WIDTH = (4, 4), 4, 3, 16


def _planted(n: int, seed: int, informative: bool = True, uniform: bool = False):
    """Patch-aligned masks (one class per patch, -1 = background; ``uniform``: one class per image)
    and tokens that carry each patch's class in a fixed direction (or, uninformative, pure noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, CLASSES, (n, 1, 1) if uniform else (n, *GRID), generator=g).expand(n, *GRID)
    masks = labels.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    directions = torch.randn(CLASSES + 1, WIDTH, generator=torch.Generator().manual_seed(99))
    tokens = 0.3 * torch.randn(n, GRID[0] * GRID[1], WIDTH, generator=g)
    if informative:
        cls = labels.flatten(1).clone()
        cls[cls < 0] = CLASSES
        tokens += directions[cls]
    return tokens, masks


def test_patch_targets_are_each_patchs_class_fractions():
    mask = torch.tensor([[[0, 0, 2, 2], [1, -1, 2, 2]]])  # two 2x2 patches
    t = patch_targets(mask, (1, 2), num_classes=3)
    assert t.shape == (1, 2, 4)
    assert torch.allclose(t[0, 0], torch.tensor([0.5, 0.25, 0.0, 0.25]))  # background is the last class
    assert torch.allclose(t[0, 1], torch.tensor([0.0, 0.0, 1.0, 0.0]))


def test_patch_targets_refuse_bad_masks():
    with pytest.raises(ValueError, match="mask value 7 is not a class"):
        patch_targets(torch.full((1, 4, 4), 7), (2, 2), num_classes=3)
    with pytest.raises(ValueError, match="not a multiple of the patch grid"):
        patch_targets(torch.zeros(1, 5, 4, dtype=torch.long), (2, 2), num_classes=3)


@pytest.mark.parametrize("background, names", [("ignore", {"a", "b", "c"}), ("class", {"a", "b", "c", "background"})])
def test_probe_finds_a_planted_answer_and_not_one_that_is_absent(background, names):
    train_tok, train_masks = _planted(60, seed=0)
    # test scenes of one class each: no class border for the bilinear upsampling to blur
    test_tok, test_masks = _planted(30, seed=1, uniform=True)
    res = linear_probe(train_tok, train_masks, test_tok, test_masks, CLASSES, GRID, classnames=["a", "b", "c"],
                       background=background)
    assert res["mIoU"] == 1.0 and res["pixel_accuracy"] == 1.0
    assert set(res["per_class_iou"]) == names
    mixed_tok, mixed_masks = _planted(30, seed=1)  # with borders: nearly every pixel still right
    mixed = linear_probe(train_tok, train_masks, mixed_tok, mixed_masks, CLASSES, GRID, background=background)
    assert mixed["pixel_accuracy"] > 0.9
    noise_tok, _ = _planted(60, seed=0, informative=False)
    test_noise, test_masks = _planted(30, seed=1, informative=False)
    chance = linear_probe(noise_tok, train_masks, test_noise, test_masks, CLASSES, GRID, background=background)
    assert chance["mIoU"] < 0.45


def test_ignored_background_is_neither_learnt_nor_scored():
    train_tok, train_masks = _planted(60, seed=0)
    test_tok, test_masks = _planted(30, seed=1, uniform=True)
    test_tok = test_tok.clone()
    test_tok[test_masks[:, ::PATCH, ::PATCH].flatten(1) < 0] = 1e3  # nonsense on background patches: not scored
    res = linear_probe(train_tok, train_masks, test_tok, test_masks, CLASSES, GRID)
    assert res["mIoU"] == 1.0
    with pytest.raises(ValueError, match="background must be"):
        linear_probe(train_tok, train_masks, test_tok, test_masks, CLASSES, GRID, background="drop")


def test_probe_is_seeded():
    tok, masks = _planted(50, seed=2)
    test_tok, test_masks = _planted(20, seed=3)
    runs = [linear_probe(tok, masks, test_tok, test_masks, CLASSES, GRID, max_train=20, seed=s)["mIoU"]
            for s in (0, 0, 1)]
    assert runs[0] == runs[1]


def test_probe_refuses_tokens_and_masks_of_different_lengths():
    tok, masks = _planted(10, seed=0)
    with pytest.raises(ValueError, match="tokens and masks differ"):
        linear_probe(tok, masks[:5], tok, masks, CLASSES, GRID)


@pytest.mark.parametrize("encoder, streams", [("cls", 1), ("mlp", 2)])
def test_token_streams_shared_for_cls_and_per_branch_for_mlp(encoder, streams):
    torch.manual_seed(0)
    model = holiclip.create_model("holi-tiny", encoder=encoder, branches=("a", "b"), pretrained=None,
                                  **({"mlp_layers": 1} if encoder == "mlp" else {})).eval()
    size = model.image_size if isinstance(model.image_size, int) else model.image_size[0]
    x = torch.randn(3, 3, size, size)
    tok = patch_token_streams(model, x, batch_size=2)
    gh, gw = model.visual.grid_size
    assert tok.shape[:3] == (streams, 3, gh * gw)
    if streams == 2:  # each branch's own forked block: different tokens
        assert not torch.allclose(tok[0], tok[1])

"""Combining the H branch embeddings (paper section 4): each mode against its formula."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from holiclip import FUSION_MODES, fuse
from holiclip.models.fusion import select_branches

from tests.helpers.tensors import unit

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ("web", "detail", "background", "main", "style")


@pytest.fixture
def feats():
    return unit(7, 5, 16, seed=3)


def test_modes_listed():
    assert set(FUSION_MODES) == {"mean", "mean-logits", "max", "norm-max"}


def test_mean_is_renormalised_mean(feats):
    out = fuse(feats, "mean")
    expected = torch.stack([sum(feats[b, h] for h in range(5)) for b in range(7)])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(7, dtype=feats.dtype))
    assert torch.equal(fuse(feats), out)  # the default


def test_mean_logits_equals_mean_of_branch_logits(feats):
    text = unit(11, 16, seed=4)
    fused_logits = fuse(feats, "mean-logits") @ text.T
    research = sum(feats[:, h] @ text.T for h in range(5)) / 5  # the research code
    torch.testing.assert_close(fused_logits, research)
    # and that is not what the renormalised mean gives (norm < 1 for distinct branches)
    assert not torch.allclose(fuse(feats, "mean") @ text.T, research)


def test_max_and_norm_max(feats):
    expected = torch.stack([
        torch.tensor([max(float(feats[b, h, d]) for h in range(5)) for d in range(16)], dtype=feats.dtype)
        for b in range(7)
    ])
    torch.testing.assert_close(fuse(feats, "max"), expected)
    torch.testing.assert_close(fuse(feats, "norm-max"), expected / expected.norm(dim=-1, keepdim=True))
    assert not torch.allclose(fuse(feats, "max").norm(dim=-1), torch.ones(7, dtype=feats.dtype))


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_single_branch_is_identity(feats, mode):
    torch.testing.assert_close(fuse(feats[:, 2:3], mode), feats[:, 2])
    torch.testing.assert_close(fuse(feats[:, 2], mode), feats[:, 2])  # (B, D) accepted as H = 1


@pytest.mark.parametrize("mode", FUSION_MODES)
def test_subset_by_names_and_indices(feats, mode):
    by_name = fuse(feats, mode, branches=["main", "detail"], names=NAMES)
    by_index = fuse(feats, mode, branches=[3, 1])
    by_negative = fuse(feats, mode, branches=[-2, -4])
    manual = fuse(torch.stack([feats[:, 3], feats[:, 1]], dim=1), mode)
    for out in (by_name, by_index, by_negative):
        torch.testing.assert_close(out, manual)
    if mode != "max":  # a subset really differs from all branches
        assert not torch.allclose(by_name, fuse(feats, mode))


def test_select_branches_rows(feats):
    assert torch.equal(select_branches(feats, "background", NAMES), feats[:, [2]])
    assert torch.equal(select_branches(feats, 4), feats[:, [4]])
    assert torch.equal(select_branches(feats, ["style", 0, "main"], NAMES), feats[:, [4, 0, 3]])
    assert select_branches(feats, None) is feats


def test_unknown_branch_name_lists_branches(feats):
    with pytest.raises(KeyError) as err:
        fuse(feats, branches=["nouns"], names=NAMES)
    message = str(err.value)
    assert "nouns" in message and all(n in message for n in NAMES)
    with pytest.raises(KeyError):  # names needed to select by name
        fuse(feats, branches="main")


def test_bad_index_mode_shape_and_empty(feats):
    with pytest.raises(IndexError):
        fuse(feats, branches=[5])
    with pytest.raises(IndexError):
        fuse(feats, branches=[-6])
    with pytest.raises(ValueError, match="mode"):
        fuse(feats, "median")
    with pytest.raises(ValueError, match="shape"):
        fuse(feats[None])
    with pytest.raises(ValueError, match="empty"):
        fuse(feats, branches=[])


def test_fused_gradient_reaches_selected_branches_only(feats):
    x = feats.clone().requires_grad_(True)
    fuse(x, "mean", branches=["main"], names=NAMES).sum().backward()
    assert x.grad[:, 3].abs().sum() > 0
    assert x.grad[:, [0, 1, 2, 4]].abs().sum() == 0


def test_mean_ranking_differs_from_mean_logits_only_by_image_norm(feats):
    """Text-to-image ranking can differ between mean and mean-logits: per-image norms differ."""
    norms = F.normalize(feats.mean(1), dim=-1).norm(dim=-1)
    raw = feats.mean(1).norm(dim=-1)
    torch.testing.assert_close(fuse(feats, "mean") * raw[:, None], fuse(feats, "mean-logits"))
    assert torch.allclose(norms, torch.ones_like(norms)) and raw.std() > 0


def test_integer_like_branch_indices():
    import numpy as np

    x = unit(3, 4, 8)
    for idx in (np.int64(2), torch.tensor(2)):
        torch.testing.assert_close(fuse(x, "mean-logits", branches=[idx]), x[:, 2])

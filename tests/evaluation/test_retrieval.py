"""recall_at_k: hand-made cases with known answers, ties, groups, chunking, fusion, branches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import holiclip
from holiclip.evaluation import groups_from_identical_captions, recall_at_k, retrieval_ranks


def e(*idx, d=4):
    """Rows of one-hot vectors."""
    return torch.eye(d)[list(idx)]


def test_known_recalls_several_captions_per_image():
    images = e(0, 1, 2)
    # image 0: captions [x0, x1]; image 1: [x1, x3]; image 2: [x2]
    texts = torch.tensor([[1.0, 0, 0, 0], [0.0, 1, 0, 0], [0.0, 1, 0, 0], [0.0, 0, 0, 1], [0.0, 0.6, 0.8, 0]])
    t2i = [0, 0, 1, 1, 2]
    r = recall_at_k(images, texts, t2i, ks=(1, 2, 3))
    # t2i: text0 -> img0 rank 0 (hit@1). text1 (x1, own img0): img1 scores 1 > img0's 0 -> rank 2
    # (pessimistic ties with img2's 0). text2 (x1, own img1): rank 0. text3 (x3, own img1): all
    # score 0 -> 2 wrong ties ahead -> rank 2. text4 (own img2 scores 0.8, img1 0.6): rank 0.
    assert r["t2i_R@1"] == pytest.approx(3 / 5)
    assert r["t2i_R@2"] == pytest.approx(3 / 5)
    assert r["t2i_R@3"] == pytest.approx(1.0)
    # i2t: img0 best own text0 (1.0), no wrong text >= 1 -> hit@1. img1 best own text2 (1.0);
    # text1 (img0's caption) also scores 1.0 -> tie counted against -> rank 1.
    # img2 own text4 scores 0.8, nothing else > 0 -> rank 0.
    assert r["i2t_R@1"] == pytest.approx(2 / 3)
    assert r["i2t_R@2"] == pytest.approx(1.0)


def test_tie_rules():
    images = e(0, 0, 0)  # three identical images
    texts = e(0, 0, 0)
    i2t, t2i = retrieval_ranks(images, texts, [0, 1, 2], ties="pessimistic")
    assert i2t.tolist() == [2, 2, 2] and t2i.tolist() == [2, 2, 2]
    i2t, t2i = retrieval_ranks(images, texts, [0, 1, 2], ties="optimistic")
    assert i2t.tolist() == [0, 0, 0] and t2i.tolist() == [0, 0, 0]
    assert recall_at_k(images, texts, [0, 1, 2], ks=(1,))["t2i_R@1"] == 0.0
    with pytest.raises(ValueError, match="ties"):
        retrieval_ranks(images, texts, [0, 1, 2], ties="random")


def test_image_groups_count_equivalent_images_as_hits():
    images = e(0, 0, 1)
    texts = e(0, 0, 1)
    plain = recall_at_k(images, texts, [0, 1, 2], ks=(1,))
    assert plain["t2i_R@1"] == pytest.approx(1 / 3) and plain["i2t_R@1"] == pytest.approx(1 / 3)
    groups = groups_from_identical_captions(["a dog", "A  dog ", "a cat"], [0, 1, 2])
    assert groups.tolist() == [0, 0, 2]
    grouped = recall_at_k(images, texts, [0, 1, 2], ks=(1,), image_groups=groups)
    assert grouped["t2i_R@1"] == 1.0 and grouped["i2t_R@1"] == 1.0


def test_identical_caption_groups_are_transitive():
    texts = ["a", "b", "b", "c", "c", "d"]
    groups = groups_from_identical_captions(texts, [0, 0, 1, 1, 2, 3])
    assert groups.tolist() == [0, 0, 0, 3]


def _topk_reference(images, texts, t2i, ks):
    """The usual dense COCO implementation: full similarity matrix + torch.topk membership
    (images without any text left out of image-to-text)."""
    t2i = torch.as_tensor(t2i)
    sim = images @ texts.T
    has_text = torch.zeros(len(images), dtype=torch.bool)
    has_text[t2i] = True
    out = {}
    for k in ks:
        top_txt = sim.topk(k, dim=1).indices  # (N_img, k)
        i2t_hit = (t2i[top_txt] == torch.arange(len(images))[:, None]).any(1)[has_text]
        top_img = sim.T.topk(k, dim=1).indices  # (N_txt, k)
        t2i_hit = (top_img == t2i[:, None]).any(1)
        out[f"i2t_R@{k}"] = i2t_hit.double().mean().item()
        out[f"t2i_R@{k}"] = t2i_hit.double().mean().item()
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_dense_on_random_data(chunk):
    """More texts than images: the pass streams over blocks of texts."""
    g = torch.Generator().manual_seed(chunk)
    n_img, d = 120, 16
    images = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    t2i = torch.arange(n_img).repeat_interleave(5)
    # texts near their image so recall is far from both 0 and 1
    texts = F.normalize(images[t2i] + 1.5 * torch.randn(len(t2i), d, generator=g), dim=-1)
    ks = (1, 5, 10)
    got = recall_at_k(images, texts, t2i, ks=ks, chunk_size=chunk)
    want = _topk_reference(images, texts, t2i, ks)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.05 < got["t2i_R@5"] < 0.95


@pytest.mark.parametrize("chunk", [1, 13, None])
def test_chunked_equals_dense_more_images_than_texts(chunk):
    """More images than texts (some images without any): the pass streams over images."""
    g = torch.Generator().manual_seed(11)
    images = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    t2i = torch.randint(0, 300, (150,), generator=g)
    texts = F.normalize(images[t2i] + 1.2 * torch.randn(150, 16, generator=g), dim=-1)
    got = recall_at_k(images, texts, t2i, chunk_size=chunk)
    assert got == pytest.approx(_topk_reference(images, texts, t2i, (1, 5, 10)), abs=1e-12)
    assert 0.05 < got["i2t_R@5"] < 0.95


def test_chunking_does_not_change_grouped_ranks():
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(150, 8, generator=g), dim=-1)
    t2i = torch.randint(0, 50, (150,), generator=g)
    groups = torch.randint(0, 20, (50,), generator=g)
    full = retrieval_ranks(images, texts, t2i, image_groups=groups, chunk_size=1000)
    for chunk in (1, 3, 17):
        parts = retrieval_ranks(images, texts, t2i, image_groups=groups, chunk_size=chunk)
        assert torch.equal(parts[0], full[0]) and torch.equal(parts[1], full[1])


def test_half_precision_inputs_are_ranked_in_float32():
    g = torch.Generator().manual_seed(4)
    images = F.normalize(torch.randn(60, 16, generator=g), dim=-1).half()
    texts = F.normalize(torch.randn(180, 16, generator=g), dim=-1).half()
    t2i = torch.arange(60).repeat_interleave(3)
    timings = {}
    half = recall_at_k(images, texts, t2i, chunk_size=7, timings=timings)
    assert half == recall_at_k(images.float(), texts.float(), t2i)
    assert set(timings) == {"setup_s", "chunks_s"}


def test_images_without_texts_leave_the_i2t_average():
    images = e(0, 1, 2)
    texts = e(0, 1)
    i2t, _ = retrieval_ranks(images, texts, [0, 1])
    assert i2t.tolist() == [0, 0, -1]
    assert recall_at_k(images, texts, [0, 1], ks=(1,))["i2t_R@1"] == 1.0


@pytest.mark.parametrize("mode", ["mean", "mean-logits", "max", "norm-max"])
def test_fusion_modes_follow_their_formulas(mode):
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(40, 3, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(80, 8, generator=g), dim=-1)
    t2i = torch.arange(40).repeat_interleave(2)
    formula = {
        "mean": F.normalize(feats.mean(1), dim=-1),
        "mean-logits": feats.mean(1),
        "max": feats.max(1).values,
        "norm-max": F.normalize(feats.max(1).values, dim=-1),
    }[mode]
    got = recall_at_k(feats, texts, t2i, fusion=mode)
    assert got == recall_at_k(formula, texts, t2i)


def test_mean_logits_equals_mean_of_branch_logits():
    """The research code's fusion: average the H logit matrices."""
    g = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(30, 4, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    mean_logits = torch.einsum("bhd,nd->bn", feats, texts) / 4
    fused = holiclip.fuse(feats, "mean-logits")
    assert torch.allclose(fused @ texts.T, mean_logits, atol=1e-6)


def test_branch_subset_selects_the_named_branches():
    names = ("web", "detail", "main")
    g = torch.Generator().manual_seed(5)
    texts = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    noise = F.normalize(torch.randn(20, 3, 8, generator=g), dim=-1)
    feats = noise.clone()
    feats[:, 2] = texts  # only "main" matches the texts exactly
    t2i = torch.arange(20)
    assert recall_at_k(feats, texts, t2i, ks=(1,), branches=["main"], names=names)["t2i_R@1"] == 1.0
    assert recall_at_k(feats, texts, t2i, ks=(1,), branches=[2])["i2t_R@1"] == 1.0
    web = recall_at_k(feats, texts, t2i, ks=(1,), branches=["web"], names=names)
    assert web == recall_at_k(noise[:, 0], texts, t2i, ks=(1,))
    pair = recall_at_k(feats, texts, t2i, branches=["web", "detail"], names=names)
    assert pair == recall_at_k(F.normalize(noise[:, :2].mean(1), dim=-1), texts, t2i)
    with pytest.raises(KeyError, match="unknown branch"):
        recall_at_k(feats, texts, t2i, branches=["style"], names=names)


def test_bad_inputs_are_named():
    images, texts = e(0, 1), e(0, 1)
    with pytest.raises(ValueError, match=r"text_to_image\[1\] = 5"):
        recall_at_k(images, texts, [0, 5])
    with pytest.raises(ValueError, match="2 entries but there are 3"):
        recall_at_k(images, e(0, 1, 2), [0, 1])
    with pytest.raises(ValueError, match="feature sizes differ"):
        recall_at_k(images, torch.eye(3)[:2], [0, 1])

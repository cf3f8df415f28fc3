"""The clip-benchmark tie rule of recall_at_k against CLIP_benchmark's own recall code (its
``zeroshot_retrieval.recall_at_k`` over ``batchify``, as its ``evaluate`` calls them), and the
dense rank helper against the streamed ranks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_retrieval as cbr

from holiclip.evaluation.retrieval import dense_ranks, recall_at_k, retrieval_ranks

KS = (1, 2, 5, 10)


def _clip_benchmark_recall(images, texts, t2i, ks, batch_size):
    """CLIP_benchmark's metric part of ``zeroshot_retrieval.evaluate``, line for line."""
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), t2i] = True
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = (cbr.batchify(cbr.recall_at_k, scores, positive_pairs, batch_size, "cpu", k=k) > 0).float().mean().item()
        out[f"i2t_R@{k}"] = (cbr.batchify(cbr.recall_at_k, scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0).float().mean().item()
    return out


def _tied_data(seed: int, n_img: int = 30, per_image: int = 3, d: int = 8):
    """Alt-text-like data: texts drawn from a few distinct captions (exact duplicates across
    images) and some duplicated images, so correct items tie exactly with wrong ones."""
    g = torch.Generator().manual_seed(seed)
    captions = F.normalize(torch.randn(7, d, generator=g), dim=-1)
    texts = captions[torch.randint(0, 7, (n_img * per_image,), generator=g)]
    images = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    images[1::4] = images[0::4][: images[1::4].shape[0]]  # every fourth image has a twin
    t2i = torch.arange(n_img).repeat_interleave(per_image)
    return images, texts, t2i


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [None, 7])
def test_clip_benchmark_rule_equals_clip_benchmark_on_tied_scores(seed, chunk):
    images, texts, t2i = _tied_data(seed)
    ours = recall_at_k(images, texts, t2i, KS, ties="clip-benchmark", chunk_size=chunk)
    theirs = _clip_benchmark_recall(images, texts, t2i, KS, batch_size=16)
    assert ours == pytest.approx(theirs, abs=1e-6)
    pessimistic = recall_at_k(images, texts, t2i, KS)
    assert pessimistic != pytest.approx(theirs, abs=1e-6)  # the ties are real: the rules disagree


def test_the_rules_differ_where_a_caption_repeats():
    """Three images sharing one caption: pessimistic counts the two tied wrong texts ahead of the
    correct one (no image hits at 1 or 2); topk's order puts some correct text first."""
    images = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    texts = torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1)
    pess = recall_at_k(images, texts, [0, 1, 2], (1, 3))
    cb = recall_at_k(images, texts, [0, 1, 2], (1, 3), ties="clip-benchmark")
    assert pess["i2t_R@1"] == 0.0 and pess["i2t_R@3"] == 1.0
    assert cb["i2t_R@1"] == pytest.approx(_clip_benchmark_recall(images, texts, [0, 1, 2], (1,), 2)["i2t_R@1"])
    assert cb["i2t_R@1"] > 0.0 and cb["t2i_R@1"] == pess["t2i_R@1"]  # images are distinct: no t2i ties


@pytest.mark.parametrize("seed", range(3))
def test_without_ties_every_rule_agrees_with_clip_benchmark(seed):
    g = torch.Generator().manual_seed(seed)
    images, texts = F.normalize(torch.randn(25, 16, generator=g), dim=-1), F.normalize(torch.randn(60, 16, generator=g), dim=-1)
    t2i = torch.randint(0, 25, (60,), generator=g)
    t2i[:25] = torch.arange(25)  # every image has a text
    theirs = _clip_benchmark_recall(images, texts, t2i, KS, batch_size=8)
    for ties in ("pessimistic", "optimistic", "clip-benchmark"):
        assert recall_at_k(images, texts, t2i, KS, ties=ties) == pytest.approx(theirs, abs=1e-6), ties


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_dense_ranks_equal_streamed_ranks(ties):
    images, texts, t2i = _tied_data(3)
    i2t_rank, t2i_rank = retrieval_ranks(images, texts, t2i, ties=ties)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(t2i)), t2i] = True
    assert torch.equal(dense_ranks(scores, positive, ties), t2i_rank)
    assert torch.equal(dense_ranks(scores.T, positive.T, ties), i2t_rank)


def test_rank_functions_name_the_rule_they_cannot_take():
    images, texts, t2i = _tied_data(0, n_img=4)
    with pytest.raises(ValueError, match="recall_at_k takes it"):
        retrieval_ranks(images, texts, t2i, ties="clip-benchmark")
    with pytest.raises(ValueError, match="ties must be one of"):
        recall_at_k(images, texts, t2i, ties="random")

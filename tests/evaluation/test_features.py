"""Text encoding: truncation counting and sentence-split averaging."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from holiclip.evaluation.features import encode_images, encode_texts, split_sentences, token_lengths


def test_split_sentences():
    assert split_sentences("A dog. A cat!  Grass?\nSky") == ["A dog.", "A cat!", "Grass?", "Sky"]
    assert split_sentences("no end") == ["no end"]


def test_truncation_is_counted_and_split_averages(eval_model):
    m, tok = eval_model.model, eval_model.tokenizer
    ctx = tok.context_length  # 32 for holi-tiny
    s1 = "a red square on a green field with some trees and a blue sky above it."
    s2 = "the second sentence talks about a small yellow circle near the bottom edge."
    long = f"{s1} {s2}"
    assert token_lengths(tok, [long])[0] > ctx >= max(token_lengths(tok, [s1, s2]))
    short = "a cat"
    trunc = encode_texts(m, tok, [short, long], long_text="truncate")
    assert trunc.num_truncated == 1 and trunc.num_split == 0 and trunc.max_tokens > ctx
    split = encode_texts(m, tok, [short, long], long_text="split")
    assert split.num_truncated == 0 and split.num_split == 1
    with torch.no_grad():
        parts = m.encode_text(tok([s1, s2]), normalize=True)
        whole_short = m.encode_text(tok([short]), normalize=True)
    assert torch.allclose(split.features[1], F.normalize(parts.mean(0), dim=-1), atol=1e-5)
    assert torch.allclose(split.features[0], whole_short[0], atol=1e-5)  # fitting texts are left alone
    assert torch.allclose(trunc.features[0], split.features[0], atol=1e-6)


def test_encode_images_shape(eval_model, tmp_path, solid_image):
    paths = [solid_image(tmp_path / f"{i}.png", (40 * i, 0, 0)) for i in range(3)]
    feats = encode_images(eval_model.model, paths, eval_model.transform, batch_size=2)
    assert feats.shape == (3, 3, 64)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3, 3), atol=1e-5)

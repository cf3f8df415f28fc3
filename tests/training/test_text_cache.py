"""The text-feature cache of a locked text trunk: grows with new texts, keyed by trunk and tokenizer."""
from __future__ import annotations

import torch

from holiclip.models.registry import create_model, get_tokenizer
from holiclip.training.text_cache import build_text_cache, cache_path


def test_text_cache_grows_and_matches_the_trunk(tmp_path):
    model = create_model("holi-small-minilm", branches=["global"], lock_text=True).eval()
    tok = get_tokenizer("holi-small-minilm")
    first, idx1 = build_text_cache(model, tok, ["a red apple", "a dog"], tmp_path, "cpu", progress=False)
    more, idx2 = build_text_cache(model, tok, ["a dog", "two cats on a mat"], tmp_path, "cpu", progress=False)
    assert first.shape[0] == 2 and more.shape[0] == 3  # only the new text was added
    assert idx2["a red apple"] == idx1["a red apple"]
    with torch.no_grad():
        want = model.text_trunk(tok(["two cats on a mat", "a red apple"]))
    torch.testing.assert_close(more[[idx2["two cats on a mat"], idx2["a red apple"]]], want, rtol=1e-4, atol=1e-5)
    assert cache_path(tmp_path, model, tok).exists()


def test_text_cache_never_serves_another_trunks_features(tmp_path):
    """Other trunk weights (model.pretrained=, a fine-tuned trunk) or another tokenizer get their own cache."""
    texts = ["a red apple", "a dog on a sofa"]
    model = create_model("holi-small-minilm", branches=["global"], lock_text=True).eval()
    tok = get_tokenizer("holi-small-minilm")
    build_text_cache(model, tok, texts, tmp_path, "cpu", progress=False)
    with torch.no_grad():  # "other text weights": perturb the trunk
        for p in model.clip.text.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        want = model.text_trunk(tok(texts))
    got, index = build_text_cache(model, tok, texts, tmp_path, "cpu", progress=False)
    torch.testing.assert_close(got[[index[t] for t in texts]], want, rtol=1e-4, atol=1e-5)
    assert len(list(tmp_path.glob("text_trunk_*.safetensors"))) == 2
    shorter = get_tokenizer("holi-small-minilm", context_length=16)
    assert cache_path(tmp_path, model, shorter) != cache_path(tmp_path, model, tok)

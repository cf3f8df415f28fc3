"""Tokenisation for training: one encode per caption gives open_clip's ids and the untruncated
length (for the truncation count), equal to what ``tokenizer(texts)`` and a second counting pass
gave, on many captions: long ones cut at every boundary, unicode, HTML entities, odd whitespace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from holiclip.data.loader import Collate
from holiclip.data.tokens import token_lengths, tokenize
from holiclip.models.registry import get_tokenizer

ODD = [
    "", " ", "a", "Café &amp; bar", "&amp;amp;amp; nested entities &lt;b&gt;", "A  dog\n\tin   the\r\npark",
    "\u2018quoted\u2019 text \u2014 dash \u2026", "ＦＵＬＬ width ｔｅｘｔ", "ALL CAPS TEXT", "naïve façade coöperate",
    "東京の夜景と富士山", "Ünïcödé 🐕‍🦺 dog emoji 🌳🌳 trees", "Ã©tÃ© mojibake", "tabs\tand\u00a0nbsp\u2028line",
    "control\x00chars\x1b[31m red\x7f", "don't won't it's", "#1 (2.5 m) 100% @home", "ﬁne ligature",
]


def _captions(tok, n: int, seed: int = 0) -> list[str]:
    """Zipf-distributed words from the BPE's own vocabulary, lengths from 1 to 120 words."""
    words = [w[:-4] for w in tok.encoder if w.endswith("</w>") and len(w) > 5]
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    out = []
    for _ in range(n):
        count = int(rng.integers(1, 121))
        out.append(" ".join(words[i] for i in rng.choice(len(words), size=count, p=p)).capitalize() + ".")
    return out


def _boundary(ctx: int) -> list[str]:
    """Texts needing exactly ctx - 1 .. ctx + 2 tokens (start and end included)."""
    return [" ".join(["dog"] * (ctx - 3 + k)) for k in range(4)]


@pytest.mark.parametrize("name", ["holi-tiny", "ViT-B-16"])
def test_one_encode_gives_open_clips_ids_and_the_untruncated_lengths(name):
    tok = get_tokenizer(name)
    ctx = tok.context_length
    texts = _captions(tok, 400) + ODD + _boundary(ctx)
    ids, lengths = tokenize(tok, texts)
    want = tok(texts)
    assert ids.dtype == want.dtype and torch.equal(ids, want)
    assert lengths == token_lengths(tok, texts)
    assert lengths[-4:] == [ctx - 1, ctx, ctx + 1, ctx + 2]
    assert sum(n > ctx for n in lengths) > 50  # long captions are in the test, cut at the context


def test_collate_encodes_each_caption_once(monkeypatch):
    tok = get_tokenizer("holi-tiny")
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text: calls.append(text) or encode(text))
    texts = ["short", "word " * 50, "a red square"]
    items = [{"image": torch.zeros(3, 4, 4, dtype=torch.uint8), "texts": texts, "index": i, "bad": []} for i in range(4)]
    batch = Collate(tok, tok.context_length)(items)
    assert len(calls) == 12  # 4 samples x 3 captions, each encoded once (not again to count its length)
    assert batch["texts"].shape == (4, 3, tok.context_length) and batch["truncated"] == 4
    assert torch.equal(batch["texts"].view(12, -1), get_tokenizer("holi-tiny")(texts * 4))


def test_other_tokenizers_are_called_as_they_are():
    def tokenizer(texts):  # a stand-in: ids 1.. per word, zero padded to 6
        out = torch.zeros(len(texts), 6, dtype=torch.long)
        for i, t in enumerate(texts):
            n = min(len(t.split()), 6)
            out[i, :n] = torch.arange(1, n + 1)
        return out

    ids, lengths = tokenize(tokenizer, ["one two", "a b c d e f g h"])
    assert torch.equal(ids, tokenizer(["one two", "a b c d e f g h"]))
    assert lengths == [2, 7]  # the one filling the context counts as truncated

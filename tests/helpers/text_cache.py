"""Stand-ins for a text trunk and its tokenizer in the text-cache tests."""
from __future__ import annotations

import torch


class CharTokenizer:
    """Stand-in tokenizer: character codes, padded with 0."""

    context_length = 12

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [min(ord(c), 998) + 1 for c in t[: self.context_length]]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class StandInTrunk(torch.nn.Module):
    """A text trunk whose output depends on the text alone; counts the texts it computes."""

    def __init__(self, width: int = 8, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(1000, width)
        self.computed, self.fail_after = 0, fail_after

    def text_trunk(self, tokens):
        if self.fail_after is not None and self.computed >= self.fail_after:
            raise RuntimeError("trunk failed")
        self.computed += len(tokens)
        return self.emb(tokens).sum(1)


def want(texts, trunk=None):
    """The stand-in trunk's features of ``texts``."""
    with torch.no_grad():
        return (trunk or StandInTrunk()).text_trunk(CharTokenizer()(list(texts)))

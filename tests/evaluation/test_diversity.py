"""Text diversity (paper Table 9): slot similarity and the diversity task."""
from __future__ import annotations

import json
import math

import pytest
import torch

from holiclip.evaluation import run_task, slot_similarity


def test_slot_similarity_known_values():
    s = 0.6, 0.8
    feats = torch.tensor([
        [[1.0, 0.0], [s[0], s[1]], [0.0, 1.0]],  # cos(a,b) .6, cos(a,c) 0, cos(b,c) .8
        [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]],  # slot c missing: cos(a,b) 1
    ])
    present = torch.tensor([[True, True, True], [True, True, False]])
    out = slot_similarity(feats, present, ["a", "b", "c"])
    assert out["pairs"]["a|b"] == pytest.approx(0.8)  # (0.6 + 1) / 2
    assert out["pairs"]["a|c"] == pytest.approx(0.0) and out["pairs"]["b|c"] == pytest.approx(0.8)
    assert out["pair_counts"] == {"a|b": 2, "a|c": 1, "b|c": 1}
    assert out["mean"] == pytest.approx(((0.6 + 0.0 + 0.8) / 3 + 1.0) / 2)
    lone = slot_similarity(feats[:1], torch.tensor([[True, False, False]]), ["a", "b", "c"])
    assert math.isnan(lone["mean"]) and lone["images"] == 0


def test_diversity_task_identical_texts(tmp_path, eval_model):
    rows = [
        {"image": "0.png", "captions": {"web": "a dog", "detail": "a dog", "style": "a dog"}},
        {"image": "1.png", "captions": {"web": "a cat", "detail": "a cat"}},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = run_task("diversity", eval_model, tmp_path / "train.jsonl")
    assert res["mean"] == pytest.approx(1.0, abs=1e-5)  # identical texts: cosine 1
    assert res["pair_counts"] == {"web|detail": 2, "web|style": 1, "detail|style": 1}
    res = run_task("diversity", eval_model, tmp_path / "train.jsonl", slots=["web", "style"])
    assert res["images"] == 1 and list(res["pairs"]) == ["web|style"]

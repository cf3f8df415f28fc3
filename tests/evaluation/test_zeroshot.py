"""Zero-shot classification: metrics with known answers, and an end-to-end run on a tiny
ImageFolder checked against a direct computation with the model."""
from __future__ import annotations

import math

import pytest
import open_clip
import torch

from holiclip.evaluation import build_classifier, classification_metrics, run_task, zeroshot_classify
from holiclip.evaluation.features import encode_images


def test_metrics_known_answers():
    logits = torch.tensor([
        [0.9, 0.1, 0.0],  # label 0: top-1
        [0.5, 0.4, 0.3],  # label 1: second -> top-2 only
        [0.2, 0.2, 0.1],  # label 1: tied with class 0 -> counts against (rank 1)
        [0.0, 0.1, 0.2],  # label 2: top-1
    ])
    m = classification_metrics(logits, [0, 1, 1, 2], ks=(1, 2, 5))
    assert m["acc1"] == pytest.approx(0.5) and m["acc2"] == pytest.approx(1.0) and m["acc5"] == 1.0
    assert m["per_class_recall"] == [1.0, 0.0, 1.0]
    assert m["mean_per_class_recall"] == pytest.approx(2 / 3)
    m = classification_metrics(logits[:1], [0])
    assert m["per_class_recall"] == [1.0, None, None] and m["mean_per_class_recall"] == 1.0


def test_fusion_and_branches_in_zeroshot():
    names = ("web", "main")
    classifier = torch.eye(3)  # (D, C): class c is axis c
    feats = torch.zeros(3, 2, 3)
    feats[:, 1] = torch.eye(3)  # "main" branch points at the right class
    feats[:, 0] = torch.eye(3)[[1, 2, 0]]  # "web" points at the wrong one
    assert zeroshot_classify(feats, [0, 1, 2], classifier, branches=["main"], names=names)["acc1"] == 1.0
    assert zeroshot_classify(feats, [0, 1, 2], classifier, branches=["web"], names=names)["acc1"] == 0.0
    # mean of both: true class and web's class tie -> pessimistic -> wrong at 1, right at 2
    both = zeroshot_classify(feats, [0, 1, 2], classifier, ks=(1, 2))
    assert both["acc1"] == 0.0 and both["acc2"] == 1.0


def test_end_to_end_tiny_image_folder(tmp_path, eval_model, solid_image):
    colors = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (20, 30, 220)}
    for name, rgb in colors.items():
        (tmp_path / name).mkdir()
        for i in range(2):
            solid_image(tmp_path / name / f"{i}.png", tuple(max(0, c - 30 * i) for c in rgb))
    res = run_task("zeroshot", eval_model, tmp_path, templates="simple", per_branch=True)
    assert res["task"] == "zeroshot_classification" and res["dataset"] == tmp_path.name
    assert set(res) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert [r["branches"] for r in res["rows"]] == ["web", "detail", "main", "mean(web+detail+main)"]
    assert set(res["metrics"]["per_class_recall"]) == set(colors)
    # the fused row against a direct computation with the model
    m = eval_model.model
    classifier = build_classifier(m, eval_model.tokenizer, ["blue", "green", "red"], open_clip.SIMPLE_IMAGENET_TEMPLATES)
    paths = [str(tmp_path / c / f"{i}.png") for c in ("blue", "green", "red") for i in range(2)]
    feats = encode_images(m, paths, eval_model.transform)
    fused = torch.nn.functional.normalize(feats.mean(1), dim=-1)
    pred = (fused @ classifier).argmax(1)
    want = (pred == torch.tensor([0, 0, 1, 1, 2, 2])).double().mean().item()
    assert res["metrics"]["acc1"] == pytest.approx(want)
    assert res["metrics"]["acc5"] == 1.0  # 3 classes: top-5 always hits
    assert not math.isnan(res["metrics"]["mean_per_class_recall"])

"""Zero-shot classification: a text classifier from class names x prompt templates, top-k
accuracy and per-class recall, with results shaped like CLIP_benchmark's JSON.

A sample counts as correct at k when fewer than k wrong classes score at least as high as the
true class (ties count against the model, as in retrieval; without ties this is ordinary
top-k accuracy).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .retrieval import prepare_image_features


def build_classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence,
    device: str | torch.device = "cpu",
    classes_per_batch: int = 10,
    progress: bool = False,
) -> torch.Tensor:
    """(D, C) unit-norm class embeddings: the mean over templates of each class's prompts."""
    from open_clip import build_zero_shot_classifier

    return build_zero_shot_classifier(
        model, tokenizer, list(classnames), list(templates), num_classes_per_batch=classes_per_batch,
        device=device, use_tqdm=progress,
    ).float().cpu()


def classification_metrics(logits: torch.Tensor, labels, ks: Sequence[int] = (1, 5)) -> dict:
    """``acc{k}`` for each k (k capped at the number of classes), ``mean_per_class_recall``
    over classes that have samples and ``per_class_recall`` (None for classes without any)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    n, c = logits.shape
    if labels.numel() != n:
        raise ValueError(f"{n} logit rows but {labels.numel()} labels")
    if n and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must be in 0..{c - 1}")
    true = logits.gather(1, labels[:, None])
    wrong_above = (logits >= true).sum(1) - 1  # the true class itself is >= true
    out = {f"acc{k}": float((wrong_above < min(k, c)).double().mean()) for k in ks}
    hits = (wrong_above == 0).double()
    count = torch.bincount(labels, minlength=c).float()
    correct = torch.zeros(c, dtype=torch.float64).index_add_(0, labels, hits)
    per_class = [float(correct[i] / count[i]) if count[i] > 0 else None for i in range(c)]
    present = [r for r in per_class if r is not None]
    out["mean_per_class_recall"] = sum(present) / len(present) if present else math.nan
    out["per_class_recall"] = per_class
    return out


def zeroshot_classify(
    image_features: torch.Tensor,
    labels,
    classifier: torch.Tensor,
    fusion: str = "mean",
    branches=None,
    names: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5),
) -> dict:
    """Metrics of :func:`classification_metrics` for (N, D) or (N, H, D) image features fused
    as :func:`holiclip.fuse` does, against a (D, C) classifier."""
    x = prepare_image_features(image_features, fusion, branches, names)
    return classification_metrics(x.float() @ classifier.float(), labels, ks)


def clip_benchmark_record(metrics: dict, dataset: str, model: str, pretrained: str, language: str = "en", **extra) -> dict:
    """The JSON object CLIP_benchmark writes for ``zeroshot_classification``; extra keys
    (fusion, per-branch rows) are added beside it."""
    return {
        "dataset": dataset,
        "model": model,
        "pretrained": pretrained,
        "task": "zeroshot_classification",
        "metrics": metrics,
        "language": language,
        **extra,
    }

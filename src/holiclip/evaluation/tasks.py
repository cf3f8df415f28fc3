"""Evaluation tasks as plug-ins: ``TASKS`` maps a task name to a function
``fn(em: EvalModel, data, **options) -> result dict`` that reads the data, extracts features,
scores every requested branch variant and returns a JSON-ready result.

Every result has CLIP_benchmark's top-level keys (``dataset``, ``model``, ``pretrained``,
``task``, ``metrics``, ``language``) for the fused variant, plus ``fusion``, ``branches``,
``rows`` (one dict per variant: ``{"branches": label, metric: value, ...}``, the per-branch
rows first and the fused row last), ``columns`` (what the table shows) and, for tasks that read
images, ``skipped_images`` (unreadable images left out of the metrics: index, image, error).
Add a task with ``@register_task("name")``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .datasets import (
    load_classification, load_classnames, load_retrieval, load_segmentation, load_templates, stratified_subset,
)
from .dense import evaluate_segmentation
from .diversity import text_diversity
from .features import Shard, encode_images, encode_texts
from .loading import EvalModel
from .retrieval import groups_from_identical_captions, recall_at_k
from .zeroshot import build_classifier, clip_benchmark_record, zeroshot_classify

TASKS: dict[str, Callable] = {}


def register_task(name: str):
    def wrap(fn):
        TASKS[name] = fn
        return fn

    return wrap


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise KeyError(f"unknown evaluation task {name!r}; tasks: {sorted(TASKS)}")
    return TASKS[name]


def run_task(name: str, em: EvalModel, data, **options) -> dict:
    return get_task(name)(em, data, **options)


def branch_variants(
    names: Sequence[str], fusion: str | Sequence[str] = "mean", branches: Sequence[str] | None = None,
    per_branch: bool = False,
) -> list[tuple[str, str, list[str] | None]]:
    """``(label, fusion, branches)`` to evaluate: each selected branch alone when
    ``per_branch``, then the fused selection (label e.g. ``mean(web+detail)``), once per mode
    when ``fusion`` is a list of them."""
    names = list(names)
    selected = list(branches) if branches else names
    unknown = [b for b in selected if b not in names]
    if unknown:
        raise KeyError(f"unknown branches {unknown}; this model has {names}")
    out = [(b, "mean", [b]) for b in selected] if per_branch else []
    for mode in [fusion] if isinstance(fusion, str) else fusion:
        out.append((f"{mode}({'+'.join(selected)})", mode, list(branches) if branches else None))
    return out


def _result(task: str, dataset: str, em: EvalModel, rows: list[dict], fusion: str, branches, columns, **extra) -> dict:
    return clip_benchmark_record(
        {k: v for k, v in rows[-1].items() if k != "branches"}, dataset, em.name, em.pretrained,
        fusion=fusion, branches=list(branches) if branches else list(em.branch_names),
        rows=rows, columns=columns, **extra,
    ) | {"task": task}


@register_task("retrieval")
def retrieval_task(
    em: EvalModel,
    data,
    fmt: str = "auto",
    image_root=None,
    split: str = "test",
    slots: Sequence[str] | None = None,
    text_field: str | None = None,
    long_text: str = "truncate",
    fusion: str = "mean",
    branches: Sequence[str] | None = None,
    per_branch: bool = False,
    ks: Sequence[int] = (1, 5, 10),
    identical_captions_as_hits: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    chunk_size: int | None = None,
    limit: int | None = None,
    progress: bool = False,
    task: str = "zeroshot_retrieval",
    ties: str = "pessimistic",
    shard: Shard | None = None,
) -> dict:
    """``ties``: how a correct item tied with wrong ones ranks (see :mod:`.retrieval`): pessimistic
    (below them), optimistic, or clip-benchmark (``torch.topk``'s order, as CLIP_benchmark).
    ``shard``: spread over ranks, each encoding its share (see :class:`.features.Shard`)."""
    ds = load_retrieval(data, fmt, image_root, split, slots, text_field, limit)
    variants = branch_variants(em.branch_names, fusion, branches, per_branch)
    skipped: list[dict] = []
    images = encode_images(em.model, ds.images, em.transform, batch_size, em.device, num_workers, progress, skipped,
                           shard=shard)
    if skipped:  # unreadable images leave with their texts, so every text keeps its own image
        ds = ds.drop([s["index"] for s in skipped])
    texts = encode_texts(em.model, em.tokenizer, ds.texts, 4 * batch_size, em.device, long_text, progress=progress,
                         shard=shard)
    groups = groups_from_identical_captions(ds.texts, ds.text_to_image, len(ds.images)) if identical_captions_as_hits else None
    rows = []
    for label, mode, subset in variants:
        m = recall_at_k(
            images, texts.features, ds.text_to_image, ks, mode, subset, em.branch_names, groups,
            ties=ties, chunk_size=chunk_size, progress=progress,
        )
        # CLIP_benchmark's names: image retrieval = text query (t2i), text retrieval = image query (i2t)
        m |= {f"image_retrieval_recall@{k}": m[f"t2i_R@{k}"] for k in ks}
        m |= {f"text_retrieval_recall@{k}": m[f"i2t_R@{k}"] for k in ks}
        rows.append({"branches": label, **m})
    columns = ["branches"] + [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in ks]
    return _result(
        task, ds.name, em, rows, fusion, branches, columns,
        images=len(ds.images), texts=len(ds.texts), text_stats=texts.summary(), long_text=long_text,
        identical_captions_as_hits=identical_captions_as_hits, ties=ties, skipped_images=skipped,
    )


@register_task("long-retrieval")
def long_retrieval_task(em: EvalModel, data, slots: Sequence[str] | None = None, **options) -> dict:
    """Retrieval with one long caption per image; from our manifests the ``detail`` slot."""
    fmt = options.get("fmt", "auto")
    if slots is None and fmt in ("auto", "manifest"):
        from .datasets import detect_format

        if (fmt if fmt != "auto" else detect_format(data)) == "manifest":
            slots = ("detail",)
    return retrieval_task(em, data, slots=slots, task="long_retrieval", **options)


@register_task("zeroshot")
def zeroshot_task(
    em: EvalModel,
    data,
    classnames: str | None = None,
    templates: str | None = None,
    fusion: str = "mean",
    branches: Sequence[str] | None = None,
    per_branch: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    limit: int | None = None,
    progress: bool = False,
    seed: int = 0,
    shard: Shard | None = None,
    split: str = "test",
) -> dict:
    """``data``: an ImageFolder or a CLIP_benchmark webdataset folder (its ``split``).
    ``templates``: None takes the set's own (CLIP_benchmark's templates file), else ``openai``.
    ``limit``: a seeded class-stratified subset of that many images (``seed``), not the first
    ones of the class-sorted folder list. ``shard``: spread over ranks (the images and the classes)."""
    ds = load_classification(data, load_classnames(classnames), split)
    if limit is not None:
        keep = stratified_subset(ds.labels, limit, seed)
        ds.images, ds.labels = [ds.images[i] for i in keep], [ds.labels[i] for i in keep]
    variants = branch_variants(em.branch_names, fusion, branches, per_branch)
    prompts = ds.templates if templates is None and ds.templates else load_templates(templates)

    def classify(names, _=0):
        return build_classifier(em.model, em.tokenizer, names, prompts, em.device, progress=progress)

    classifier = classify(ds.classnames) if shard is None else torch.cat(
        [c for c in shard.map(ds.classnames, classify) if c is not None], dim=1)
    skipped: list[dict] = []
    images = encode_images(em.model, ds.images, em.transform, batch_size, em.device, num_workers, progress, skipped,
                           shard=shard)
    gone = {s["index"] for s in skipped}
    labels = [y for i, y in enumerate(ds.labels) if i not in gone]
    rows, per_class = [], None
    for label, mode, subset in variants:
        m = zeroshot_classify(images, labels, classifier, mode, subset, em.branch_names)
        per_class = m.pop("per_class_recall")
        rows.append({"branches": label, **m})
    result = _result(
        "zeroshot_classification", ds.name, em, rows, fusion, branches, ["branches", "acc1", "acc5", "mean_per_class_recall"],
        images=len(labels), classes=len(ds.classnames), skipped_images=skipped, limit=limit, seed=seed,
    )
    result["metrics"]["per_class_recall"] = dict(zip(ds.classnames, per_class))  # of the fused row
    return result


@register_task("dense")
def dense_task(
    em: EvalModel,
    data,
    classes=None,
    templates: str | None = "openai",
    fusion: str = "mean",
    branches: Sequence[str] | None = None,
    per_branch: bool = False,
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    ds = load_segmentation(data, classes, limit)
    # Psi_CLS: the branches differ only in their class tokens; every branch reads the same patch
    # tokens, so per-branch rows would repeat one number as if it were H results
    shared_stream = per_branch and getattr(em.model, "encoder", None) == "cls" and len(em.branch_names) > 1
    variants = branch_variants(em.branch_names, fusion, branches, per_branch and not shared_stream)
    class_features = build_classifier(em.model, em.tokenizer, ds.classnames, load_templates(templates), em.device).T
    skipped: list[dict] = []
    per = evaluate_segmentation(
        em.model, ds.images, ds.masks, class_features, variants, ds.classnames, batch_size, em.device, progress=progress,
        skipped=skipped,
    )
    rows = [{"branches": label, **{k: v for k, v in per[label].items() if k != "per_class_iou"}} for label, _, _ in variants]
    result = _result(
        "dense_segmentation", ds.name, em, rows, fusion, branches, ["branches", "mIoU", "pixel_accuracy", "mean_class_accuracy"],
        images=len(ds.images) - len(skipped), classes=len(ds.classnames), skipped_images=skipped,
    )
    result["metrics"]["per_class_iou"] = per[variants[-1][0]]["per_class_iou"]
    if shared_stream:
        result["notes"] = [SHARED_PATCH_STREAM]
    return result


SHARED_PATCH_STREAM = ("--per-branch: this Psi_CLS model has one patch stream shared by all its branches (they differ "
                       "only in their class tokens), so every branch gives the row above; Psi_MLP has a stream per branch")


@register_task("diversity")
def diversity_task(
    em: EvalModel, data, slots: Sequence[str] | None = None, limit: int | None = None, batch_size: int = 256, progress: bool = False
) -> dict:
    out = text_diversity(em.model, em.tokenizer, data, slots, limit, batch_size, em.device, progress)
    rows = [{"slot pair": k, "cosine": v, "images": out["pair_counts"][k]} for k, v in out["pairs"].items()]
    rows.append({"slot pair": "mean (per image)", "cosine": out["mean"], "images": out["images"]})
    return {
        "dataset": str(data), "model": em.name, "pretrained": em.pretrained, "task": "text_diversity",
        "metrics": {"mean_similarity": out["mean"], "pairs": out["pairs"]}, "language": "en",
        "rows": rows, "columns": ["slot pair", "cosine", "images"], **out,
    }


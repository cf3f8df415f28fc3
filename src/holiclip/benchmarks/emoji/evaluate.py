"""The emoji benchmark's evaluation: one pass of features per model, then every
task for the fused embedding, each branch alone and the routed choice.

Tasks (all on the test split unless noted; percentages in [0, 100]):
  short_*   web-caption retrieval; images whose web captions are identical count as one
            group (``web_group``), so a correct-but-indistinguishable image is a hit.
  long_*    detail-caption retrieval (strict, one image per caption).
  zeroshot_main_top1        main (largest) object among all object classes.
  zeroshot_background_top1  background colour family.
  zeroshot_heldout_style_top1  main object, scenes drawn in an artwork style never trained on.
  dense_miou  per-patch open-vocabulary labels of object pixels (background pixels ignored),
            mIoU over the object classes; read-out described in ``MultiBranchViT.dense``.
Routing (the paper's Table 8 idea as an option): short -> ``web``, long -> ``detail``,
main object, held-out style and dense -> ``main``, background -> ``background``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from holiclip.data.loader import tensor_transform
from holiclip.evaluation.dense import IGNORE_INDEX, evaluate_segmentation
from holiclip.evaluation.features import encode_texts
from holiclip.evaluation.retrieval import recall_at_k
from holiclip.evaluation.zeroshot import build_classifier, zeroshot_classify
from holiclip.models.registry import get_tokenizer

from .data import build as emoji

ROUTES = {"short": "web", "long": "detail", "zeroshot_main": "main", "zeroshot_heldout_style": "main",
          "dense": "main", "zeroshot_background": "background"}


@torch.no_grad()
def encode_array(model, images, batch_size: int = 256) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, H, D) branch embeddings; S must be the model's input size."""
    normalise = tensor_transform(model.image_size)  # the training loader's
    out = []
    for s in range(0, len(images), batch_size):
        x = torch.from_numpy(images[s: s + batch_size].copy()).permute(0, 3, 1, 2).float().div_(255)
        out.append(model.encode_image(normalise(x), normalize=True).float())
    return torch.cat(out)


def _task_metrics(feats: dict, labels: dict, texts: dict, classifiers: dict, dense: dict, selection) -> dict:
    """All headline metrics for one branch selection: (fusion, branches)."""
    fusion, branches, names = selection
    m = {}
    for kind, groups in (("short", labels["web_group"]), ("long", None)):
        r = recall_at_k(feats["test"], texts[kind], torch.arange(len(texts[kind])), ks=(1, 5), fusion=fusion,
                        branches=branches, names=names, image_groups=groups)
        for k in (1, 5):
            m[f"{kind}_i2t_r{k}"] = 100 * r[f"i2t_R@{k}"]
            m[f"{kind}_t2i_r{k}"] = 100 * r[f"t2i_R@{k}"]
    for task, split, clf in (("zeroshot_main", "test", "object"), ("zeroshot_background", "test", "background"),
                             ("zeroshot_heldout_style", "heldout", "object")):
        key = "background" if clf == "background" else "main"
        res = zeroshot_classify(feats[split], labels[f"{split}_{key}"], classifiers[clf], fusion, branches, names)
        m[f"{task}_top1"] = 100 * res["acc1"]
    m["dense_miou"] = 100 * dense[_label(branches)]["mIoU"]
    return m


def _label(branches) -> str:
    return "+".join(branches) if branches else "all"


def evaluate_emoji(model, root: str | Path, slots: Sequence[str] = (), limit: int | None = None,
                   dense_images: int = 300) -> dict:
    """``{"fused": {...}, "per_branch": {name: {...}}, "routed": {...}}`` (the last two for H > 1)."""
    model.eval()
    root = Path(root)
    classes = emoji.load_classes(root)
    tokenizer = get_tokenizer(model.model_name)
    images, rows = emoji.load_split(root, "test")
    held_images, held_rows = emoji.load_split(root, "test_heldout")
    if limit:
        images, rows, held_images, held_rows = images[:limit], rows[:limit], held_images[:limit], held_rows[:limit]
    feats = {"test": encode_array(model, images), "heldout": encode_array(model, held_images)}
    labels = {
        "web_group": torch.tensor([r["web_group"] for r in rows]),
        "test_main": torch.tensor([r["main"] for r in rows]),
        "test_background": torch.tensor([r["background"] for r in rows]),
        "heldout_main": torch.tensor([r["main"] for r in held_rows]),
    }
    texts = {kind: encode_texts(model, tokenizer, [r["captions"][slot] for r in rows]).features
             for kind, slot in (("short", "web"), ("long", "detail"))}
    templates = classes["templates"]
    objects = [o["prompt"] for o in classes["objects"]]
    backgrounds = [b["name"] for b in classes["backgrounds"]]
    classifiers = {
        "object": build_classifier(model, tokenizer, objects, [t.format for t in templates["object"]]),
        "background": build_classifier(model, tokenizer, backgrounds, [t.format for t in templates["background"]]),
    }
    names = tuple(model.branch_names)
    selections = [("mean", None, names)]
    if len(names) > 1:
        selections += [("mean", [b], names) for b in names]
    # dense: class masks with background ignored, on the first `dense_images` test scenes
    n_dense = min(dense_images, len(rows))
    masks = torch.from_numpy(emoji.load_masks(root, "test", kind="class")[:n_dense].astype("int64"))
    masks[masks < 0] = IGNORE_INDEX
    dense = evaluate_segmentation(
        model, [Image.fromarray(images[i]) for i in range(n_dense)], list(masks), classifiers["object"].T,
        variants=[(_label(b), "mean", b) for _, b, _ in selections], classnames=objects,
    )
    results = {f"{_label(b)}": _task_metrics(feats, labels, texts, classifiers, dense, (f, b, n))
               for f, b, n in selections}
    out = {"fused": results["all"]}
    if len(names) > 1:
        out["per_branch"] = {b: results[b] for b in names}
        out["routed"] = {
            metric: results[ROUTES[_task_of(metric)]][metric] if ROUTES[_task_of(metric)] in names
            else results["all"][metric]
            for metric in results["all"]
        }
    return out


def _task_of(metric: str) -> str:
    for task in sorted(ROUTES, key=len, reverse=True):
        if metric.startswith(task):
            return task
    raise KeyError(metric)

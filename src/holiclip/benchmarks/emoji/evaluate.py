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
  dense_probe_miou  (with ``probe_images``) the same protocol, labels from a linear probe on the
            frozen patch tokens fitted on training scenes (``holiclip.evaluation.dense_probe``).
Routing (the paper's Table 8 idea as an option): short -> ``web``, long -> ``detail``,
main object, held-out style and dense -> ``main``, background -> ``background``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from holiclip.data.loader import tensor_transform
from holiclip.evaluation.dense import IGNORE_INDEX, evaluate_segmentation
from holiclip.evaluation.dense_probe import linear_probe, patch_token_streams
from holiclip.evaluation.diversity import slot_similarity
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


def _task_metrics(feats: dict, labels: dict, texts: dict, classifiers: dict, dense: dict, selection,
                  zeroshot_tasks) -> dict:
    """All headline metrics for one branch selection: (fusion, branches, names)."""
    fusion, branches, names = selection
    m = {}
    for kind, groups in (("short", labels["web_group"]), ("long", None)):
        r = recall_at_k(feats["test"], texts[kind], torch.arange(len(texts[kind])), ks=(1, 5), fusion=fusion,
                        branches=branches, names=names, image_groups=groups)
        for k in (1, 5):
            m[f"{kind}_i2t_r{k}"] = 100 * r[f"i2t_R@{k}"]
            m[f"{kind}_t2i_r{k}"] = 100 * r[f"t2i_R@{k}"]
    for task, split, clf in zeroshot_tasks:
        key = "background" if clf == "background" else "main"
        res = zeroshot_classify(feats[split], labels[f"{split}_{key}"], classifiers[clf], fusion, branches, names)
        m[f"{task}_top1"] = 100 * res["acc1"]
    m["dense_miou"] = 100 * dense[_label(fusion, branches)]["mIoU"]
    return m


def _label(fusion: str, branches) -> str:
    name = "+".join(branches) if branches else "all"
    return name if fusion == "mean" else f"{fusion}:{name}"


def split_of_style(root: str | Path, style: str) -> str | None:
    """The test split drawn in artwork ``style`` (meta.json's splits name their style), if any."""
    splits = json.loads((Path(root) / "meta.json").read_text()).get("splits", {})
    return next((s for s, info in splits.items() if s.startswith("test") and info.get("style") == style), None)


def evaluate_emoji(model, root: str | Path, slots: Sequence[str] = (), limit: int | None = None,
                   dense_images: int = 300, fusions: Sequence[str] = ("mean",),
                   subsets: dict[str, Sequence[str]] | None = None, styles: Sequence[str] = (),
                   probe_images: int | None = None, probe_seed: int = 0) -> dict:
    """``{"fused": {...}, "per_branch": {name: {...}}, "routed": {...}}`` (the last two for H > 1).

    Options (for ablations; off by default): ``fusions`` adds ``"fusion": {mode: metrics}`` for
    each fusion mode of all branches (H > 1); ``subsets`` ``{label: [branch, ...]}`` adds
    ``"subsets": {label: metrics}`` for those whose branches the model has; ``styles`` adds
    ``zeroshot_heldout_style_<style>_top1`` (main object on the test split drawn in that artwork
    style) to every metrics dict; ``probe_images`` adds ``dense_probe_miou``, a linear probe on
    frozen patch tokens (:mod:`holiclip.evaluation.dense_probe`) fitted on that many training
    scenes: per branch from the branch's own token stream where streams differ (Psi_MLP), the
    shared stream's value otherwise; fused from the streams' mean. With H > 1 ``branch_cosine``
    is the branches' mean pairwise cosine on the test images."""
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
    zeroshot_tasks = [("zeroshot_main", "test", "object"), ("zeroshot_background", "test", "background"),
                      ("zeroshot_heldout_style", "heldout", "object")]
    for style in styles:
        split = split_of_style(root, style)
        if split is None:
            raise ValueError(f"{root / 'meta.json'}: no test split in style {style!r}")
        style_images, style_rows = emoji.load_split(root, split)
        if limit:
            style_images, style_rows = style_images[:limit], style_rows[:limit]
        feats[f"style_{style}"] = encode_array(model, style_images)
        labels[f"style_{style}_main"] = torch.tensor([r["main"] for r in style_rows])
        zeroshot_tasks.append((f"zeroshot_heldout_style_{style}", f"style_{style}", "object"))
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
    extra_fusions = [f for f in dict.fromkeys(fusions) if f != "mean"] if len(names) > 1 else []
    chosen = {label: list(b) for label, b in (subsets or {}).items() if set(b) <= set(names)} if len(names) > 1 else {}
    if len(names) > 1:
        selections += [("mean", [b], names) for b in names]
        selections += [(f, None, names) for f in extra_fusions]
        selections += [("mean", b, names) for b in chosen.values() if ("mean", b, names) not in selections]
    # dense: class masks with background ignored, on the first `dense_images` test scenes
    n_dense = min(dense_images, len(rows))
    masks = torch.from_numpy(emoji.load_masks(root, "test", kind="class")[:n_dense].astype("int64"))
    masks[masks < 0] = IGNORE_INDEX
    dense = evaluate_segmentation(
        model, [Image.fromarray(images[i]) for i in range(n_dense)], list(masks), classifiers["object"].T,
        variants=[(_label(f, b), f, b) for f, b, _ in selections], classnames=objects,
    )
    results = {_label(f, b): _task_metrics(feats, labels, texts, classifiers, dense, (f, b, n), zeroshot_tasks)
               for f, b, n in selections}
    if probe_images:
        probe = _dense_probe(model, root, images, len(rows), len(objects), objects, probe_images, probe_seed)
        results["all"]["dense_probe_miou"] = probe["fused"]
        for label in results:
            branch = label if label in names else None
            results[label]["dense_probe_miou"] = probe["per_branch"].get(branch, probe["fused"])
    out = {"fused": results["all"]}
    if len(names) > 1:
        out["per_branch"] = {b: results[b] for b in names}
        out["routed"] = {
            metric: results[ROUTES[_task_of(metric)]][metric] if ROUTES[_task_of(metric)] in names
            else results["all"][metric]
            for metric in results["all"]
        }
        if extra_fusions:
            out["fusion"] = {"mean": results["all"], **{f: results[_label(f, None)] for f in extra_fusions}}
        if chosen:
            out["subsets"] = {label: results[_label("mean", b)] for label, b in chosen.items()}
        present = torch.ones(feats["test"].shape[:2], dtype=torch.bool)
        out["branch_cosine"] = slot_similarity(feats["test"], present, names)["mean"]
    if probe_images:
        out["dense_probe"] = {"streams": "per-branch" if probe["per_branch"] else "shared",
                              "train_images": probe["train_images"]}
    return out


def _dense_probe(model, root: Path, test_images, n_test: int, num_classes: int, classnames, train_images: int,
                 seed: int) -> dict:
    """Linear-probe mIoU (percent) on frozen patch tokens: fused (streams' mean) and per branch
    where the branches have their own token streams."""
    normalise = tensor_transform(model.image_size)

    def tokens(arr):
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255)
        return patch_token_streams(model, normalise(x))

    train_arr, _ = emoji.load_split(root, "train", mmap=True)
    pick = np.sort(np.random.default_rng(seed).permutation(len(train_arr))[:train_images])
    train_masks = emoji.load_masks(root, "train", kind="class")[pick]
    test_masks = emoji.load_masks(root, "test", kind="class")[:n_test]
    train_tok, test_tok = tokens(train_arr[pick]), tokens(test_images[:n_test])
    grid = tuple(model.visual.grid_size)

    def score(tr, te):
        return 100 * linear_probe(tr, train_masks, te, test_masks, num_classes, grid, classnames, seed=seed)["mIoU"]

    names = tuple(model.branch_names)
    per_branch = {}
    if train_tok.shape[0] > 1:
        per_branch = {b: score(train_tok[i], test_tok[i]) for i, b in enumerate(names)}
    return {"fused": score(train_tok.mean(0), test_tok.mean(0)), "per_branch": per_branch,
            "train_images": len(pick)}


def _task_of(metric: str) -> str:
    for task in sorted(ROUTES, key=len, reverse=True):
        if metric.startswith(task):
            return task
    raise KeyError(metric)

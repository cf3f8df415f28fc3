"""Open-vocabulary segmentation from each branch's patch tokens, scored by mIoU.

Read-out (``HolisticCLIP.encode_dense``, MaskCLIP style): the image runs through every block
but the last; of the last block only the value path is kept (ln_1 -> value projection ->
out_proj, no query-key attention mixing, no residual, no MLP), so each patch token keeps its
own content; it then goes through the shared ln_post and projection into the joint space,
per branch, and is L2-normalised (``normalize=True``). Each patch is labelled with the class whose text embedding
(mean over prompt templates) is most similar; the patch grid's logits are upsampled
bilinearly to the mask's size before the argmax. Images are resized to the model's square
input without cropping, so predictions cover the whole mask.

Masks are class-index PNGs (pixel value = class id, 255 = ignore). IoU per class is
TP / (TP + FP + FN) over the whole dataset; classes that never occur in either the truth or
the predictions are left out of the mean.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..data.records import DataError
from ..models.fusion import fuse
from ..data.loader import UNREADABLE, open_image, tensor_transform
from .features import no_readable_images, unreadable

IGNORE_INDEX = 255


def dense_transform(image_size):
    """Resize to the model's input (no crop) + the training loader's normalisation."""
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else (image_size, image_size)
    normalise = tensor_transform(size)

    def transform(img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
        return normalise(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))

    return transform


def load_mask(path, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """A class-index PNG -> (h, w) long tensor; other values than 0..C-1 and ignore are errors."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DataError(f"{path}: mask must be a class-index PNG (mode P or L), got mode {im.mode}")
        mask = torch.from_numpy(np.asarray(im).astype(np.int64))
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        raise DataError(f"{path}: mask value {int(mask[bad][0])} is not a class (0..{num_classes - 1}) or {ignore_index}")
    return mask


@torch.no_grad()
def patch_logits(
    dense_features: torch.Tensor,
    class_features: torch.Tensor,
    fusion: str = "mean",
    branches=None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """(B, H, gh, gw, D) patch features x (C, D) class embeddings -> (B, C, gh, gw)."""
    b, h, gh, gw, d = dense_features.shape
    per_patch = dense_features.permute(0, 2, 3, 1, 4).reshape(b * gh * gw, h, d)
    fused = fuse(per_patch, mode=fusion, branches=branches, names=names)
    logits = fused.float() @ class_features.float().T
    return logits.view(b, gh, gw, -1).permute(0, 3, 1, 2)


def predict_mask(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, gh, gw) logits -> (h, w) class ids, upsampling the logits bilinearly."""
    up = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) counts, rows = truth, columns = prediction; ignored pixels left out."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)


def iou_metrics(confusion: torch.Tensor, classnames: Sequence[str] | None = None) -> dict:
    """``mIoU``, ``pixel_accuracy``, ``mean_class_accuracy`` and ``per_class_iou``
    (None for classes absent from both truth and prediction)."""
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    truth = cm.sum(1)
    iou = [float(tp[i] / union[i]) if union[i] > 0 else None for i in range(cm.shape[0])]
    acc = [float(tp[i] / truth[i]) for i in range(cm.shape[0]) if truth[i] > 0]
    valid = [v for v in iou if v is not None]
    names = list(classnames) if classnames is not None else [str(i) for i in range(cm.shape[0])]
    return {
        "mIoU": sum(valid) / len(valid) if valid else math.nan,
        "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() > 0 else math.nan,
        "mean_class_accuracy": sum(acc) / len(acc) if acc else math.nan,
        "per_class_iou": dict(zip(names, iou)),
    }


@torch.no_grad()
def evaluate_segmentation(
    model,
    images: Sequence,
    masks: Sequence,
    class_features: torch.Tensor,
    variants: Sequence[tuple[str, str, object]] = (("mean", "mean", None),),
    classnames: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    ignore_index: int = IGNORE_INDEX,
    progress: bool = False,
    skipped: list | None = None,
) -> dict[str, dict]:
    """mIoU for each ``(label, fusion, branches)`` variant, from one dense pass over the data.

    images: paths / bytes / PIL images; masks: class-index PNG paths or (h, w) tensors. With a
    ``skipped`` list, a pair whose image or mask file cannot be read is left out and recorded
    there (as :func:`encode_images` does); without one it is a :class:`DataError`. A mask with
    values that are not classes is always an error.
    """
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    num_classes = class_features.shape[0]
    transform = dense_transform(model.image_size)
    names = tuple(model.branch_names)
    cms = {label: torch.zeros(num_classes, num_classes, dtype=torch.long) for label, _, _ in variants}
    bad: list[dict] = []
    for s in tqdm(range(0, len(images), batch_size), desc="dense", unit="batch", disable=not progress):
        xs, truths = [], []
        for k in range(s, min(s + batch_size, len(images))):
            source = images[k]
            try:
                x = transform(open_image(source))
                source = masks[k]
                truth = source if isinstance(source, torch.Tensor) else load_mask(source, num_classes, ignore_index)
            except DataError:
                raise
            except UNREADABLE as err:
                bad.append(unreadable(k, source, err))
                continue
            xs.append(x)
            truths.append(truth)
        if bad and skipped is None:
            raise DataError(f"{bad[0]['image']}: unreadable ({bad[0]['error']})")
        if not xs:
            continue
        dense = model.encode_dense(torch.stack(xs).to(device), normalize=True).float().cpu()
        for label, fusion, branches in variants:
            logits = patch_logits(dense, class_features, fusion, branches, names)
            for lg, truth in zip(logits, truths):
                cms[label] += confusion_matrix(predict_mask(lg, tuple(truth.shape)), truth, num_classes, ignore_index)
    if bad and len(bad) == len(images):
        raise no_readable_images(bad)
    if skipped is not None:
        skipped.extend(bad)
    return {label: iou_metrics(cm, classnames) for label, cm in cms.items()}

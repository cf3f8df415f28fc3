"""Linear probe of dense features: a per-patch linear classifier on frozen patch tokens,
trained on one split's masks and scored by mIoU on another (the standard test of dense
features, e.g. DINOv2's linear segmentation probe).

Tokens: the patch tokens after the image tower's last block, through the shared ``ln_post``
(``forward_intermediates(..., normalize_intermediates=True)``). Psi_CLS has one token stream
shared by all branches; Psi_MLP forks the stream in its last L blocks, so each branch has its
own patch tokens there (:func:`patch_token_streams` returns one stream per branch then).

Targets: each patch's class distribution (the fraction of its pixels of each class, the
background a class of its own), so a patch's target is the mean of its pixels' one-hot labels.
The classifier is ridge regression of those targets on the standardised tokens, solved in closed
form (a least-squares linear classifier, as scikit-learn's RidgeClassifier; deterministic,
``seed`` only draws the training subset). Predictions: the patch grid's scores upsampled
bilinearly to the mask size, argmax; mIoU over the object classes and the
background, as :func:`holiclip.evaluation.dense.iou_metrics` computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dense import confusion_matrix, iou_metrics


@dataclass
class LinearProbe:
    weight: torch.Tensor  # (K, W) on standardised tokens
    bias: torch.Tensor  # (K,)
    mean: torch.Tensor  # (W,)
    std: torch.Tensor  # (W,)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., W) tokens -> (..., K) class scores."""
        return ((tokens.float() - self.mean) / self.std) @ self.weight.T + self.bias


@torch.no_grad()
def patch_token_streams(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, S, S) normalised images -> (streams, N, P, W) patch tokens after the last block
    (``ln_post`` applied): streams = 1 when the branches share the token stream (Psi_CLS,
    H = 1), H for Psi_MLP's forked blocks."""
    visual = model.visual
    out = []
    for s in range(0, len(images), batch_size):
        state = model.forward_intermediates(images[s: s + batch_size], image_indices=[-1],
                                            normalize_intermediates=True, intermediates_only=True)
        state = state["image_intermediates"][0]
        state = state if state.dim() == 4 else state.unsqueeze(0)
        out.append(state[:, :, visual.num_prefix_tokens:].float())
    return torch.cat(out, dim=1)


def patch_targets(masks: torch.Tensor, grid: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(N, h, w) class masks (0..C-1 objects, -1 background) -> (N, gh * gw, C + 1) fraction of
    each patch's pixels per class; the background is class C. h, w must be multiples of the grid."""
    n, h, w = masks.shape
    gh, gw = grid
    if h % gh or w % gw:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the patch grid {gh}x{gw}")
    labels = masks.long().clone()
    if ((labels < -1) | (labels >= num_classes)).any():
        bad = int(labels[(labels < -1) | (labels >= num_classes)][0])
        raise ValueError(f"mask value {bad} is not a class (0..{num_classes - 1}) or -1 (background)")
    labels[labels < 0] = num_classes
    onehot = F.one_hot(labels, num_classes + 1).float()  # (N, h, w, K)
    onehot = onehot.view(n, gh, h // gh, gw, w // gw, num_classes + 1)
    return onehot.mean(dim=(2, 4)).reshape(n, gh * gw, num_classes + 1)


def fit_probe(tokens: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> LinearProbe:
    """tokens (N, P, W), targets (N, P, K) class fractions -> the fitted :class:`LinearProbe`:
    ridge regression of the class fractions on the standardised tokens (penalty ``ridge`` x the
    number of patches), solved in closed form (a least-squares linear classifier: deterministic,
    and a fraction of a second for 10^5 patches where an iterative logistic fit takes minutes)."""
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    y = targets.reshape(-1, targets.shape[-1]).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y_mean = y.mean(0)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weight = torch.linalg.solve(gram, x.T @ (y - y_mean)).T  # (K, W); centred, so the bias is the mean
    return LinearProbe(weight.float(), y_mean.float(), mean.float(), std.float())


@torch.no_grad()
def probe_miou(probe: LinearProbe, tokens: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int],
               num_classes: int, classnames: Sequence[str] | None = None, batch_size: int = 256) -> dict:
    """mIoU etc. (:func:`iou_metrics`) of the probe's upsampled predictions against (N, h, w)
    masks (-1 = background, scored as class C)."""
    k = num_classes + 1
    cm = torch.zeros(k, k, dtype=torch.long)
    for s in range(0, len(tokens), batch_size):
        logits = probe.scores(tokens[s: s + batch_size])  # (B, P, K)
        logits = logits.transpose(1, 2).reshape(logits.shape[0], k, *grid)
        truth = masks[s: s + batch_size].long().clone()
        truth[truth < 0] = num_classes
        pred = F.interpolate(logits, size=tuple(truth.shape[1:]), mode="bilinear", align_corners=False).argmax(1)
        cm += confusion_matrix(pred, truth, k, ignore_index=-1)
    names = list(classnames) + ["background"] if classnames is not None else None
    return iou_metrics(cm, names)


def linear_probe(train_tokens: torch.Tensor, train_masks, test_tokens: torch.Tensor, test_masks,
                 num_classes: int, grid: tuple[int, int], classnames: Sequence[str] | None = None,
                 max_train: int | None = None, seed: int = 0, ridge: float = 1e-3) -> dict:
    """Fits a probe on (a seeded subset of ``max_train``) training images' patch tokens (N, P, W)
    and masks (N, h, w), and scores it on the test images: :func:`iou_metrics`' dict."""
    train_masks = torch.as_tensor(np.asarray(train_masks))
    test_masks = torch.as_tensor(np.asarray(test_masks))
    if len(train_tokens) != len(train_masks) or len(test_tokens) != len(test_masks):
        raise ValueError(f"tokens and masks differ in number: train {len(train_tokens)} vs {len(train_masks)}, "
                         f"test {len(test_tokens)} vs {len(test_masks)}")
    if max_train is not None and len(train_tokens) > max_train:
        keep = torch.randperm(len(train_tokens), generator=torch.Generator().manual_seed(seed))[:max_train]
        train_tokens, train_masks = train_tokens[keep], train_masks[keep]
    probe = fit_probe(train_tokens, patch_targets(train_masks, grid, num_classes), ridge)
    return probe_miou(probe, test_tokens, test_masks, grid, num_classes, classnames)

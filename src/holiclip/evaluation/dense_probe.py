"""Linear probe of dense features: a per-patch linear classifier on frozen patch tokens,
trained on one split's masks and scored by mIoU on another (the standard test of dense
features, e.g. DINOv2's linear segmentation probe).

Tokens: the patch tokens after the image tower's last block, through the shared ``ln_post``
(``forward_intermediates(..., normalize_intermediates=True)``). Psi_CLS has one token stream
shared by all branches; Psi_MLP forks the stream in its last L blocks, so each branch has its
own patch tokens there (:func:`patch_token_streams` returns one stream per branch then).

Targets: each patch's class distribution (the fraction of its pixels of each class); the
soft-target cross-entropy on a patch equals the pixel cross-entropy of a score held constant
over the patch. Background pixels are left out (``background="ignore"``, the protocol of the
zero-shot dense evaluation: object pixels, object classes) or are one more class
(``"class"``). The classifier is multinomial logistic regression on standardised tokens with
an L2 penalty, fitted full batch by L-BFGS from zero (deterministic; ``seed`` only draws the
training subset). Predictions: the patch grid's scores upsampled bilinearly to the mask size,
argmax; mIoU as :func:`holiclip.evaluation.dense.iou_metrics` computes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dense import IGNORE_INDEX, confusion_matrix, iou_metrics


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


def fit_probe(tokens: torch.Tensor, targets: torch.Tensor, weight_decay: float = 1e-4,
              max_iter: int = 50) -> LinearProbe:
    """tokens (N, P, W), targets (N, P, K) class fractions (rows may sum to less than 1: the
    ignored pixels) -> the fitted :class:`LinearProbe`: multinomial logistic regression on the
    standardised tokens, soft-target cross-entropy weighted by each patch's scored pixels, L2
    penalty, full-batch L-BFGS from zero (deterministic)."""
    x = tokens.reshape(-1, tokens.shape[-1]).float()
    y = targets.reshape(-1, targets.shape[-1]).float()
    keep = y.sum(1) > 0  # patches of ignored pixels only carry no loss
    x, y = x[keep], y[keep]
    if not len(x):
        raise ValueError("no patch with a pixel to learn from")
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    x = (x - mean) / std
    weight = torch.zeros(y.shape[1], x.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")
    total = y.sum()

    def closure():
        opt.zero_grad()
        logp = F.log_softmax(x @ weight.T + bias, dim=1)
        loss = -(y * logp).sum() / total + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


@torch.no_grad()
def probe_miou(probe: LinearProbe, tokens: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int],
               num_classes: int, classnames: Sequence[str] | None = None, background: str = "ignore",
               batch_size: int = 128) -> dict:
    """:func:`iou_metrics` of the probe's upsampled predictions against (N, h, w) masks (-1 =
    background: left out with ``background="ignore"``, scored as class C with ``"class"``)."""
    k = num_classes + (background == "class")
    cm = torch.zeros(k, k, dtype=torch.long)
    for s in range(0, len(tokens), batch_size):
        scores = probe.scores(tokens[s: s + batch_size])  # (B, P, K)
        scores = scores.transpose(1, 2).reshape(scores.shape[0], k, *grid)
        truth = masks[s: s + batch_size].long().clone()
        truth[truth < 0] = num_classes if background == "class" else IGNORE_INDEX
        pred = F.interpolate(scores, size=tuple(truth.shape[1:]), mode="bilinear", align_corners=False).argmax(1)
        cm += confusion_matrix(pred, truth, k, ignore_index=IGNORE_INDEX)
    names = None if classnames is None else list(classnames) + (["background"] if background == "class" else [])
    return iou_metrics(cm, names)


def linear_probe(train_tokens: torch.Tensor, train_masks, test_tokens: torch.Tensor, test_masks,
                 num_classes: int, grid: tuple[int, int], classnames: Sequence[str] | None = None,
                 max_train: int | None = None, seed: int = 0, background: str = "ignore") -> dict:
    """Fits a probe on (a seeded subset of ``max_train``) training images' patch tokens (N, P, W)
    and masks (N, h, w), and scores it on the test images: :func:`iou_metrics`' dict.
    ``background``: ``"ignore"`` (object pixels and classes only, the protocol of the zero-shot
    :func:`~holiclip.evaluation.dense.evaluate_segmentation` on masks whose background is the
    ignore index) or ``"class"`` (the background is one more class, as in VOC)."""
    if background not in ("ignore", "class"):
        raise ValueError(f"background must be 'ignore' or 'class', got {background!r}")
    train_masks = torch.as_tensor(np.asarray(train_masks))
    test_masks = torch.as_tensor(np.asarray(test_masks))
    if len(train_tokens) != len(train_masks) or len(test_tokens) != len(test_masks):
        raise ValueError(f"tokens and masks differ in number: train {len(train_tokens)} vs {len(train_masks)}, "
                         f"test {len(test_tokens)} vs {len(test_masks)}")
    if max_train is not None and len(train_tokens) > max_train:
        keep = torch.randperm(len(train_tokens), generator=torch.Generator().manual_seed(seed))[:max_train]
        train_tokens, train_masks = train_tokens[keep], train_masks[keep]
    targets = patch_targets(train_masks, grid, num_classes)
    if background == "ignore":
        targets = targets[..., :num_classes]
    probe = fit_probe(train_tokens, targets)
    return probe_miou(probe, test_tokens, test_masks, grid, num_classes, classnames, background)

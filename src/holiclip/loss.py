"""Multi-to-multi (M2M) contrastive loss of Holistic CLIP (Wang et al., CVPR 2025, sec. 3).

Image features (B, H, D) from H branches, text features (B, M, D) from M text slots.
Branch k pairs with slot k for k < min(H, M); each extra text slot (M > H) pairs, per sample,
with the branch most similar to that sample's own text ("free matching"; H = 1 is the
one-to-many "O2M" baseline). Every pair is a symmetric InfoNCE over the (global) batch, all
slots computed at once. With H = M = 1 this is exactly open_clip's ``ClipLoss``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _compat

_compat.ensure_torchvision_importable()
from open_clip.loss import gather_features  # noqa: E402


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    torch.distributed.nn.all_gather's backward (an all-to-all on gloo) reads non-contiguous
    gradients in the wrong order; ours are transposed views, so without this the gradients of
    a gather-with-grad run are silently wrong (measured: the 2-rank test fails).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def pair_branches(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Image embedding paired with each text slot: (B, M, D)."""
    num_branches, num_slots = image_features.shape[1], text_features.shape[1]
    if num_slots <= num_branches:
        return image_features[:, :num_slots]
    extra = text_features[:, num_branches:]
    with torch.no_grad():  # greedy argmax per sample; the choice itself carries no gradient
        best = torch.einsum("bhd,bmd->bmh", image_features, extra).argmax(dim=-1)
    chosen = torch.gather(image_features, 1, best.unsqueeze(-1).expand(-1, -1, image_features.shape[-1]))
    return torch.cat([image_features, chosen], dim=1)


def diversity_penalty(image_features: torch.Tensor, margin: float) -> torch.Tensor:
    """max(0, mean_{h != h'} batch-mean cos(v_h, v_h') - margin); zero for H = 1."""
    num_branches = image_features.shape[1]
    if num_branches < 2:
        return image_features.sum() * 0.0
    gram = torch.einsum("bhd,bgd->hg", image_features, image_features) / image_features.shape[0]
    off_diag = gram.sum() - gram.diagonal().sum()
    return F.relu(off_diag / (num_branches * (num_branches - 1)) - margin)


class M2MLoss(nn.Module):
    """open_clip ``ClipLoss``-style loss for (B, H, D) image and (B, M, D) text features.

    ``forward(..., output_dict=True)`` returns named terms that sum to the total:
    ``contrastive_loss`` ((1 - fused_weight) x M2M), ``fused_loss`` (fused_weight x O2M on the
    renormalised mean embedding; ours, beyond the paper; only when fused_weight > 0) and
    ``diversity_loss`` (the research code's regulariser; only when diversity_margin is set).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        diversity_margin: float | None = None,
        diversity_weight: float = 1.0,
        fused_weight: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= fused_weight <= 1.0:
            raise ValueError(f"fused_weight must be in [0, 1], got {fused_weight}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.diversity_margin = diversity_margin
        self.diversity_weight = diversity_weight
        self.fused_weight = fused_weight

    def _infonce(self, image: torch.Tensor, text: torch.Tensor, logit_scale) -> torch.Tensor:
        """Symmetric InfoNCE per slot, averaged over slots. image/text: (B, M, D) local."""
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image, text, self.local_loss, self.gather_with_grad, self.rank, self.world_size
            )
            all_image, all_text = _ContiguousGrad.apply(all_image), _ContiguousGrad.apply(all_text)
        else:
            all_image, all_text = image, text
        # slots first: (M, B, D)
        image, text = image.transpose(0, 1), text.transpose(0, 1)
        all_image, all_text = all_image.transpose(0, 1), all_text.transpose(0, 1)
        if self.world_size > 1 and self.local_loss:
            logits_per_image = logit_scale * image @ all_text.transpose(1, 2)
            logits_per_text = logit_scale * text @ all_image.transpose(1, 2)
            offset = image.shape[1] * self.rank
        else:
            logits_per_image = logit_scale * all_image @ all_text.transpose(1, 2)
            logits_per_text = logits_per_image.transpose(1, 2)
            offset = 0
        num_slots, rows, cols = logits_per_image.shape
        labels = (torch.arange(rows, device=image.device) + offset).repeat(num_slots)
        return (
            F.cross_entropy(logits_per_image.reshape(-1, cols), labels)
            + F.cross_entropy(logits_per_text.reshape(-1, cols), labels)
        ) / 2

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        if image_features.dim() == 2:
            image_features = image_features.unsqueeze(1)
        if text_features.dim() == 2:
            text_features = text_features.unsqueeze(1)
        if image_features.shape[-1] != text_features.shape[-1]:
            raise ValueError(
                f"embedding sizes differ: image {tuple(image_features.shape)} vs text {tuple(text_features.shape)}"
            )
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(
                f"batch sizes differ: image {tuple(image_features.shape)} vs text {tuple(text_features.shape)}"
            )
        losses = {}
        w = self.fused_weight
        if w < 1.0:
            paired = pair_branches(image_features, text_features)
            losses["contrastive_loss"] = (1.0 - w) * self._infonce(paired, text_features, logit_scale)
        else:  # documented as always present
            losses["contrastive_loss"] = image_features.sum() * 0.0
        if w > 0.0:
            fused = F.normalize(image_features.mean(dim=1), dim=-1)
            fused = fused.unsqueeze(1).expand_as(text_features)
            losses["fused_loss"] = w * self._infonce(fused, text_features, logit_scale)
        if self.diversity_margin is not None:
            losses["diversity_loss"] = self.diversity_weight * diversity_penalty(
                image_features, self.diversity_margin
            )
        if output_dict:
            return losses
        return sum(losses.values())

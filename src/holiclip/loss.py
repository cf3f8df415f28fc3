"""Multi-to-multi (M2M) contrastive loss of Holistic CLIP (Wang et al., CVPR 2025, sec. 3).

Image features (B, H, D) from H branches, text features (B, M, D) from M text slots.
With H = M branch k pairs with slot k. Otherwise slots are "free-matched": per sample, a slot
pairs with the branch most similar to that sample's own text (greedy argmax, no gradient through
the choice). For H < M only the extra slots M > H are free-matched (slots 0..H-1 go by index;
H = 1 is the one-to-many "O2M" baseline); for H > M every slot is free-matched over all H
branches, as in the research code, so no branch is left untrained. Every slot is a symmetric
InfoNCE over the (global) batch, all slots computed at once. With H = M = 1 this is exactly
open_clip's ``ClipLoss``.

``free_matching="paired"`` (default) represents each image by its chosen branch in both
directions, whereas ``"research"`` (the authors' code) compares, in the text-to-image direction,
every image on the branch chosen for the query text's own image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch import nn


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


def branch_choice(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Branch index that trains each text slot, per sample: (B, M) long.

    By index when H = M, and for slots m < H when H < M; otherwise the argmax over all H
    branches of the similarity with the sample's own text in that slot.
    """
    batch, num_branches = image_features.shape[:2]
    num_slots = text_features.shape[1]
    index = torch.arange(num_slots, device=image_features.device).expand(batch, num_slots)
    if num_branches == num_slots:
        return index
    with torch.no_grad():  # the choice itself carries no gradient
        best = torch.einsum("bhd,bmd->bmh", image_features, text_features).argmax(dim=-1)
    if num_branches > num_slots:
        return best
    return torch.where(index < num_branches, index, best)


def _select(image_features: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """image_features[b, choice[b, m]] for every (b, m): (B, M, D)."""
    return torch.gather(image_features, 1, choice.unsqueeze(-1).expand(-1, -1, image_features.shape[-1]))


def pair_branches(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Image embedding paired with each text slot: (B, M, D)."""
    return _select(image_features, branch_choice(image_features, text_features))


def diversity_penalty(image_features: torch.Tensor, margin: float) -> torch.Tensor:
    """max(0, mean_{h != h'} batch-mean cos(v_h, v_h') - margin); zero for H = 1."""
    num_branches = image_features.shape[1]
    if num_branches < 2:
        return image_features.sum() * 0.0
    gram = torch.einsum("bhd,bgd->hg", image_features, image_features) / image_features.shape[0]
    off_diag = gram.sum() - gram.diagonal().sum()
    return F.relu(off_diag / (num_branches * (num_branches - 1)) - margin)


def gather_problem(local_loss: bool, gather_with_grad: bool, world_size: int) -> tuple[str, str] | None:
    """What goes wrong in a multi-rank run's gradient with these settings: (severity, reason) with
    severity ``error`` or ``warning``; None when the gradient is the full-batch one (gather_with_grad,
    or one rank).

    Without ``gather_with_grad`` the other ranks' features are constants, so a rank's gradient
    reaches its own samples only through its own part of the loss (tests/test_loss_distributed.py).
    """
    if gather_with_grad or world_size <= 1:
        return None
    if local_loss:
        return "error", (
            "loss.local_loss=true with loss.gather_with_grad=false trains with a wrong gradient on several ranks: "
            "each rank's loss sees the other ranks' features as constants, so the gradient a sample gets as a "
            "negative in the other ranks' losses is lost (not a scale: the direction changes); set "
            "loss.gather_with_grad=true (open_clip's --local-loss --gather-with-grad)")
    return "warning", (
        f"loss.local_loss=false with loss.gather_with_grad=false on {world_size} ranks: every rank computes the "
        "whole batch's loss but its gradient flows through its own samples only, so after DDP averages the "
        f"ranks the towers get 1/{world_size} of the full-batch gradient while the logit scale gets all of it "
        "(AdamW largely normalises the scale away, but optim.grad_clip clips a norm weighted otherwise, and "
        "eps weighs more); set loss.gather_with_grad=true for the full-batch gradient")


class M2MLoss(nn.Module):
    """open_clip ``ClipLoss``-style loss for (B, H, D) image and (B, M, D) text features.

    ``forward(..., output_dict=True)`` returns named terms that sum to the total:
    ``contrastive_loss`` ((1 - fused_weight) x M2M), ``fused_loss`` (fused_weight x O2M on the
    renormalised mean embedding; ours, beyond the paper; only when fused_weight > 0) and
    ``diversity_loss`` (the research code's regulariser; only when diversity_margin is set).
    ``free_matching``: ``"paired"`` or ``"research"``, the text-to-image logits of free-matched
    slots (module docstring).
    """

    FREE_MATCHING = ("paired", "research")

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        diversity_margin: float | None = None,
        diversity_weight: float = 1.0,
        fused_weight: float = 0.0,
        free_matching: str = "paired",
    ):
        super().__init__()
        if not 0.0 <= fused_weight <= 1.0:
            raise ValueError(f"fused_weight must be in [0, 1], got {fused_weight}")
        if free_matching not in self.FREE_MATCHING:
            raise ValueError(
                f"free_matching must be one of {', '.join(map(repr, self.FREE_MATCHING))}, got {free_matching!r}"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.diversity_margin = diversity_margin
        self.diversity_weight = diversity_weight
        self.fused_weight = fused_weight
        self.free_matching = free_matching

    def _infonce(self, image: torch.Tensor, text: torch.Tensor, logit_scale, research: bool = False) -> torch.Tensor:
        """Symmetric InfoNCE per slot, averaged over slots. image (B, H, D) branches, text (B, M, D), local."""
        if self.world_size > 1:
            # all H branches are gathered: research mode scores other ranks' images on any branch
            all_image, all_text = gather_features(
                image, text, self.local_loss, self.gather_with_grad, self.rank, self.world_size
            )
            all_image, all_text = _ContiguousGrad.apply(all_image), _ContiguousGrad.apply(all_text)
        else:
            all_image, all_text = image, text
        local = self.world_size > 1 and self.local_loss
        # query rows: this rank's with a local loss, else the whole (global) batch
        rows_image, rows_text = (image, text) if local else (all_image, all_text)
        choice = branch_choice(rows_image, rows_text)  # (R, M)
        # slots first: (M, R, D) queries against (M, K, D) candidates
        paired = _select(rows_image, choice).transpose(0, 1)
        logits_per_image = logit_scale * paired @ all_text.transpose(0, 1).transpose(1, 2)
        num_branches, num_slots = image.shape[1], text.shape[1]
        if research and num_branches not in (1, num_slots):  # else every query's branch is fixed: same as paired
            # query text j scores every image k on branch choice[j]; masking the other branches of
            # the query makes that one matmul over the flattened (H x D) image features
            onehot = F.one_hot(choice, num_branches).to(rows_text.dtype)  # (R, M, H)
            queries = (rows_text.unsqueeze(2) * onehot.unsqueeze(-1)).transpose(0, 1).flatten(2)
            logits_per_text = logit_scale * queries @ all_image.flatten(1).T
        elif local:
            all_paired = pair_branches(all_image, all_text).transpose(0, 1)
            logits_per_text = logit_scale * rows_text.transpose(0, 1) @ all_paired.transpose(1, 2)
        else:
            logits_per_text = logits_per_image.transpose(1, 2)
        offset = image.shape[0] * self.rank if local else 0
        rows, cols = logits_per_image.shape[1:]
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
            losses["contrastive_loss"] = (1.0 - w) * self._infonce(
                image_features, text_features, logit_scale, research=self.free_matching == "research"
            )
        else:  # documented as always present
            losses["contrastive_loss"] = image_features.sum() * 0.0
        if w > 0.0:
            fused = F.normalize(image_features.mean(dim=1), dim=-1).unsqueeze(1)  # one branch: O2M
            losses["fused_loss"] = w * self._infonce(fused, text_features, logit_scale)
        if self.diversity_margin is not None:
            losses["diversity_loss"] = self.diversity_weight * diversity_penalty(
                image_features, self.diversity_margin
            )
        if output_dict:
            return losses
        return sum(losses.values())

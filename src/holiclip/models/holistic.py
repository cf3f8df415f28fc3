"""HolisticCLIP: an open_clip CLIP whose image tower has H named output branches
(Wang et al., CVPR 2025, arXiv 2412.00440).

``encode_image`` -> (B, H, D) and ``encode_text`` -> (N, D). As in open_clip, the ``encode_*``
methods L2-normalise only with ``normalize=True`` and ``forward`` (training) returns normalised
features. The text tower is open_clip's, unchanged (built-in transformer or Hugging Face tower).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .branches import MultiBranchViT
from .fusion import fuse


class HolisticCLIP(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        branches: Sequence[str],
        encoder: str = "cls",
        mlp_layers: int = 3,
        model_name: str = "",
    ):
        super().__init__()
        branches = tuple(branches)
        if len(set(branches)) != len(branches) or not branches:
            raise ValueError(f"branch names must be unique and non-empty, got {branches}")
        self.model_name = model_name
        self.branch_names = branches
        self.encoder = encoder
        self.clip = clip
        self.clip.visual = MultiBranchViT(clip.visual, len(branches), encoder, mlp_layers)

    # -- properties in open_clip's style ---------------------------------------------------
    @property
    def visual(self) -> MultiBranchViT:
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def num_branches(self) -> int:
        return len(self.branch_names)

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def image_size(self):
        return self.visual.image_size

    def no_weight_decay(self) -> set[str]:
        """Exempt from weight decay beyond open_clip's rule (1-D, norms, biases): the class tokens."""
        return {"clip.logit_scale"} | {f"clip.visual.{n}" for n in self.visual.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if hasattr(self.clip, "text"):
            self.clip.text.set_grad_checkpointing(enable)
        else:
            self.clip.transformer.grad_checkpointing = enable

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        self.clip.lock_text_tower(unlocked_layers, freeze_layer_norm)
        self.train(self.training)

    def train(self, mode: bool = True):
        """A frozen HF text trunk stays in eval mode: no dropout on features that never train
        (and the same features a cached trunk gives)."""
        super().train(mode)
        if mode and self.text_trunk_frozen():
            self.clip.text.transformer.eval()
        return self

    # -- encoders --------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, S, S) -> (B, H, D), one embedding per branch."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def _is_hf_text(self) -> bool:
        return hasattr(self.clip, "text") and hasattr(self.clip.text, "pooler")

    def _trim_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drops trailing all-padding columns for HF towers: their attention and pooling mask
        padding, so outputs are unchanged while short texts stop paying for the full context."""
        if not self._is_hf_text() or tokens.numel() == 0:
            return tokens
        real = (tokens != self.clip.text.config.pad_token_id).any(dim=0).nonzero()
        return tokens[:, : int(real.max()) + 1] if real.numel() else tokens[:, :1]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(N, L) -> (N, D); (B, M, L) -> (B, M, D)."""
        lead = tokens.shape[:-1]
        flat = self._trim_padding(tokens.reshape(-1, tokens.shape[-1]))
        x = self.clip.encode_text(flat, normalize=normalize)
        return x.reshape(*lead, x.shape[-1])

    def encode_image_fused(self, images, mode: str = "mean", branches=None) -> torch.Tensor:
        """(B, D): the branches fused by :func:`~holiclip.models.fusion.fuse`, which takes unit-norm
        branch embeddings."""
        features = self.encode_image(images, normalize=True)
        return fuse(features, mode=mode, branches=branches, names=self.branch_names)

    def encode_dense(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Per-branch patch embeddings in the joint space, (B, H, gh, gw, D); L2-normalised per
        patch with ``normalize=True``, like ``encode_image``."""
        x = self.visual.dense(images)
        return F.normalize(x, dim=-1) if normalize else x

    def attention_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Per-branch class-token attention over patches in the last block, (B, H, gh, gw)."""
        return self.visual.attention_maps(images)

    def encode_image_tokens(
        self,
        images: torch.Tensor,
        branch: str | int | None = None,
        layer: int | Sequence[int] = -2,
        all_class_tokens: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Token states (B, T, W) of the image tower at ``layer``, as a multimodal LLM reads them
        (LLaVA: the penultimate layer's class and patch tokens).

        ``layer`` indexes the L + 1 hidden states as Hugging Face's ``hidden_states`` and LLaVA's
        ``vision_feature_layer`` do: 0 is the embeddings (the first block's input, after
        ``ln_pre``), k >= 1 the output of block k - 1 (``forward_intermediates`` index k - 1),
        negative k counts from the end (-1 the last block's output, -2 the penultimate's). A
        list of layers gives a list of states, from one pass.

        The tokens, in order: class tokens, then the P patch tokens in row-major order, as states
        (no ``ln_post``):

        * ``branch`` named (or its index): that branch's class token, then its patches, T = 1 + P
          (CLIP's layout). Psi_CLS: class token h of the H, the shared patches. Psi_MLP: the
          branch's own stream after the fork (block ``visual.fork_at``), the shared one before.
        * ``branch`` named with ``all_class_tokens``: every branch's class token in
          ``branch_names`` order, then the named branch's patches, T = H + P.
        * ``branch=None``: every branch's class token, then the patches all branches share,
          T = H + P; for Psi_CLS the state ``forward_intermediates`` returns as it is. Psi_MLP's
          streams differ after its fork, so reading a layer there needs a named branch.

        Before Psi_MLP's fork all branches read its one class token, which then appears H times
        wherever H class tokens are returned, so T does not depend on the layer (LLaVA concatenates
        several layers' tokens feature-wise).
        """
        layers = [layer] if isinstance(layer, int) else list(layer)
        states = self.visual.hidden_states(images, layers, branch_index(self.branch_names, branch), all_class_tokens)
        return states[0] if isinstance(layer, int) else states

    def forward_intermediates(
        self,
        image: torch.Tensor,
        image_indices: int | Sequence[int] | None = None,
        stop_early: bool = False,
        normalize: bool = True,
        normalize_intermediates: bool = False,
        intermediates_only: bool = False,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """The image side of open_clip's ``CLIP.forward_intermediates``: token states of the
        requested blocks (see :meth:`MultiBranchViT.forward_intermediates` for their shapes) and
        the branch embeddings ``image_features``, L2-normalised with ``normalize`` (open_clip's
        default here too)."""
        out = self.visual.forward_intermediates(
            image, indices=image_indices, stop_early=stop_early,
            normalize_intermediates=normalize_intermediates, intermediates_only=intermediates_only,
        )
        if normalize and "image_features" in out:
            out["image_features"] = F.normalize(out["image_features"], dim=-1)
        return out

    # -- text trunk / head split (lets a trainer cache a frozen trunk's outputs) ------------
    def text_trunk(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text features before the final projection, (N, W)."""
        if self._is_hf_text():
            text = self.clip.text
            tokens = self._trim_padding(tokens)
            mask = (tokens != text.config.pad_token_id).long()
            return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)
        raise NotImplementedError("text_trunk is available for Hugging Face text towers")

    def text_head(self, trunk_features: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """The rest of :meth:`encode_text`: ``text_head(text_trunk(t), n) == encode_text(t, n)``."""
        x = self.clip.text.proj(trunk_features)
        return F.normalize(x, dim=-1) if normalize else x

    def text_trunk_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights :meth:`text_trunk` depends on (a cache of its outputs is keyed by them)."""
        if not self._is_hf_text():
            raise NotImplementedError("text_trunk is available for Hugging Face text towers")
        text = self.clip.text
        return {**{f"transformer.{k}": v for k, v in text.transformer.state_dict().items()},
                **{f"pooler.{k}": v for k, v in text.pooler.state_dict().items()}}

    def text_trunk_frozen(self) -> bool:
        if not self._is_hf_text():
            return False
        trunk = list(self.clip.text.transformer.parameters()) + list(self.clip.text.pooler.parameters())
        return not any(p.requires_grad for p in trunk)

    def forward(self, images=None, texts=None, text_trunk_features=None) -> dict:
        """L2-normalised features for training, as open_clip's ``CLIP.forward``;
        ``text_trunk_features`` are cached outputs of a frozen trunk."""
        out = {"logit_scale": self.logit_scale.exp()}
        if images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if texts is not None:
            out["text_features"] = self.encode_text(texts, normalize=True)
        if text_trunk_features is not None:
            out["text_features"] = self.text_head(text_trunk_features, normalize=True)
        return out


def branch_index(names: Sequence[str], branch: str | int | None) -> int | None:
    """``branch`` (a name in ``names`` or an index) as an index; None stays None."""
    if branch is None:
        return None
    if isinstance(branch, int) and not isinstance(branch, bool):
        if not 0 <= branch < len(names):
            raise ValueError(f"branch index {branch} out of range: the model has {len(names)} branches {list(names)}")
        return branch
    if branch not in names:
        raise ValueError(f"unknown branch {branch!r}; the model's branches are {list(names)}")
    return list(names).index(branch)

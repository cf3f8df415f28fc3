"""open_clip's entry point (``open_clip.factory``'s ``create_model_and_transforms``) for holiclip,
so code written for open_clip runs after changing the import.

open_clip's ``encode_image`` gives one (B, D) embedding; a HolisticCLIP gives one per branch,
(B, H, D). :class:`FusedCLIP` is the open_clip view: its ``encode_image`` fuses the branches
(``fusion`` mode, optional branch subset) and everything else is the HolisticCLIP's, which stays
reachable as ``model.holistic``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import FUSION_MODES, select_branches
from .holistic import HolisticCLIP
from .registry import create_model, get_transforms, is_architecture, load_model
from .sources import is_model_source

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16, "pure_bf16": torch.bfloat16}


class FusedCLIP(nn.Module):
    """A HolisticCLIP with open_clip's interface: ``encode_image`` -> (B, D) fused branches,
    ``forward`` -> ``(image_features, text_features, logit_scale.exp())`` (a dict with
    ``output_dict=True``), as ``open_clip.CLIP``."""

    def __init__(self, model: HolisticCLIP, fusion: str = "mean", branches: Sequence[str | int] | None = None,
                 output_dict: bool = False):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {fusion!r}; choose from {list(FUSION_MODES)}")
        # checks the branch subset against the model's names now, not at the first batch
        select_branches(torch.zeros(1, model.num_branches, 1), branches, model.branch_names)
        self.holistic = model
        self.fusion = fusion
        self.fusion_branches = branches
        self.output_dict = output_dict

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # open_clip-style attributes (visual, context_length, branch_names, model_name, ...)
            return getattr(super().__getattr__("holistic"), name)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.holistic.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.holistic.encode_image_fused(images, mode=self.fusion, branches=self.fusion_branches)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.holistic.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            return {"image_features": image_features, "text_features": text_features,
                    "logit_scale": self.logit_scale.exp()}
        return image_features, text_features, self.logit_scale.exp()


def create_model_and_transforms(
    model_name: str,
    pretrained: str | None = None,
    *,
    encoder: str | None = None,
    branches: Sequence[str] | None = None,
    fusion: str | None = "mean",
    fusion_branches: Sequence[str | int] | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    output_dict: bool | None = None,
    **kwargs,
):
    """``(model, preprocess_train, preprocess_val)``, as ``open_clip.create_model_and_transforms``.

    model_name: a holiclip or open_clip architecture (``"holi-tiny"``, ``"ViT-B-32"``), or a saved
    holiclip model, anything :func:`load_model` reads: ``"hf-hub:ORG/NAME"``, a model or run folder, a
    ``.safetensors`` file, a ``step_*.pt`` checkpoint. pretrained (second, as in open_clip): an
    open_clip tag or a weights file for the architecture, or a saved holiclip model. encoder / branches: for a new model (default ``cls``, ``("global",)``);
    a saved model has its own, and naming other ones is an error. fusion: how ``encode_image`` fuses
    the branches (``holiclip.FUSION_MODES``); None returns the HolisticCLIP itself, whose
    ``encode_image`` gives (B, H, D). Other keyword arguments go to :func:`create_model`
    (``mlp_layers``, ``pretrained_text``, ``lock_text``).

    preprocess_train is open_clip's training transform, the one holiclip's trainer uses
    (``data.augment=true``); preprocess_val is its evaluation transform.
    """
    # an architecture's name wins over a folder of the same name in the working directory
    saved = model_name if not is_architecture(model_name) and is_model_source(model_name) else (
        pretrained if pretrained is not None and is_model_source(pretrained) else None)
    if saved is not None:
        if kwargs:
            raise TypeError(f"{sorted(kwargs)} apply to a new model, not to the saved model {saved}")
        model = load_model(saved, device=device)
        for key, wanted, have in (("encoder", encoder, model.encoder),
                                  ("branches", tuple(branches) if branches else None, model.branch_names)):
            if wanted is not None and wanted != have:
                raise ValueError(f"{saved} is a model with {key}={have!r}; {key}={wanted!r} was asked for")
    else:
        model = create_model(model_name, encoder=encoder or "cls", branches=tuple(branches or ("global",)),
                             pretrained=pretrained, device=device, **kwargs)
    if precision in _DTYPES:
        model = model.to(_DTYPES[precision])
    elif precision not in ("fp32", "amp", "amp_bf16", "amp_bfloat16"):
        raise ValueError(f"unknown precision {precision!r}; choose from fp32, amp, amp_bf16, {', '.join(_DTYPES)}")
    preprocess_train = get_transforms(model, is_train=True)
    preprocess_val = get_transforms(model, is_train=False)
    if fusion is not None:
        model = FusedCLIP(model, fusion=fusion, branches=fusion_branches, output_dict=bool(output_dict))
    return model, preprocess_train, preprocess_val

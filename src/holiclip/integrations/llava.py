"""The holistic image encoder as the vision tower of a LLaVA multimodal LLM (transformers'
``LlavaForConditionalGeneration``), the use in the paper's Tables 5-6.

    tower = HolisticVisionTower(model, branch="main")      # model: a HolisticCLIP
    config = LlavaConfig(vision_config=tower.config, text_config=LlamaConfig(...))
    llava = attach_vision_tower(LlavaForConditionalGeneration(config), tower)

LLaVA calls its tower as CLIP's, ``vision_tower(pixel_values, output_hidden_states=...,
return_dict=True)``, takes ``hidden_states[vision_feature_layer]`` (-2, the penultimate block's
output, by default; a list of layers is concatenated feature-wise) and with
``vision_feature_select_strategy="default"`` drops the first token, CLIP's class token
(``"full"`` keeps every token). The tower returns what ``CLIPVisionModel`` returns, a
``BaseModelOutputWithPooling``, with the tokens of :meth:`HolisticCLIP.encode_image_tokens`:

* a named ``branch``: its class token, then its P patch tokens (CLIP's layout): ``"default"``
  gives the patches, ``"full"`` the class token and the patches;
* ``all_class_tokens=True``, or ``branch=None`` (Psi_CLS only: Psi_MLP's branches have streams of
  their own): the H branches' class tokens, then the patches. Use ``"full"``: ``"default"`` drops
  only the first of the H class tokens, so :func:`attach_vision_tower` refuses that pairing (name
  a branch for patch tokens only).

``num_prefix_tokens`` is what LlavaProcessor calls ``num_additional_image_tokens``;
``num_image_tokens(strategy)`` is how many ``<image>`` tokens a prompt needs per image.
"""
from __future__ import annotations

from typing import Sequence

import torch
from open_clip.transformer import QuickGELU
from torch import nn

from .._extras import require
from ..models.holistic import HolisticCLIP, branch_index

CLIPVisionConfig = require("transformers", "caption", "holiclip.integrations.llava").CLIPVisionConfig
BaseModelOutputWithPooling = require("transformers.modeling_outputs", "caption",
                                     "holiclip.integrations.llava").BaseModelOutputWithPooling

STRATEGIES = ("default", "full")


def vision_config(model: HolisticCLIP) -> CLIPVisionConfig:
    """The image tower's sizes as the ``CLIPVisionConfig`` a ``LlavaConfig`` takes (LLaVA sizes its
    projector from ``hidden_size``; the rest describes the tower)."""
    visual = model.visual
    block = visual.transformer.resblocks[0]
    height, width = visual.image_size
    patch = visual.conv1.kernel_size
    return CLIPVisionConfig(
        hidden_size=visual.class_embedding.shape[-1],
        intermediate_size=block.mlp.c_fc.out_features,
        projection_dim=visual.output_dim,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=height if height == width else (height, width),
        patch_size=patch[0] if patch[0] == patch[1] else tuple(patch),
        hidden_act="quick_gelu" if isinstance(block.mlp.gelu, QuickGELU) else "gelu",
        layer_norm_eps=visual.ln_pre.eps,
    )


class HolisticVisionTower(nn.Module):
    """A drop-in for the ``CLIPVisionModel`` of a LLaVA model, reading one branch of a HolisticCLIP.

    ``branch``: a branch name (or index); None reads every branch's class token and the shared
    patches (Psi_CLS only). ``all_class_tokens``: with a named branch, every branch's class token
    (in ``branch_names`` order) before its patches instead of its own only. Holds the image
    tower only (the text tower stays out of the LLaVA model).
    """

    main_input_name = "pixel_values"

    def __init__(self, model: HolisticCLIP, branch: str | int | None = None, all_class_tokens: bool = False):
        super().__init__()
        if not isinstance(model, HolisticCLIP):
            raise TypeError(f"HolisticVisionTower takes a HolisticCLIP, got {type(model).__name__}")
        self.branch = branch_index(model.branch_names, branch)
        if self.branch is None and model.encoder == "mlp" and model.num_branches > 1:
            raise ValueError(
                f"Psi_MLP's branches have token streams of their own after the fork: name one with branch= "
                f"(one of {list(model.branch_names)})"
            )
        self.branch_names = model.branch_names
        self.all_class_tokens = all_class_tokens
        self.visual = model.visual
        self.config = vision_config(model)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def patch_size(self) -> int:
        """Read by LLaVA when it is given ``image_sizes``."""
        return self.config.patch_size

    @property
    def num_hidden_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_prefix_tokens(self) -> int:
        """Class tokens before the patches: 1 for a named branch, H with all class tokens."""
        return 1 if self.branch is not None and not self.all_class_tokens else len(self.branch_names)

    @property
    def num_patches(self) -> int:
        return self.visual.grid_size[0] * self.visual.grid_size[1]

    def num_image_tokens(self, strategy: str = "default") -> int:
        """Image tokens LLaVA puts in a prompt per image with this ``vision_feature_select_strategy``."""
        if strategy not in STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {STRATEGIES}, got {strategy!r}")
        return self.num_patches + self.num_prefix_tokens - (strategy == "default")

    def _check_pixels(self, pixel_values: torch.Tensor) -> None:
        size = tuple(self.visual.image_size)
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3 \
                or tuple(pixel_values.shape[2:]) != size:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(
                f"pixel_values must be (batch, 3, {size[0]}, {size[1]}), the tower's image size, got {shape}: "
                f"preprocess with holiclip.get_transforms(model)"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | Sequence[int] | None = None,
        return_dict: bool = True,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ):
        """As ``CLIPVisionModel.forward``: ``hidden_states`` has the L + 1 states (embeddings, then
        each block's output; with an int or list ``output_hidden_states``, as transformers >= 5
        passes LLaVA's ``vision_feature_layer``, only those are computed and the others are None),
        ``last_hidden_state`` the last block's tokens and ``pooler_output`` the class tokens after
        ``ln_post`` ((B, W) for one, (B, H, W) for H). Other keyword arguments a LLaVA forward
        passes on (``image_sizes``, loss arguments) do not change the tower's output."""
        if output_attentions:
            raise ValueError("HolisticVisionTower does not return attention weights (output_attentions)")
        if interpolate_pos_encoding:
            raise ValueError("HolisticVisionTower does not interpolate position embeddings: "
                             "resize images to the tower's image size")
        self._check_pixels(pixel_values)
        count = self.num_hidden_layers + 1
        if output_hidden_states is None or isinstance(output_hidden_states, bool):
            selected = list(range(count)) if output_hidden_states else []
        elif isinstance(output_hidden_states, int):
            selected = [output_hidden_states]
        else:
            selected = list(output_hidden_states)
        states = self.visual.hidden_states(pixel_values, selected + [-1], self.branch, self.all_class_tokens)
        last = states[-1]
        hidden = None
        if selected:
            hidden = [None] * count
            for k, state in zip(selected, states):
                hidden[k % count] = state
            hidden = tuple(hidden)
        pooled = self.visual.ln_post(last[:, : self.num_prefix_tokens])
        out = BaseModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=pooled[:, 0] if pooled.shape[1] == 1 else pooled,
            hidden_states=hidden,
        )
        return out if return_dict else out.to_tuple()


def attach_vision_tower(llava: nn.Module, tower: HolisticVisionTower) -> nn.Module:
    """Puts ``tower`` in place of a LLaVA model's vision tower, after checking that its projector
    and ``vision_feature_layer`` / ``vision_feature_select_strategy`` fit the tower; the model's
    ``config.vision_config`` and ``image_seq_length`` then describe the tower. Returns ``llava``."""
    inner = llava.model if hasattr(getattr(llava, "model", None), "vision_tower") else llava
    if not (hasattr(inner, "vision_tower") and hasattr(inner, "multi_modal_projector")):
        raise TypeError(f"expected a transformers LLaVA model (LlavaForConditionalGeneration), got {type(llava).__name__}")
    config = llava.config
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    count = tower.num_hidden_layers + 1
    for k in layers:
        if not -count <= k < count:
            raise ValueError(f"vision_feature_layer {k} is not a layer of the tower: it has {count - 1} blocks, "
                             f"so layers {-count}..{count - 1}")
    expected = tower.hidden_size * len(layers)
    got = inner.multi_modal_projector.linear_1.in_features
    if got != expected:
        raise ValueError(
            f"the LLaVA projector takes {got} features per image token, the tower gives {tower.hidden_size} x "
            f"{len(layers)} layer(s) = {expected}: build the LlavaConfig with vision_config=tower.config"
        )
    strategy = config.vision_feature_select_strategy
    if strategy == "default" and tower.num_prefix_tokens > 1:
        raise ValueError(
            f"vision_feature_select_strategy='default' drops only the first of the tower's {tower.num_prefix_tokens} "
            f"class tokens: use 'full' (class tokens and patches) or name a branch (its patches with 'default')"
        )
    inner.vision_tower = tower
    config.vision_config = tower.config
    config.image_seq_length = tower.num_image_tokens(strategy)
    return llava

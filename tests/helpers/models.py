"""Model configs and inputs for the model tests: small registry configs, open_clip references, images and tokens."""
from __future__ import annotations

import open_clip
import torch
from safetensors.torch import save_file

import holiclip

# Registry configs the model tests run on (timm-style parametrisation); ViT-B ones are too slow.
SMALL_CONFIGS = ("holi-tiny", "holi-small")
FIVE = ("web", "detail", "background", "main", "style")  # the paper's five branch names

# one transformer layer: a class token's output depends only on its own and the patches' inputs
ONE_LAYER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    "holistic": {"mlp_layers": 1},
}


def open_clip_model(name: str) -> open_clip.CLIP:
    cfg = holiclip.get_model_config(name)
    cfg.pop("holistic", None)
    return open_clip.CLIP(**cfg).eval()


def save_open_clip(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def from_open_clip(tmp_path, name: str, encoder: str, branches=("global",)):
    """An open_clip model and a HolisticCLIP built from its weights, both in eval mode."""
    reference = open_clip_model(name)
    weights = save_open_clip(reference, tmp_path / "oc.safetensors")
    return reference, holiclip.create_model(name, encoder, list(branches), pretrained=weights).eval()


def images_for(model_or_size, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = model_or_size if isinstance(model_or_size, int) else model_or_size.visual.image_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tokens_for(name: str, batch: int = 3, seed: int = 2) -> torch.Tensor:
    cfg = holiclip.get_model_config(name)["text_cfg"]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, cfg["vocab_size"] - 1, (batch, cfg["context_length"]), generator=g)
    tokens[:, -3:] = 0  # padding after an end-of-text token (the largest id)
    tokens[:, -4] = cfg["vocab_size"] - 1
    return tokens


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forked_layers(model) -> int:
    return len(model.visual.transformer.resblocks) - model.visual.fork_at

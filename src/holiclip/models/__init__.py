"""Architectures; knows nothing about data, losses or training."""
from functools import lru_cache
from pathlib import Path

from ..io import read_json

CONFIG_DIR = Path(__file__).parent / "configs"

# The image-encoder designs (see branches); here, free of torch, so that checking a training config
# (training.config.validate) does not load torch.
ENCODERS = ("cls", "mlp")
FUSION_MODES = ("mean", "mean-logits", "max", "norm-max")  # models.fusion.fuse's modes


def config_summary(cfg: dict) -> str:
    """One line on an architecture config (open_clip's JSON format)."""
    v, t = cfg["vision_cfg"], cfg.get("text_cfg", {})
    text = t.get("hf_model_name") or f"{t.get('layers')}x{t.get('width')}"
    return f"ViT {v['layers']}x{v['width']} /{v['patch_size']} @{v['image_size']}px, text {text}, D={cfg['embed_dim']}"


@lru_cache(maxsize=None)
def builtin_configs() -> dict[str, dict]:
    """holiclip's own architectures (configs/*.json) by name, read without importing torch
    (``holiclip models list`` and the registry share them; callers copy before changing one)."""
    return {p.stem: read_json(p) for p in sorted(CONFIG_DIR.glob("*.json"))}

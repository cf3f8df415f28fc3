"""Architectures; knows nothing about data, losses or training."""

# The image-encoder designs (see branches); here, free of torch, so that checking a training config
# (training.config.validate) does not load torch.
ENCODERS = ("cls", "mlp")
FUSION_MODES = ("mean", "mean-logits", "max", "norm-max")  # models.fusion.fuse's modes


def config_summary(cfg: dict) -> str:
    """One line on an architecture config (open_clip's JSON format)."""
    v, t = cfg["vision_cfg"], cfg.get("text_cfg", {})
    text = t.get("hf_model_name") or f"{t.get('layers')}x{t.get('width')}"
    return f"ViT {v['layers']}x{v['width']} /{v['patch_size']} @{v['image_size']}px, text {text}, D={cfg['embed_dim']}"

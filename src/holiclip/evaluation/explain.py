"""Per-branch attention maps of one image as a PNG (paper Fig. 3): the image as the model sees
it, then each branch's class-token-to-patch attention in the last block (heads averaged),
upsampled and overlaid, titled with the branch name. :func:`attention_summary` gives the
numbers behind it (peak patch, entropy, the raw grid) for a table and a JSON sidecar."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dense import dense_transform
from .features import read_image


@torch.no_grad()
def branch_attention(model, image, device: str | torch.device = "cpu") -> tuple[np.ndarray, torch.Tensor]:
    """(image as an (s, s, 3) array in [0, 1], maps (H, s, s) upsampled, each scaled to [0, 1])."""
    pil = read_image(image)
    x = dense_transform(model.image_size)(pil)[None].to(device)
    maps = model.attention_maps(x)[0].float().cpu()  # (H, gh, gw)
    size = x.shape[-2:]
    up = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).min(1).values[:, None, None]
    hi = up.flatten(1).max(1).values[:, None, None]
    up = (up - lo) / (hi - lo).clamp_min(1e-12)
    shown = np.asarray(pil.resize((size[1], size[0])), dtype=np.float32) / 255.0
    return shown, up


@torch.no_grad()
def attention_summary(model, image, device: str | torch.device = "cpu") -> list[dict]:
    """Per branch: the raw (gh, gw) map, its peak patch (row, col), and its entropy relative to
    a uniform map (1.0 = spread evenly over the patches, 0.0 = all on one patch)."""
    x = dense_transform(model.image_size)(read_image(image))[None].to(device)
    maps = model.attention_maps(x)[0].float().cpu()
    out = []
    for name, m in zip(model.branch_names, maps):
        p = m.flatten() / m.sum().clamp_min(1e-12)
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum() / np.log(p.numel())) if p.numel() > 1 else 0.0
        peak = int(p.argmax())
        out.append({"branch": name, "peak_row": peak // m.shape[1], "peak_col": peak % m.shape[1],
                    "entropy": entropy, "map": m.tolist()})
    return out


def explain_image(
    model,
    image,
    out: str | Path,
    branches: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    title: str | None = None,
    alpha: float = 0.55,
) -> Path:
    """Writes the PNG and returns its path. ``branches`` picks which branches to show."""
    from holiclip._extras import require

    matplotlib = require("matplotlib", "viz", "holiclip explain")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(model.branch_names)
    shown, maps = branch_attention(model, image, device)
    pick = list(branches) if branches else names
    unknown = [b for b in pick if b not in names]
    if unknown:
        raise KeyError(f"unknown branches {unknown}; this model has {names}")
    fig, axes = plt.subplots(1, len(pick) + 1, figsize=(2.6 * (len(pick) + 1), 2.9), squeeze=False)
    axes = axes[0]
    axes[0].imshow(shown)
    axes[0].set_title("image")
    for ax, name in zip(axes[1:], pick):
        ax.imshow(shown)
        ax.imshow(maps[names.index(name)].numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        ax.set_title(name)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

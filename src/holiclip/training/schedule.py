"""Optimizer (AdamW as in the paper) and warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on 1-D parameters, norms, biases and the logit scale; the
    positional embeddings are decayed. Also exempt: what the model lists in ``no_weight_decay``
    (the class tokens: open_clip's single class token is 1-D, ours are (H, W))."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in skip or any(key in name for key in ("bn", "ln", "bias", "logit_scale")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_available(params) -> bool:
    """The fused AdamW kernel (one launch for all parameters) when every parameter is on a GPU;
    on CPU the default (foreach) implementation stays, so CPU runs and their checkpoints are unchanged."""
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" for p in params)


def create_optimizer(model, lr, weight_decay, betas, eps) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    fused = fused_available(p for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **({"fused": True} if fused else {}))


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""The model under evaluation: a holiclip checkpoint folder, or an architecture name with
optional pretrained weights (an open_clip tag or a local file; a plain CLIP is H = 1)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..models.registry import create_model, get_tokenizer, get_transforms, load_model


@dataclass
class EvalModel:
    model: Any  # HolisticCLIP, in eval mode
    tokenizer: Callable
    transform: Callable
    name: str  # "holi-tiny", for result files
    pretrained: str  # checkpoint path or pretrained tag, for result files
    device: torch.device

    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(self.model.branch_names)


def load_eval_model(
    checkpoint: str | Path | None = None,
    model_name: str | None = None,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    branches: tuple[str, ...] = ("global",),
) -> EvalModel:
    """Exactly one of ``checkpoint`` (anything :func:`load_model` reads: a run or model folder, a
    .safetensors file, a checkpoint, ``hf-hub:ORG/NAME``) or
    ``model_name`` (+ ``pretrained``, random weights without it) must be given."""
    if (checkpoint is None) == (model_name is None):
        raise ValueError("give either a checkpoint (--checkpoint) or a model name (--model [--pretrained])")
    device = torch.device(device)
    if checkpoint is not None:
        if not str(checkpoint).startswith("hf-hub:") and not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        model = load_model(checkpoint, device=device)
        name, tag = model.model_name, str(checkpoint)
    else:
        model = create_model(model_name, branches=branches, pretrained=pretrained, device=device)
        name, tag = model_name, pretrained or "random-init"
    model.eval()
    return EvalModel(model, get_tokenizer(name), get_transforms(model), name, tag, device)

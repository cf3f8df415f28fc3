"""Optimiser parameter groups and the fused AdamW choice."""
from __future__ import annotations

from types import SimpleNamespace

import open_clip
import torch

from holiclip.models.registry import _build_clip, create_model, get_model_config
from holiclip.training.schedule import create_optimizer, fused_available, param_groups


def test_weight_decay_groups_follow_open_clip():
    """open_clip's rule (ndim < 2, bn, ln, bias, logit_scale excluded): the positional embeddings are decayed."""
    def decayed(model, groups):
        ids = {id(p) for p in groups[0]["params"]}
        return {n.removeprefix("clip.") for n, p in model.named_parameters() if id(p) in ids}

    model = create_model("holi-tiny", branches=["global"])
    plain = _build_clip(get_model_config("holi-tiny"), pretrained_text=False)
    assert isinstance(plain, open_clip.CLIP)
    want = {n for n, p in plain.named_parameters()
            if not (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)}
    got = decayed(model, param_groups(model, 0.2))
    assert got == want
    assert {"positional_embedding", "visual.positional_embedding"} <= got
    mlp = create_model("holi-tiny", encoder="mlp", branches=["a", "b", "c"], mlp_layers=2)
    got = decayed(mlp, param_groups(mlp, 0.2))
    assert not any(n.endswith(("class_embedding", ".bias")) for n in got)  # 2-D class tokens and branch biases
    assert any(n.endswith("mlp.c_proj.weight") for n in got)


def test_fused_adamw_only_when_every_parameter_is_on_cuda():
    model = create_model("holi-tiny", branches=["global"])
    optimizer = create_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    assert not optimizer.defaults["fused"]  # CPU: the default implementation, checkpoints as before
    on = [SimpleNamespace(device=torch.device("cuda", i)) for i in (0, 0)]
    assert fused_available(on)
    assert not fused_available([*on, SimpleNamespace(device=torch.device("cpu"))])
    assert not fused_available([])

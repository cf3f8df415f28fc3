"""holiclip: Holistic CLIP (Wang et al., CVPR 2025, arXiv 2412.00440) on open_clip.

Public API: create_model, get_tokenizer, list_models, fuse, M2MLoss.
"""
from ._compat import ensure_torchvision_importable as _ensure_tv

_ensure_tv()

from .loss import M2MLoss  # noqa: E402
from .models.fusion import FUSION_MODES, fuse  # noqa: E402
from .models.holistic import HolisticCLIP  # noqa: E402
from .models.registry import (  # noqa: E402
    create_model,
    get_model_config,
    get_tokenizer,
    get_transforms,
    list_models,
    load_model,
    load_state_dict,
    save_model,
    register_model_config,
)

__version__ = "0.1.0"
__all__ = [
    "create_model", "get_tokenizer", "list_models", "fuse", "M2MLoss", "HolisticCLIP",
    "FUSION_MODES", "get_model_config", "get_transforms", "load_state_dict", "register_model_config",
    "load_model", "save_model",
]

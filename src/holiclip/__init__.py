"""holiclip: Holistic CLIP (Wang et al., CVPR 2025, arXiv 2412.00440) on open_clip.

Public API: create_model, create_model_and_transforms (open_clip's), get_tokenizer, list_models, fuse,
M2MLoss, load_model (folder, file or hf-hub:ORG/NAME), save_model, save_pretrained (+ a model card),
push_to_hub.

The API is imported on first use (PEP 562), so that light subpackages (``holiclip.captioning``,
the command line's ``--help``) do not pay for importing torch and open_clip.
"""
from ._compat import install_import_hook as _install_import_hook

_install_import_hook()

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "M2MLoss": ".loss",
    "FUSION_MODES": ".models.fusion",
    "fuse": ".models.fusion",
    "HolisticCLIP": ".models.holistic",
    "create_model_and_transforms": ".models.factory",
    "FusedCLIP": ".models.factory",
    "save_pretrained": ".integrations.hub",
    "push_to_hub": ".integrations.hub",
    **{name: ".models.registry" for name in (
        "create_model", "get_model_config", "get_tokenizer", "get_transforms", "list_models",
        "load_model", "load_state_dict", "save_model", "register_model_config",
    )},
}

__all__ = list(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

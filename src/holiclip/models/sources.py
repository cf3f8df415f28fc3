"""Where a model comes from: a model folder, a run folder, a ``.safetensors`` file, a training
checkpoint ``step_*.pt`` or the Hugging Face Hub (``hf-hub:ORG/NAME[@REVISION]``, open_clip's
naming). The one resolver behind ``load_model``, ``create_model_and_transforms`` and
``get_tokenizer``; the file names of a saved model and the safe torch-file reader live here, once.

A model is ``model.safetensors`` + ``holiclip_config.json`` (name, architecture JSON, encoder,
branches, training config). The config also travels in the safetensors metadata (key
``holiclip_config``), so the weights file alone is a complete model; for a ``.safetensors`` file
without it, the ``holiclip_config.json`` beside it is read.

This module reads and writes files only: building the network is ``registry``'s (which imports
this module, never the other way round).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_path, parse_json, read_json

HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "holiclip_config.json"
WEIGHTS_FILE = "model.safetensors"
EVAL_FILE = "eval.json"
METADATA_KEY = "holiclip_config"
RUN_MODEL_DIR = "model"  # a run folder's final model
RUN_CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "config.yaml"
CKPT_RE = re.compile(r"step_(\d+)\.pt$")

log = logging.getLogger(__name__)

EXPECTED = ("a model folder (holiclip_config.json + model.safetensors), a run folder (its model/ or "
            "checkpoints/step_*.pt), a .safetensors file, a training checkpoint step_*.pt or hf-hub:ORG/NAME")


class ModelSourceError(FileNotFoundError):
    """A model source that is missing, damaged or not one of the forms ``load_model`` reads; names it."""


@dataclass
class ModelSource:
    """A resolved model: its config (``holiclip_config.json``'s content) and where its weights are."""

    config: dict
    weights: Path | None = None  # a safetensors file ...
    state: dict | None = None  # ... or a state dict read from a training checkpoint
    origin: str = ""  # what was loaded, for messages and the model card
    eval_results: dict | None = None  # eval.json of the run / model folder, when there is one
    notes: list[str] = field(default_factory=list)

    def state_dict(self) -> dict:
        """The weights (``module.`` prefixes of a DDP-wrapped model dropped)."""
        state = read_weights(self.weights) if self.weights is not None else self.state
        return strip_module_prefix(state)


def strip_module_prefix(state: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


# -- what a name is -----------------------------------------------------------------------------
def looks_like_path(name: str) -> bool:
    """A name that can only mean a file or folder (an architecture's name has no slash or suffix)."""
    text = str(name)
    return (os.sep in text or "/" in text or text.startswith(("~", "."))
            or text.endswith((".safetensors", ".pt", ".pth", ".bin", ".json")))


def is_model_source(src: str | os.PathLike) -> bool:
    """Whether ``src`` is a saved holiclip model :func:`resolve` reads (an ``hf-hub:`` id, a folder,
    a ``step_*.pt`` checkpoint or a ``.safetensors`` file carrying a holiclip config), as opposed
    to an architecture's name or plain open_clip weights for one."""
    text = str(src)
    if text.startswith(HF_HUB_PREFIX):
        return True
    path = Path(src)
    if path.is_dir():
        return True
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return METADATA_KEY in _safetensors_metadata(path) or (path.parent / CONFIG_FILE).is_file()
    return bool(CKPT_RE.search(path.name))


# -- resolving a source -------------------------------------------------------------------------
def resolve(src: str | os.PathLike, revision: str | None = None, weights: bool = True) -> ModelSource:
    """A run folder, model folder, ``.safetensors`` file, ``step_*.pt`` checkpoint or ``hf-hub:`` id.

    ``weights=False``: the config is what is wanted (a tokenizer, transforms), so a Hub model's
    weights are not downloaded and nothing is logged about which weights a run folder gives."""
    text = str(src)
    if text.startswith(HF_HUB_PREFIX):
        return _from_hub(text[len(HF_HUB_PREFIX):], revision, weights)
    path = Path(src)
    if not path.exists():
        raise ModelSourceError(f"{path}: no such folder or file; expected {EXPECTED}")
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return _from_model_folder(path)
        if (path / RUN_MODEL_DIR / CONFIG_FILE).is_file():
            if weights:
                log.info("%s: loading the run's final model, %s", path, path / RUN_MODEL_DIR)
            source = _from_model_folder(path / RUN_MODEL_DIR)
            source.eval_results = source.eval_results or _read_eval(path)
            return source
        checkpoints = list_checkpoints(path / RUN_CHECKPOINT_DIR) or list_checkpoints(path)
        if checkpoints:
            latest = checkpoints[-1]
            if weights:
                log.warning("warning: %s has no final model (%s/); loading its latest checkpoint %s",
                            path, RUN_MODEL_DIR, latest)
            source = _from_checkpoint(latest, run_dir=path)
            source.notes.append(f"no final model in {path}: the latest checkpoint, {latest.name}")
            return source
        raise ModelSourceError(f"{path}: a folder with neither {CONFIG_FILE}, {RUN_MODEL_DIR}/{CONFIG_FILE} nor "
                               f"{RUN_CHECKPOINT_DIR}/step_*.pt; expected {EXPECTED}")
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    if CKPT_RE.search(path.name):
        run_dir = path.parent.parent if path.parent.name == RUN_CHECKPOINT_DIR else None
        return _from_checkpoint(path, run_dir=run_dir)
    raise ModelSourceError(f"{path}: a file that is neither .safetensors nor a step_*.pt checkpoint; "
                           f"expected {EXPECTED}")


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The ``step_*.pt`` files of a folder, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*.pt") if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def _read_eval(folder: Path) -> dict | None:
    path = folder / EVAL_FILE
    return read_json(path, ModelSourceError) if path.is_file() else None


def _from_model_folder(folder: Path) -> ModelSource:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelSourceError(f"{weights}: not found; the model folder {folder} has {CONFIG_FILE} but no weights")
    config = checked_config(read_json(folder / CONFIG_FILE, ModelSourceError), folder / CONFIG_FILE)
    return ModelSource(config, weights=weights, origin=str(folder), eval_results=_read_eval(folder))


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ModelSourceError(f"{path}: not a readable safetensors file ({err})") from None


def _from_safetensors(path: Path) -> ModelSource:
    metadata = _safetensors_metadata(path)
    if METADATA_KEY in metadata:
        where = f"{path} (metadata {METADATA_KEY!r})"
        config = parse_json(metadata[METADATA_KEY], where, ModelSourceError)
    elif (path.parent / CONFIG_FILE).is_file():
        config, where = read_json(path.parent / CONFIG_FILE, ModelSourceError), path.parent / CONFIG_FILE
    else:
        raise ModelSourceError(f"{path}: no holiclip config in its metadata (key {METADATA_KEY!r}) and no "
                               f"{CONFIG_FILE} beside it; a lone open_clip state dict loads with "
                               f"create_model(name, pretrained=...)")
    return ModelSource(checked_config(config, where), weights=path, origin=str(path),
                       eval_results=_read_eval(path.parent))


def _from_checkpoint(path: Path, run_dir: Path | None) -> ModelSource:
    state = read_torch(path, what="checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ModelSourceError(f"{path}: not a holiclip training checkpoint (no model state)")
    train_config = state.get("config")
    if train_config is None and run_dir is not None and (run_dir / RUN_CONFIG).is_file():
        import yaml

        train_config = yaml.safe_load((run_dir / RUN_CONFIG).read_text())
    if not isinstance(train_config, dict) or not isinstance(train_config.get("model"), dict):
        raise ModelSourceError(f"{path}: the checkpoint holds no training config and there is no run "
                               f"{RUN_CONFIG} beside it, so its architecture is unknown")
    m = train_config["model"]
    branches = m.get("branches") or (train_config.get("data") or {}).get("slots") or ["web"]
    config = {"model": m.get("name", "holi-tiny"), "encoder": m.get("encoder", "cls"), "branches": list(branches),
              "mlp_layers": m.get("mlp_layers"), "train_config": train_config,
              "checkpoint_step": state.get("step")}
    eval_results = _read_eval(run_dir) if run_dir is not None else None
    return ModelSource(config, state=state["model"], origin=str(path), eval_results=eval_results)


def checked_config(config: Any, where) -> dict:
    missing = [k for k in ("model", "encoder", "branches") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ModelSourceError(f"{where}: not a holiclip config (missing {', '.join(missing)})")
    return config


# -- reading weights safely -------------------------------------------------------------------------
_UNSAFE_GLOBAL = re.compile(r"\bGLOBAL ([\w.]+)")  # torch names the refused callable or class


def read_torch(path: str | os.PathLike, error: type[Exception] = ModelSourceError, what: str = "file",
               **load_kwargs) -> Any:
    """A torch file read with ``weights_only=True`` (tensors and plain containers; no code from the
    file ever runs), or an ``error`` naming the file: missing, empty, damaged, or holding Python
    objects that such a load refuses (a pickle payload), which is never worked around."""
    import pickle

    import torch

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror}") from None
    if size == 0:
        raise error(f"{what} {path} is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **load_kwargs)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler refused something
        unsafe = _UNSAFE_GLOBAL.search(str(err))
        if unsafe:
            raise error(f"{what} {path} holds Python objects ({unsafe.group(1)}) that a weights-only load "
                        "refuses to build; holiclip reads tensors only and never runs code from a file. Where "
                        "the file was made, save its tensors alone (a state dict, or safetensors)") from None
        raise error(f"{what} {path} is not a torch file of tensors ({size} bytes; damaged, or another "
                    "format)") from None
    except Exception as err:  # a damaged file raises EOFError, RuntimeError, OSError, ...
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise error(f"{what} {path} is unreadable ({size} bytes; truncated or corrupt?): {reason}") from None


def read_weights(path: str | os.PathLike) -> dict:
    """A state dict from a ``.safetensors`` file or a torch file (``state_dict`` / ``model`` entries unwrapped)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # a damaged header or a truncated file: safetensors' own error types
            raise ModelSourceError(f"{path}: not a readable safetensors file ({err})") from None
    else:
        state = read_torch(path, what="weights file")
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelSourceError(f"{path}: not a state dict")
    return state


# -- writing a model ----------------------------------------------------------------------------------
def write_model(directory: str | os.PathLike, state: dict, config: dict) -> Path:
    """``model.safetensors`` (the config in its metadata too) + ``holiclip_config.json`` in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config)}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, _default_mode())  # safetensors writes 0600; every other file follows the umask
    with atomic_path(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory


def _default_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask)."""
    try:  # Linux: read without changing it (os.umask sets it, racing other threads' file creation)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


# -- the Hub (downloads: open_clip's pretrained.py counterpart) ----------------------------------------
def parse_hub_id(spec: str) -> tuple[str, str | None]:
    """``ORG/NAME[@REVISION]`` -> (repo id, revision)."""
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ModelSourceError(f"{HF_HUB_PREFIX}{spec}: expected {HF_HUB_PREFIX}ORG/NAME or "
                               f"{HF_HUB_PREFIX}ORG/NAME@REVISION")
    return repo_id, revision or None


def hub_download(repo_id: str, filename: str, revision: str | None = None, optional: bool = False) -> Path | None:
    """One file of a Hub model repo (from the local cache when it is there or HF_HUB_OFFLINE=1)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    where = f"{HF_HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: caught first
        if optional:
            return None
        raise ModelSourceError(f"{where}: {filename} is not in the local Hugging Face cache and the Hub cannot "
                               f"be reached (offline, or HF_HUB_OFFLINE=1)") from None
    except EntryNotFoundError:
        if optional:
            return None
        raise ModelSourceError(f"{where}: the repo has no {filename}; not a holiclip model") from None
    except HfHubHTTPError as err:  # repository / revision not found, gated, unauthorised
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelSourceError(f"{where}: cannot download {filename}: {reason}") from None


def _from_hub(spec: str, revision: str | None, weights: bool) -> ModelSource:
    repo_id, rev = parse_hub_id(spec)
    if rev and revision and rev != revision:
        raise ModelSourceError(f"{HF_HUB_PREFIX}{spec}: names revision {rev!r} and revision={revision!r} was given")
    revision = rev or revision
    origin = f"{HF_HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    config = checked_config(read_json(hub_download(repo_id, CONFIG_FILE, revision), ModelSourceError),
                            f"{origin} {CONFIG_FILE}")
    if not weights:  # the config alone: no weights for a tokenizer
        return ModelSource(config, origin=origin)
    weights_path = hub_download(repo_id, WEIGHTS_FILE, revision)
    eval_path = hub_download(repo_id, EVAL_FILE, revision, optional=True)
    return ModelSource(config, weights=weights_path, origin=origin,
                       eval_results=read_json(eval_path, ModelSourceError) if eval_path else None)

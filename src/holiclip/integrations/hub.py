"""Where models come from and go to: run folders, model folders, lone ``.safetensors`` files and the
Hugging Face Hub (``hf-hub:ORG/NAME[@REVISION]``, open_clip's naming), plus ``save_pretrained`` /
``push_to_hub`` with a model card. Built on huggingface_hub (``hf_hub_download``, ``HfApi``).

A model is ``model.safetensors`` + ``holiclip_config.json`` (name, architecture JSON, encoder,
branches, training config). ``save_model`` also writes that config into the safetensors metadata
(key ``holiclip_config``), so the weights file alone is a complete model; for a ``.safetensors``
file without it, the ``holiclip_config.json`` beside it is read.
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_path, parse_json, read_json

HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "holiclip_config.json"
WEIGHTS_FILE = "model.safetensors"
EVAL_FILE = "eval.json"
CARD_FILE = "README.md"
METADATA_KEY = "holiclip_config"
DEFAULT_LICENSE = "apache-2.0"  # holiclip's own; the weights' licence is the owner's call (push_to_hub(license=...))

log = logging.getLogger(__name__)

EXPECTED = ("a model folder (holiclip_config.json + model.safetensors), a run folder (its model/ or "
            "checkpoints/step_*.pt), a .safetensors file, a training checkpoint step_*.pt or hf-hub:ORG/NAME")


class ModelSourceError(FileNotFoundError):
    """A model source that is missing or not one of the forms ``load_model`` reads; names the path."""


@dataclass
class ModelSource:
    """A resolved model: its config (``holiclip_config.json``'s content) and where its weights are."""

    config: dict
    weights: Path | None = None  # a safetensors file ...
    state: dict | None = None  # ... or a state dict read from a training checkpoint
    origin: str = ""  # what was loaded, for messages and the model card
    eval_results: dict | None = None  # eval.json of the run / model folder, when there is one
    notes: list[str] = field(default_factory=list)


class HubUploadError(RuntimeError):
    """An upload the Hub refused or could not receive; names the repo."""


# -- resolving a source -------------------------------------------------------------------------
def resolve(src: str | Path, revision: str | None = None) -> ModelSource:
    """A run folder, model folder, ``.safetensors`` file, ``step_*.pt`` checkpoint or ``hf-hub:`` id."""
    text = str(src)
    if text.startswith(HF_HUB_PREFIX):
        return _from_hub(text[len(HF_HUB_PREFIX):], revision)
    path = Path(src)
    if not path.exists():
        raise ModelSourceError(f"{path}: not found; expected {EXPECTED}")
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return _from_model_folder(path)
        if (path / "model" / CONFIG_FILE).is_file():
            log.info("%s: loading the run's final model, %s", path, path / "model")
            source = _from_model_folder(path / "model")
            source.eval_results = source.eval_results or _read_eval(path)
            return source
        from ..training.checkpoint import list_checkpoints

        checkpoints = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if checkpoints:
            latest = checkpoints[-1]
            log.warning("warning: %s has no final model (model/); loading its latest checkpoint %s", path, latest)
            source = _from_checkpoint(latest, run_dir=path)
            source.notes.append(f"no final model in {path}: the latest checkpoint, {latest.name}")
            return source
        raise ModelSourceError(f"{path}: a folder with neither {CONFIG_FILE}, model/{CONFIG_FILE} nor "
                               f"checkpoints/step_*.pt; expected {EXPECTED}")
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    from ..training.checkpoint import CKPT_RE

    if CKPT_RE.search(path.name):
        return _from_checkpoint(path, run_dir=path.parent.parent if path.parent.name == "checkpoints" else None)
    raise ModelSourceError(f"{path}: a file that is neither .safetensors nor a step_*.pt checkpoint; "
                           f"expected {EXPECTED}")


def _read_eval(folder: Path) -> dict | None:
    path = folder / EVAL_FILE
    return read_json(path) if path.is_file() else None


def _from_model_folder(folder: Path) -> ModelSource:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelSourceError(f"{weights}: not found; the model folder {folder} has {CONFIG_FILE} but no weights")
    config = _checked_config(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)
    return ModelSource(config, weights=weights, origin=str(folder), eval_results=_read_eval(folder))


def _from_safetensors(path: Path) -> ModelSource:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ModelSourceError(f"{path}: not a readable safetensors file ({err})") from None
    if METADATA_KEY in metadata:
        config = parse_json(metadata[METADATA_KEY], f"{path} (metadata {METADATA_KEY!r})")
        where = f"{path} (metadata {METADATA_KEY!r})"
    elif (path.parent / CONFIG_FILE).is_file():
        config, where = read_json(path.parent / CONFIG_FILE), path.parent / CONFIG_FILE
    else:
        raise ModelSourceError(f"{path}: no holiclip config in its metadata (key {METADATA_KEY!r}) and no "
                               f"{CONFIG_FILE} beside it; a lone open_clip state dict loads with "
                               f"create_model(name, pretrained=...)")
    return ModelSource(_checked_config(config, where), weights=path, origin=str(path),
                       eval_results=_read_eval(path.parent))


def _from_checkpoint(path: Path, run_dir: Path | None) -> ModelSource:
    from ..training.checkpoint import CheckpointError, load_checkpoint  # weights_only, names the file

    try:
        state = load_checkpoint(path)
    except CheckpointError as err:
        raise ModelSourceError(str(err)) from None
    train_config = state.get("config")
    if train_config is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        import yaml

        train_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not isinstance(train_config, dict) or not isinstance(train_config.get("model"), dict):
        raise ModelSourceError(f"{path}: the checkpoint holds no training config and there is no run "
                               f"config.yaml beside it, so its architecture is unknown")
    m = train_config["model"]
    branches = m.get("branches") or (train_config.get("data") or {}).get("slots") or ["web"]
    config = {"model": m.get("name", "holi-tiny"), "encoder": m.get("encoder", "cls"), "branches": list(branches),
              "mlp_layers": m.get("mlp_layers"), "train_config": train_config,
              "checkpoint_step": state.get("step")}
    eval_results = _read_eval(run_dir) if run_dir is not None else None
    return ModelSource(config, state=state["model"], origin=str(path), eval_results=eval_results)


def _checked_config(config: Any, where) -> dict:
    missing = [k for k in ("model", "encoder", "branches") if not isinstance(config, dict) or k not in config]
    if missing:
        raise ModelSourceError(f"{where}: not a holiclip config (missing {', '.join(missing)})")
    return config


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


def _from_hub(spec: str, revision: str | None) -> ModelSource:
    repo_id, rev = parse_hub_id(spec)
    if rev and revision and rev != revision:
        raise ModelSourceError(f"{HF_HUB_PREFIX}{spec}: names revision {rev!r} and revision={revision!r} was given")
    revision = rev or revision
    config_path = hub_download(repo_id, CONFIG_FILE, revision)
    weights = hub_download(repo_id, WEIGHTS_FILE, revision)
    eval_path = hub_download(repo_id, EVAL_FILE, revision, optional=True)
    origin = f"{HF_HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    return ModelSource(_checked_config(read_json(config_path), f"{origin} {CONFIG_FILE}"), weights=weights,
                       origin=origin, eval_results=read_json(eval_path) if eval_path else None)


def hub_model_config(name: str) -> dict:
    """The architecture JSON of an ``hf-hub:`` model (for its tokenizer and transforms)."""
    repo_id, revision = parse_hub_id(name[len(HF_HUB_PREFIX):])
    path = hub_download(repo_id, CONFIG_FILE, revision)  # the config alone: no weights for a tokenizer
    config = _checked_config(read_json(path), f"{name} {CONFIG_FILE}")
    if not config.get("model_config"):
        from ..models.registry import stored_model_config

        return stored_model_config(config["model"])
    return config["model_config"]


# -- saving and sharing -------------------------------------------------------------------------
def save_pretrained(
    model,
    directory: str | Path,
    train_config: dict | None = None,
    eval_results: dict | None = None,
    license: str = DEFAULT_LICENSE,
    tags: list[str] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Writes ``model.safetensors``, ``holiclip_config.json``, ``eval.json`` (when there are results) and a
    model card ``README.md``. The training config and evaluation results default to those the model
    was loaded with (``load_model`` of a run folder keeps them)."""
    from ..models.registry import save_model

    meta = getattr(model, "holiclip_meta", None) or {}
    train_config = train_config if train_config is not None else meta.get("train_config")
    eval_results = eval_results if eval_results is not None else meta.get("eval_results")
    directory = save_model(model, directory, extra={"train_config": train_config} if train_config else None)
    if eval_results:
        with atomic_path(directory / EVAL_FILE) as tmp:
            tmp.write_text(json.dumps(eval_results, indent=2))
    card = model_card(model, train_config=train_config, eval_results=eval_results, license=license,
                      tags=tags, repo_id=repo_id)
    with atomic_path(directory / CARD_FILE) as tmp:
        tmp.write_text(card)
    return directory


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload holiclip model",
    license: str = DEFAULT_LICENSE,
    tags: list[str] | None = None,
    train_config: dict | None = None,
    eval_results: dict | None = None,
) -> str:
    """Creates ``repo_id`` (if needed) and uploads what :func:`save_pretrained` writes; returns the
    commit URL. Loads back with ``load_model(f"hf-hub:{repo_id}")``."""
    import huggingface_hub

    from huggingface_hub import errors

    # the HTTP client's own base error (httpx in huggingface_hub 1.x, httpx2 in 2.x): no network, DNS, TLS
    transport = (errors.HTTPError,) if isinstance(getattr(errors, "HTTPError", None), type) else ()

    parse_hub_id(repo_id)  # ORG/NAME, before anything is created
    api = huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="holiclip-push-") as tmp:
        save_pretrained(model, tmp, train_config=train_config, eval_results=eval_results, license=license,
                        tags=tags, repo_id=repo_id)
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=revision,
                                     commit_message=commit_message)
        except (errors.HfHubHTTPError, OSError, *transport) as err:  # unauthorised, no network, ...
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise HubUploadError(f"push to {HF_HUB_PREFIX}{repo_id} failed: {reason}") from None
    return str(getattr(info, "commit_url", info))


def model_card(
    model,
    train_config: dict | None = None,
    eval_results: dict | None = None,
    license: str = DEFAULT_LICENSE,
    tags: list[str] | None = None,
    repo_id: str | None = None,
) -> str:
    """README.md with the Hub's metadata header (library_name holiclip, tags, license), the
    architecture, branches, training config and evaluation results."""
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from ..models.registry import config_summary, stored_model_config

    all_tags = ["holiclip", "clip", "holistic-clip", "zero-shot-image-classification", "image-feature-extraction"]
    all_tags += [t for t in tags or [] if t not in all_tags]
    data = ModelCardData(library_name="holiclip", license=license, tags=all_tags,
                         pipeline_tag="zero-shot-image-classification")
    name = model.model_name or "holiclip model"
    ref = f"{HF_HUB_PREFIX}{repo_id}" if repo_id else "path/to/this/folder"
    try:
        arch = config_summary(stored_model_config(model.model_name))
    except (KeyError, TypeError):
        arch = model.model_name
    lines = [
        f"# {repo_id or name}", "",
        "A [Holistic CLIP](https://arxiv.org/abs/2412.00440) model trained with holiclip: one image embedding "
        "per branch (each aligned with its own kind of text), fused for CLIP-style use.", "",
        f"- architecture: `{name}` ({arch})",
        f"- image encoder: `{model.encoder}` ({'Psi_CLS' if model.encoder == 'cls' else 'Psi_MLP'}), "
        f"{model.num_branches} branch(es)",
        f"- branches: {', '.join(f'`{b}`' for b in model.branch_names)}", "",
        "## Use", "", "```python", "import holiclip", "",
        f'model, _, preprocess = holiclip.create_model_and_transforms("{ref}")',
        f'tokenizer = holiclip.get_tokenizer("{ref}")',
        "# model.encode_image -> fused (B, D); model.holistic.encode_image -> per branch (B, H, D)",
        "```", "",
    ]
    if eval_results:
        lines += ["## Evaluation", "", *_results_tables(eval_results), ""]
    if train_config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(train_config, sort_keys=False).rstrip(),
                  "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _results_tables(results: dict) -> list[str]:
    """Metric tables: one column per group of a nested results dict (e.g. fused + each branch)."""
    columns: dict[str, dict] = {}
    flat: dict[str, Any] = {}
    for key, value in results.items():
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()) and value:
            for sub, metrics in value.items():
                columns[f"{key}/{sub}"] = metrics
        elif isinstance(value, dict):
            columns[key] = value
        else:
            flat[key] = value
    if flat:
        columns = {"value": flat, **columns}
    rows = list(dict.fromkeys(k for metrics in columns.values() for k in metrics))
    out = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [_cell(metrics.get(row)) for metrics in columns.values()]
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)

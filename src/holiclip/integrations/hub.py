"""A model on the Hugging Face Hub: ``save_pretrained`` (a model folder with a model card) and
``push_to_hub`` (that folder uploaded), built on huggingface_hub (``HfApi``, ``ModelCard``).

Where a model comes from, the Hub included (``hf-hub:ORG/NAME[@REVISION]`` downloads), is
:mod:`holiclip.models.sources`; a pushed model loads back with ``load_model(f"hf-hub:{repo_id}")``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from ..io import atomic_path
from ..models import config_summary
from ..models.registry import save_model, stored_model_config
from ..models.sources import EVAL_FILE, HF_HUB_PREFIX, parse_hub_id

CARD_FILE = "README.md"
DEFAULT_LICENSE = "apache-2.0"  # holiclip's own; the weights' licence is the owner's call (push_to_hub(license=...))


class HubUploadError(RuntimeError):
    """An upload the Hub refused or could not receive; names the repo."""


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

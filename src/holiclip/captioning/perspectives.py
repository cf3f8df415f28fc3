"""Perspective registry: the paper's captioning prompts, plus user prompts from YAML.

A perspective is a named prompt; its name becomes the text slot name in the training JSONL
(``captions: {"detail": ...}``). The built-in prompts are the ones the Holistic CLIP authors
used (Wang et al., CVPR 2025, arXiv 2412.00440), word for word.

User YAML (``--perspectives-file``), either form::

    perspectives:
      colors: "List the main colours of the image."
      count:
        prompt: "How many objects are in the image? Answer with a number."
        max_new_tokens: 8

A user entry with a built-in name replaces the built-in prompt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import yaml


@dataclass(frozen=True)
class Perspective:
    name: str
    prompt: str
    max_new_tokens: int | None = None  # None: the run's --max-new-tokens


PAPER_PERSPECTIVES: dict[str, Perspective] = {
    p.name: p
    for p in (
        Perspective("detail", "Describe the image in detail."),
        Perspective("few-words", "Briefly describe the image with just a few words."),
        Perspective("one-sentence", "Briefly describe the image in one sentence."),
        Perspective("nouns", "Briefly describe the image with few noun words separated by ','."),
        Perspective(
            "style",
            "Describe the style or your feelings about this image, "
            "do not say anything about the objects in the image.",
        ),
        Perspective(
            "background",
            "Describe only the background of this image, "
            "do not say anything about the foreground objects.",
        ),
        Perspective(
            "main",
            "Describe only the one main object in the image, "
            "do not say anything about the other objects or background.",
        ),
    )
}

# The perspectives shown in the paper's figures next to the web caption.
DEFAULT_PERSPECTIVES = ("detail", "background", "main", "style")

# Slot names travel into JSONL keys and "perspective@model" slot names: keep them simple.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PerspectiveError(ValueError):
    pass


def _check_name(name: str, where: str) -> None:
    if not _NAME_RE.match(name):
        raise PerspectiveError(
            f"{where}: invalid perspective name {name!r} (letters, digits, '_', '-', '.'; no '@')"
        )


def load_perspectives_yaml(path: str | Path) -> dict[str, Perspective]:
    """Reads user perspectives from a YAML file (see the module docstring for the format)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise PerspectiveError(f"{path}: not valid YAML: {err}") from err
    if isinstance(data, Mapping) and "perspectives" in data:
        data = data["perspectives"]
    if not isinstance(data, Mapping) or not data:
        raise PerspectiveError(f"{path}: expected a mapping 'perspectives: {{name: prompt}}'")
    out: dict[str, Perspective] = {}
    for name, spec in data.items():
        name = str(name)
        where = f"{path}: perspectives.{name}"
        _check_name(name, where)
        max_new = None
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"prompt", "max_new_tokens"}
            if unknown:
                raise PerspectiveError(f"{where}: unknown field(s) {sorted(unknown)}")
            prompt, max_new = spec.get("prompt"), spec.get("max_new_tokens")
            if max_new is not None and (not isinstance(max_new, int) or max_new <= 0):
                raise PerspectiveError(f"{where}.max_new_tokens: expected a positive integer")
        else:
            prompt = spec
        if not isinstance(prompt, str) or not prompt.strip():
            raise PerspectiveError(f"{where}.prompt: expected a non-empty string")
        out[name] = Perspective(name, prompt.strip(), max_new)
    return out


def registry(extra_yaml: str | Path | None = None) -> dict[str, Perspective]:
    """The built-in perspectives, updated with those of ``extra_yaml``."""
    reg = dict(PAPER_PERSPECTIVES)
    if extra_yaml is not None:
        reg.update(load_perspectives_yaml(extra_yaml))
    return reg


def resolve_perspectives(
    names: str | Iterable[str] | None = None, extra_yaml: str | Path | None = None
) -> list[Perspective]:
    """Perspectives by name ("detail,background" or a list); "all" means every registered one.

    Unknown names raise and list what exists; repeated names are kept once.
    """
    reg = registry(extra_yaml)
    if names is None:
        names = list(DEFAULT_PERSPECTIVES)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if names == ["all"]:
        return list(reg.values())
    if not names:
        raise PerspectiveError("no perspective given")
    unknown = [n for n in names if n not in reg]
    if unknown:
        raise PerspectiveError(
            f"unknown perspective(s) {unknown}; known: {', '.join(reg)}"
            + ("" if extra_yaml else " (add your own with --perspectives-file)")
        )
    return [reg[n] for n in dict.fromkeys(names)]

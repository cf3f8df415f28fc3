"""Captioning backends: one interface, two built-in implementations, more from other packages.

A backend turns a batch of :class:`CaptionRequest` (image bytes + prompt) into one
:class:`CaptionResult` or one exception per request, so that a bad image or a failed request
never takes its batch-mates down with it. The runner (``pipeline``) decides batching and
concurrency from ``batch_size`` / ``concurrency``:
- ``openai``: one request per call, many concurrent calls (HTTP server does the batching);
- ``hf``: large batches, one at a time (one GPU per process; several via torchrun);
- others: a backend class (``Backend``; called as ``cls(model, **options)``) that any installed
  package declares under the ``holiclip.captioning.backends`` entry-point group, imported on
  first use (this project's own benchmark adds ``scene`` that way). ``holiclip caption run``
  passes it ``model=None`` when ``--model`` is not given, its ``--backend-option KEY=VALUE``
  pairs, ``concurrency`` / ``batch_size`` when given, and ``source``, the ``ImageSource``
  being captioned.
"""
from __future__ import annotations

from .base import Backend, CaptionError, CaptionFatalError, CaptionRequest, CaptionResult

__all__ = ["Backend", "CaptionError", "CaptionFatalError", "CaptionRequest", "CaptionResult", "backend_names",
           "make_backend"]

BUILTIN_BACKENDS = ("openai", "hf")
ENTRY_POINT_GROUP = "holiclip.captioning.backends"


def _plugins() -> dict:
    from importlib.metadata import entry_points  # read only when a plugin is asked for

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_names() -> list[str]:
    return [*BUILTIN_BACKENDS, *sorted(set(_plugins()) - set(BUILTIN_BACKENDS))]


def make_backend(name: str, model: str | None, **options) -> Backend:
    """Builds a backend by name; options are the backend class's keyword arguments."""
    if name == "openai":
        from holiclip._extras import require

        require("httpx", "caption", "the openai captioning backend")
        from .openai import OpenAIBackend

        return OpenAIBackend(model, **options)
    if name == "hf":
        from holiclip._extras import require

        require("transformers", "caption", "the hf captioning backend")
        from .hf import HFBackend

        return HFBackend(model, **options)
    plugin = _plugins().get(name)
    if plugin is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")
    return plugin.load()(model, **options)

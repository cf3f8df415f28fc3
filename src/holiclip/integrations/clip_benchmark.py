"""holiclip models in CLIP_benchmark (``clip_benchmark``, the extra ``holiclip[bench]``).

:func:`load_holiclip` is a CLIP_benchmark model loader (its ``(model_name, pretrained,
cache_dir, device) -> (model, transform, tokenizer)`` signature); :func:`register` adds it to
CLIP_benchmark's model types as ``holiclip``; :func:`run_clip_benchmark` runs CLIP_benchmark's
own command line (``clip_benchmark eval ...``) with it, so every dataset and task it has works.

The fusion is chosen by the *model name*: ``FUSION[@BRANCH+BRANCH...]``, e.g. ``mean`` (every
branch, the default; an empty name or ``holiclip`` too), ``mean@main`` or ``norm-max@main+detail``.
The name goes into CLIP_benchmark's result file name and its JSON ``model`` field, so runs with
different fusions never overwrite each other. CLIP_benchmark L2-normalises image embeddings, so
``mean-logits`` ranks as ``mean`` there.

While it runs, CLIP_benchmark's result JSON gets holiclip's ``ties``, ``fusion`` and ``branches``
(null: all) as top-level keys, and its zero-shot ``accuracy`` is replaced by
:func:`topk_accuracy` (the same numbers; its own fails on NumPy 2.4).
"""
from __future__ import annotations

import contextlib
import json
import sys
import traceback
from pathlib import Path
from typing import Sequence

import torch

from .._extras import require
from ..evaluation.retrieval import dense_ranks
from ..models.factory import FusedCLIP
from ..models.fusion import FUSION_MODES
from ..models.registry import get_tokenizer, get_transforms, load_model

MODEL_TYPE = "holiclip"
CB_TIES = "clip-benchmark"
# set by holiclip from --checkpoint / --fusion / --branches; a second value would be ambiguous
RESERVED_ARGS = ("--model", "--pretrained", "--model_type", "--pretrained_model")


class BenchError(ValueError):
    """Bad input for the CLIP_benchmark integration: the message names the option or value."""


def require_clip_benchmark():
    # the parts used here, with their dependencies
    require("clip_benchmark.cli", "bench", "holiclip eval clip-benchmark")
    require("clip_benchmark.models", "bench", "holiclip eval clip-benchmark")
    return require("clip_benchmark", "bench", "holiclip eval clip-benchmark")


def parse_model_name(model_name: str | None) -> tuple[str, list[str] | None]:
    """``"norm-max@main+detail"`` -> ``("norm-max", ["main", "detail"])``; ``"mean"`` -> ``("mean", None)``."""
    name = (model_name or "").strip()
    if name in ("", MODEL_TYPE):
        return "mean", None
    fusion, _, subset = name.partition("@")
    fusion = fusion or "mean"
    if fusion not in FUSION_MODES:
        raise BenchError(f"model name {model_name!r}: unknown fusion {fusion!r}; the name is FUSION[@BRANCH+BRANCH] "
                         f"with FUSION one of {list(FUSION_MODES)}")
    branches = [b.strip() for b in subset.split("+") if b.strip()] or None
    return fusion, branches


def model_name_for(fusion: str = "mean", branches: Sequence[str] | None = None) -> str:
    return fusion + ("@" + "+".join(branches) if branches else "")


def load_holiclip(model_name: str, pretrained: str, cache_dir: str | None = None, device="cuda"):
    """CLIP_benchmark's loader signature. ``pretrained``: what :func:`holiclip.load_model` takes
    (a model or run folder, a ``.safetensors`` file, ``hf-hub:ORG/NAME``); ``model_name``: the fusion, as the module
    docstring says. ``cache_dir`` is not used (nothing is downloaded here)."""
    fusion, branches = parse_model_name(model_name)
    model = load_model(pretrained, device=device).eval()
    return FusedCLIP(model, fusion, branches).eval(), get_transforms(model), get_tokenizer(model.model_name)


def register(model_type: str = MODEL_TYPE) -> None:
    """Adds :func:`load_holiclip` to CLIP_benchmark's model types (``--model_type holiclip``).
    Its command line reads ``MODEL_TYPES`` as the choices of ``--model_type``: extended in place."""
    cb = require_clip_benchmark()
    cb.models.TYPE2FUNC[model_type] = load_holiclip
    if model_type not in cb.models.MODEL_TYPES:
        cb.models.MODEL_TYPES.append(model_type)


def pessimistic_recall_at_k(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> torch.Tensor:
    """Stands in for CLIP_benchmark's ``zeroshot_retrieval.recall_at_k`` (same arguments; only
    ``> 0`` of its result is used): 1 where the best correct item ranks in the top k with ties
    counted against it, as ``holiclip eval retrieval`` counts them."""
    ranks = dense_ranks(scores, positive_pairs.bool(), "pessimistic")
    return ((ranks >= 0) & (ranks < k)).float()


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """CLIP_benchmark's ``zeroshot_classification.accuracy`` (the same counts), summing to a 0-d
    value: its own converts a 1-element array with ``float()``, which NumPy 2.4 refuses
    (LAION-AI/CLIP_benchmark issue 147), so its zero-shot classification stops there."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].float().sum()) / len(target) for k in topk]


class _ResultJson:
    """CLIP_benchmark's ``json`` module as its command line sees it: the result it dumps gets
    holiclip's settings (tie rule, fusion, branches) as top-level keys; all else is ``json``."""

    def __init__(self, extra: dict):
        self.extra = extra

    def dump(self, obj, fp, *args, **kwargs):
        if isinstance(obj, dict) and "metrics" in obj and "task" in obj:
            obj = {**obj, **self.extra}
        return json.dump(obj, fp, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(json, name)


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def default_output(checkpoint: str) -> str:
    """CLIP_benchmark's default file name with the checkpoint as a flat slug: its own default
    puts a folder path (slashes) into the file name, which points into folders that do not exist."""
    slug = str(checkpoint).strip("/").replace("/", "_").replace("{", "{{").replace("}", "}}")
    return "{dataset}_" + slug + "_{model}_{language}_{task}.json"


def run_clip_benchmark(
    checkpoint: str | Path,
    args: Sequence[str],
    fusion: str = "mean",
    branches: Sequence[str] | None = None,
    ties: str = CB_TIES,
) -> int:
    """``clip_benchmark eval ARGS`` on a holiclip model: CLIP_benchmark's own command line with
    ``--model_type holiclip --model FUSION[@BRANCHES] --pretrained CHECKPOINT``. ``ties``:
    ``clip-benchmark`` (its ``topk`` order, its published numbers) or ``pessimistic`` (holiclip's
    rule: its retrieval recall is replaced by holiclip's count). Returns its exit status."""
    args = [str(a) for a in args]
    if args[:1] == ["eval"]:
        args = args[1:]
    taken = [a for a in args if a.split("=", 1)[0] in RESERVED_ARGS]
    if taken:
        raise BenchError(f"{', '.join(taken)}: set from --checkpoint / --fusion / --branches by holiclip; leave them out")
    if ties not in (CB_TIES, "pessimistic"):
        raise BenchError(f"--ties must be {CB_TIES} or pessimistic, got {ties!r}")
    if not str(checkpoint).startswith("hf-hub:") and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    cb = require_clip_benchmark()
    register()
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

    task = next((a.split("=", 1)[1] if "=" in a else nxt for a, nxt in zip(args, args[1:] + [""])
                 if a.split("=", 1)[0] == "--task"), None)
    if task == "linear_probe" and not torch.cuda.is_available():
        raise BenchError("CLIP_benchmark's linear probe runs on CUDA only (its linear_probe.evaluate asserts "
                         "device == 'cuda'); no CUDA device here")
    name = model_name_for(fusion, branches)
    parse_model_name(name)  # a bad fusion fails here, before any data is read
    argv = ["clip_benchmark", "eval", *args, "--model_type", MODEL_TYPE, "--model", name, "--pretrained", str(checkpoint)]
    if not any(a.split("=", 1)[0] == "--output" for a in args):
        argv += ["--output", default_output(str(checkpoint))]
    extra = {"ties": ties, "fusion": fusion, "branches": list(branches) if branches else None}
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(sys, "argv", argv))
        stack.enter_context(_patched(cb.cli, "json", _ResultJson(extra)))
        stack.enter_context(_patched(zeroshot_classification, "accuracy", topk_accuracy))
        if ties == "pessimistic":
            stack.enter_context(_patched(zeroshot_retrieval, "recall_at_k", pessimistic_recall_at_k))
        try:
            return cb.cli.main() or 0
        except AssertionError as err:  # its checks are bare asserts: name where it stopped
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.lineno}"
            raise BenchError(f"CLIP_benchmark stopped at {where}: {err or frame.line}") from None

"""The side-by-side run behind ``make demo``: CLIP vs O2M vs Holistic CLIP on the built-in
emoji benchmark, same images, steps and batch size for every variant.

Variants are training configurations, one YAML file each among the shipped configs, ``demo/<name>`` (the paper's
section 5 comparison); a mode (quick / default / full) sets their schedule and seeds:
  clip             H = 1, trained on the web caption only
  o2m              H = 1, all text slots (one-to-many)
  holistic_cls     H = M, Psi_CLS, the paper's M2M loss
  holistic_mlp     H = M, Psi_MLP, the paper's M2M loss
  holistic_hybrid  H = M, Psi_CLS, fused_weight 0.5 (ours, beyond the paper)
"""
from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml

from holiclip.evaluation.report import write_json
from holiclip.io import cache_root
from holiclip.models.registry import load_model
from holiclip.training.checkpoint import RunFolderError
from holiclip.training.config import TrainConfig, load_config, with_defaults
from holiclip.training.presets import CONFIG_DIR
from holiclip.training.trainer import read_metrics, train

from .data import build as emoji
from .evaluate import evaluate_emoji
from .report import describe_machine, write_report

log = logging.getLogger(__name__)

SLOTS = ["web", "detail", "nouns", "background", "main"]


# The variants' YAML files ship with the package (holiclip configs list: demo/..., ablations/...)
VARIANT_DIR = CONFIG_DIR / "demo"
ABLATION_DIR = VARIANT_DIR.parent / "ablations"
VARIANTS = ("clip", "o2m", "holistic_cls", "holistic_mlp", "holistic_hybrid")
ABLATIONS = ("texts_h2", "texts_h3", "texts_h4", "holistic_mlp_l3", "holistic_cls_diversity", "fused_o2m_h5")


@dataclass(frozen=True)
class Variant:
    name: str
    config: Path  # the training recipe; its `demo:` section (ignored by training) gives the label
    label: str
    ours: bool = False  # beyond the paper


@functools.cache
def load_variant(name: str) -> Variant:
    path = next((d / f"{name}.yaml" for d in (VARIANT_DIR, ABLATION_DIR) if (d / f"{name}.yaml").is_file()),
                VARIANT_DIR / f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"demo variant config {path} not found: the demo runs from a source checkout "
                         "or an editable install (pip install -e .)")
    meta = (yaml.safe_load(path.read_text()) or {}).get("demo")
    if not (isinstance(meta, dict) and set(meta) <= {"label", "beyond_paper"} and isinstance(meta.get("label"), str)
            and isinstance(meta.get("beyond_paper", False), bool)):
        raise ValueError(f"{path}: needs a section demo: {{label: <text>, beyond_paper: true|false}}, got {meta!r}")
    return Variant(name, path, meta["label"], meta.get("beyond_paper", False))


@dataclass(frozen=True)
class Mode:
    name: str
    preset: str
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    warmup: int = 50
    eval_limit: int | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)


MODES = {
    # tiny data, a handful of steps: exercises every code path in well under a minute
    "quick": Mode("quick", "tiny", steps=4, batch_size=8, seeds=(0,), warmup=1),
    "default": Mode("default", "default", steps=600, batch_size=128, seeds=(0,)),
    "full": Mode("full", "default", steps=600, batch_size=128, seeds=(0, 1, 2)),
}


def train_overrides(mode: Mode, data: Path, out: Path, seed: int, cache_dir: Path) -> list[str]:
    """Set on top of every variant's YAML: the mode's schedule (the same for all), paths and seed."""
    return [
        f"data.train={data / 'train.jsonl'}", f"optim.steps={mode.steps}", f"optim.batch_size={mode.batch_size}",
        f"optim.warmup_steps={mode.warmup}", f"run.out={out}", f"run.seed={seed}",
        f"run.save_every={max(50, mode.steps // 4)}", f"run.cache_dir={cache_dir}", *mode.extra,
    ]


def variant_config(mode: Mode, name: str, data: Path, out: Path, seed: int, cache_dir: Path) -> TrainConfig:
    return load_config(load_variant(name).config, train_overrides(mode, data, out, seed, cache_dir))


def run_variant(mode: Mode, variant: Variant, data: Path, out: Path, seed: int, cache_dir: Path,
                reuse: Sequence[Path] = (), evaluator=None) -> dict:
    """Trains (or resumes / reuses a finished run) then evaluates one variant and seed.

    A finished run with the same training settings is reused from ``out`` or from any folder in
    ``reuse`` (as ``<folder>/<variant>/seed<k>``). ``evaluator(run_dir, data, trained)``, when
    given, replaces the demo's evaluation (and its ``eval.json`` in the run folder)."""
    run_dir = out / variant.name / f"seed{seed}"
    cfg = variant_config(mode, variant.name, data, run_dir, seed, cache_dir)
    found = finished_run(cfg, [run_dir, *(Path(r) / variant.name / f"seed{seed}" for r in reuse)])
    train_s = None
    if found is not None:
        run_dir = found
        log.info("[%s seed %d] finished run found in %s: reusing it", variant.name, seed, run_dir)
    else:
        log.info("[%s seed %d] training %d steps x %d images", variant.name, seed, mode.steps, mode.batch_size)
        t0 = time.perf_counter()
        try:
            train(cfg, resume="latest")
        except RunFolderError as err:  # the demo's own folder holds a run with other settings
            log.info("[%s seed %d] starting over: %s", variant.name, seed, str(err).splitlines()[0])
            train(cfg, overwrite=True)
        train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eval_file = run_dir / "eval.json"
    if evaluator is not None:
        metrics = evaluator(run_dir, data, train_s is not None)
    elif train_s is None and eval_file.exists():  # same finished run: its evaluation stands
        metrics = json.loads(eval_file.read_text())
    else:
        model = load_model(run_dir / "model")
        metrics = evaluate_emoji(model, data, slots=SLOTS, limit=mode.eval_limit)
        write_json(eval_file, metrics)
    eval_s = time.perf_counter() - t0
    logged = read_metrics(run_dir)
    curve = [{"step": m["step"], "loss": m["loss"]} for m in logged]
    return {"metrics": metrics, "train_seconds": train_s, "eval_seconds": eval_s, "curve": curve,
            "logged_train_seconds": logged_train_seconds(logged, cfg.optim.batch_size), "run_dir": str(run_dir)}


def finished_run(cfg: TrainConfig, candidates: Sequence[Path]) -> Path | None:
    """The first folder holding a finished run trained with ``cfg``'s settings, if any."""
    for run_dir in candidates:
        done = Path(run_dir) / "model" / "holiclip_config.json"
        if done.is_file() and _same_run(json.loads(done.read_text()).get("train_config"), cfg.to_dict()):
            return Path(run_dir)
    return None


def logged_train_seconds(logged: list[dict], batch_size: int) -> float | None:
    """A run's training time as its metrics log measured it: the steps between two log lines
    over the throughput logged with the second (data loading and steps included, start-up and
    checkpoint writes between log lines partly)."""
    total, prev = 0.0, 0
    for m in logged:
        rate = m.get("samples_per_s")
        if not rate:
            return None
        total += (m["step"] - prev) * batch_size / rate
        prev = m["step"]
    return total if logged else None


def text_features_dir() -> Path:
    """The text-feature caches the demo's runs share: ``run.cache_dir``'s default."""
    return Path(TrainConfig().run.cache_dir)


def _in_cache(path: str) -> str:
    """A path under the cache root as ``<cache>/...``, whichever root: runs recorded when the demo's data
    lived in the working folder's ``.cache/holiclip`` compare equal to the same data in today's root."""
    for root in (f"{cache_root()}/", ".cache/holiclip/"):
        if path.startswith(root):
            return "<cache>/" + path[len(root):]
    return path


def _same_run(saved: dict | None, wanted: dict) -> bool:
    """Same training, wherever the run folder, the caches and the cache root were (a copied run is reused)."""
    def strip(c):
        return {**c, "run": {k: v for k, v in c["run"].items() if k not in ("out", "cache_dir")},
                "data": {**c["data"], "train": _in_cache(str(c["data"]["train"]))}}

    # a key added since the saved run was trained compares as its default
    return saved is not None and strip(with_defaults(saved)) == strip(wanted)


def _variant_job(args: tuple) -> tuple[str, int, dict]:
    """One (variant, seed) in a worker process with its own thread budget."""
    mode, name, data, out, seed, cache_dir, threads, reuse, evaluator = args
    torch.set_num_threads(threads)
    return name, seed, run_variant(mode, load_variant(name), data, out, seed, cache_dir, reuse, evaluator)


def _worker_logging(queue, level: int) -> None:
    """In a worker process: holiclip's records go through ``queue`` to the parent's loggers, so that
    they reach whatever the parent shows or stores them with."""
    logger = logging.getLogger("holiclip")
    logger.handlers[:] = [logging.handlers.QueueHandler(queue)]
    logger.setLevel(level)
    logger.propagate = False


class _ToOwnLogger:
    """QueueListener target: hands a worker's record to the parent's logger of the same name."""

    @staticmethod
    def handle(record: logging.LogRecord) -> None:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def threads_per_run(jobs: int, runs: int) -> int:
    """Torch threads of each run when ``jobs`` run side by side (a run alone keeps this process's)."""
    if jobs <= 1 or runs == 1:
        return torch.get_num_threads()
    return max(1, (os.cpu_count() or 1) // jobs)


def run_jobs(mode: Mode, names: list[str], data: Path | dict[str, Path], out: Path, cache_dir: Path, jobs: int,
             reuse: Sequence[Path] = (), evaluator=None, work: Sequence[tuple[str, int]] | None = None,
             on_result=None) -> dict:
    """All (variant, seed) runs (``data``: one dataset, or one per variant name), or the ``work``
    pairs given. With ``jobs`` > 1 they run side by side in worker processes, cores / jobs threads
    each: on a 2-core CPU two single-thread runs train ~1.6x faster together than one 2-thread run
    (bench/bench_demo_step.py). A run left alone at the end gets every thread.
    ``on_result(name, seed, result)`` is called in this process as each run's result arrives."""
    cpus = os.cpu_count() or 1
    data_of = data if isinstance(data, dict) else dict.fromkeys(names, data)
    work = list(work) if work is not None else [(name, seed) for seed in mode.seeds for name in names]
    results = {}

    def done(name: str, seed: int, result: dict) -> None:
        results[(name, seed)] = result
        if on_result is not None:
            on_result(name, seed, result)

    if jobs <= 1 or len(work) <= 1:
        for n, s in work:
            done(n, s, run_variant(mode, load_variant(n), data_of[n], out, s, cache_dir, reuse, evaluator))
        return results
    per_job = threads_per_run(jobs, len(work))
    paired = len(work) - len(work) % jobs
    args = [(mode, n, data_of[n], out, s, cache_dir, per_job if i < paired else cpus, tuple(reuse), evaluator)
            for i, (n, s) in enumerate(work)]
    context = mp.get_context("spawn")
    queue = context.Queue()
    listener = logging.handlers.QueueListener(queue, _ToOwnLogger())
    listener.start()
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_logging,
                                 initargs=(queue, logging.getLogger("holiclip").getEffectiveLevel())) as pool:
            for name, seed, result in pool.map(_variant_job, args):
                done(name, seed, result)
    finally:
        listener.stop()
    return results


def warm_text_cache(model_name: str, data: Path, cache_dir: Path) -> None:
    """Caches the frozen text trunk's features of every training text once, before workers start."""
    from holiclip.data.loader import MultiTextDataset, load_manifest
    from holiclip.models.registry import create_model, get_tokenizer
    from holiclip.training.text_cache import TextCache

    model = create_model(model_name, branches=["global"], lock_text=True)
    if not model.text_trunk_frozen():
        return
    tokenizer = get_tokenizer(model_name)
    texts = MultiTextDataset(load_manifest(data / "train.jsonl", SLOTS), transform=None).iter_texts()
    filled = TextCache.open(cache_dir, model, tokenizer).ensure(texts, model, tokenizer, "cpu")
    log.info("text features: %d training texts, %d new in the cache", filled["texts"], filled["new"])


def aggregate(per_seed: list[dict]) -> dict:
    """Mean and spread (std over seeds) of the fused, routed and per-branch metrics."""
    def stats(dicts):
        keys = dicts[0].keys()
        return {k: float(np.mean([d[k] for d in dicts])) for k in keys}, (
            {k: float(np.std([d[k] for d in dicts])) for k in keys} if len(dicts) > 1 else {}
        )

    fused, fused_std = stats([r["metrics"]["fused"] for r in per_seed])
    out = {"metrics": fused, "metrics_std": fused_std, "seeds": len(per_seed)}
    if per_seed[0]["metrics"].get("routed"):
        out["routed"], out["routed_std"] = stats([r["metrics"]["routed"] for r in per_seed])
    branches = per_seed[0]["metrics"].get("per_branch") or {}
    out["per_branch"] = {b: stats([r["metrics"]["per_branch"][b] for r in per_seed])[0] for b in branches}
    times = [r["train_seconds"] for r in per_seed if r["train_seconds"] is not None]
    out["train_seconds"] = float(np.mean(times)) if times else None
    out["eval_seconds"] = float(np.mean([r["eval_seconds"] for r in per_seed]))
    out["curves"] = [r["curve"] for r in per_seed]
    return out


def run_demo(mode_name: str = "default", variants: list[str] | None = None, out: str | Path = "runs/demo",
             data_dir: str | Path | None = None, steps: int | None = None, seeds: int | None = None,
             jobs: int | None = None, command: str | None = None) -> dict:
    """Builds or reuses the data, trains and evaluates every variant and seed, writes the report.
    ``command`` is what the report names as the command that produced it (the CLI passes its own)."""
    if command is None:
        given = {"variants": variants, "out": str(out), "data_dir": data_dir, "steps": steps, "seeds": seeds,
                 "jobs": jobs}
        command = f"run_demo({mode_name!r}" + "".join(f", {k}={v!r}" for k, v in given.items() if v is not None) + ")"
    mode = MODES[mode_name]
    if steps:
        mode = replace(mode, steps=steps)
    if seeds:
        mode = replace(mode, seeds=tuple(range(seeds)))
    names = variants or list(VARIANTS)
    jobs = jobs if jobs is not None else min(2, os.cpu_count() or 1)
    unknown = [v for v in names if v not in VARIANTS + ABLATIONS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS + ABLATIONS)}")
    # each variant's config (its YAML + this mode) is checked before the data build and any training;
    # the paths here are placeholders
    models = sorted({variant_config(mode, n, Path("."), Path(out), 0, Path(".")).model.name for n in names})
    out = Path(out)
    cache_dir = text_features_dir()
    t_start = time.perf_counter()
    data = Path(data_dir) if data_dir else cache_root() / f"emoji-{mode.preset}"
    t0 = time.perf_counter()
    if data_dir:  # the user's folder: its dataset is used as it is, never rebuilt over
        emoji.use_or_build(data, emoji.preset(mode.preset))
    else:
        log.info("building / reusing the emoji benchmark (%s) in %s", mode.preset, data)
        emoji.build(data, emoji.preset(mode.preset))
    data_s = time.perf_counter() - t0
    for model_name in models:
        warm_text_cache(model_name, data, cache_dir)
    runs = run_jobs(mode, names, data, out, cache_dir, jobs)
    n_runs = len(runs)
    results = {}
    for name in names:
        per_seed = [runs[(name, s)] for s in mode.seeds]
        v = load_variant(name)
        results[name] = {"label": v.label, "beyond_paper": v.ours, **aggregate(per_seed)}
    summary = {
        "variants": results,
        "config": {**asdict(mode), "model": ", ".join(models),
                   "variant_configs": {n: str(load_variant(n).config) for n in names},
                   "jobs": jobs, "slots": SLOTS, "data": str(data), "data_meta": _meta(data)},
        "timing": {"data_seconds": data_s, "total_seconds": time.perf_counter() - t_start},
        "machine": describe_machine(max(1, min(jobs, n_runs)), threads_per_run(jobs, n_runs), command),
    }
    write_report(summary, out)
    return summary


def _meta(data: Path) -> dict:
    path = data / "meta.json"
    if not path.exists():
        return {}
    meta = json.loads(path.read_text())
    return {k: meta[k] for k in ("params", "splits", "sources") if k in meta}

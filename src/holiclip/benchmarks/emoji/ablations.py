"""``holiclip demo --ablations``: the paper's ablations on the emoji benchmark, with the demo's
recipe (data, steps, batch) and seeds, each number a mean and std over seeds.

Runs are the demo's (``demo.run_jobs``: train what is missing, reuse any finished run with the
same training settings, here or in the ``reuse`` folders) and are evaluated from their saved
models with the ablation options of :func:`~.evaluate.evaluate_emoji` (every fusion mode, branch
subsets, the OpenMoji held-out style, the dense linear probe, the branches' cosine); evaluations
are cached in ``<out>/evaluations`` against the model file, the data and these settings.

What is compared, each beside the paper's number or trend, with a reading computed by
:func:`verdict`: Table 7 (fusion modes), Table 8 (branch subsets), Table 9 (H = M texts, with
the text similarity of each slot set as ``holiclip caption stats`` measures it), Psi_MLP with
L = 3 vs L = 1 vs Psi_CLS, the diversity regulariser, a fused-O2M control, the demo's five
variants with seeds, a two-style training set (:mod:`.twostyle`) against OpenMoji, and the
dense linear probe (:mod:`holiclip.evaluation.dense_probe`).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from holiclip.evaluation.report import write_json
from holiclip.io import cache_root

from . import demo, twostyle
from .data import build as emoji
from .report import describe_machine, machine_lines, markdown

log = logging.getLogger(__name__)

EVAL_VERSION = 1  # bump when the evaluation below changes: cached evaluations are redone
FUSIONS = ("mean", "mean-logits", "max", "norm-max")
# the paper's Table 8 subsets beside each single branch: the object and long-text branches together,
# and every branch but the web caption's
SUBSETS = {"detail+main": ["detail", "main"], "all but web": ["detail", "nouns", "background", "main"]}
TEXT_ORDER = ["web", "detail", "main", "background", "nouns"]  # Table 9 adds slots in this order
TEXTS_H = {1: "clip", 2: "texts_h2", 3: "texts_h3", 4: "texts_h4", 5: "holistic_cls"}
DEFAULT_DATA = ("clip", "o2m", "holistic_cls", "holistic_mlp", "holistic_hybrid", "texts_h2", "texts_h3", "texts_h4",
                "holistic_mlp_l3", "holistic_cls_diversity", "fused_o2m_h5")
TWO_STYLE = ("twostyle_clip", "twostyle_o2m", "twostyle_holistic_cls")
# The budget (3.5 h of a 2-core CPU for every run: ~12 min a run, two side by side, evaluation included)
# fits 34 runs, not 42: these ablations get 2 seeds in the full run, the demo's variants (the headline
# ordering, Psi_MLP, the hybrid) and Psi_MLP with L = 3 keep 3
TWO_SEEDS = ("texts_h2", "texts_h3", "texts_h4", "holistic_cls_diversity", "fused_o2m_h5") + TWO_STYLE
# --quick: one variant of each kind (baseline, H = M texts, Psi_CLS, Psi_MLP, regulariser, control, two styles)
QUICK = ("clip", "texts_h2", "holistic_cls", "holistic_mlp_l3", "holistic_cls_diversity", "fused_o2m_h5",
         "twostyle_holistic_cls")
RETRIEVAL = ["short_i2t_r1", "short_t2i_r1", "long_i2t_r1", "long_t2i_r1"]
METRICS = RETRIEVAL + ["zeroshot_main_top1", "zeroshot_background_top1", "zeroshot_heldout_style_top1",
                       "zeroshot_heldout_style_openmoji_top1", "dense_miou", "dense_probe_miou"]
NAMES = {"short_i2t_r1": "short I2T", "short_t2i_r1": "short T2I", "long_i2t_r1": "long I2T",
         "long_t2i_r1": "long T2I", "zeroshot_main_top1": "ZS main", "zeroshot_background_top1": "ZS bg",
         "zeroshot_heldout_style_top1": "ZS held-out", "zeroshot_heldout_style_openmoji_top1": "ZS OpenMoji",
         "dense_miou": "dense ZS mIoU", "dense_probe_miou": "probe mIoU", "branch_cosine": "branch cos"}

HOLDS, AGAINST, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Settings:
    """What an ablation run evaluates with (part of the cached evaluations' stamp)."""
    eval_limit: int | None = None
    probe_images: int = 1000  # training scenes the dense probe is fitted on
    similarity_images: int = 1000  # images whose texts Table 9's similarity is measured on
    version: int = EVAL_VERSION


# -- the reading rule ----------------------------------------------------------------------
def verdict(a: float, b: float, spread_a: float | None, spread_b: float | None) -> str:
    """The paper's claim "a > b" against the measurement: ``holds`` when a - b exceeds twice the
    larger seed spread (std over seeds), ``does not hold`` when b - a does, ``inconclusive``
    when the gap is within it or there is no spread (a single seed)."""
    spreads = [s for s in (spread_a, spread_b) if s is not None]
    if not spreads:
        return INCONCLUSIVE
    margin = 2 * max(spreads)
    if a - b > margin:
        return HOLDS
    if b - a > margin:
        return AGAINST
    return INCONCLUSIVE


def overall(verdicts: Sequence[str]) -> str:
    """A claim over several metrics: holds when it holds on every one, does not hold when it
    fails beyond the spread on at least one, inconclusive otherwise."""
    if not verdicts:
        return INCONCLUSIVE
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if AGAINST in verdicts:
        return AGAINST
    return INCONCLUSIVE


def reading(claim: str, checks: list[tuple[str, str]]) -> dict:
    """One table's reading: ``checks`` are (what, verdict) pairs."""
    verdicts = [v for _, v in checks]
    counts = {k: verdicts.count(k) for k in (HOLDS, INCONCLUSIVE, AGAINST) if verdicts.count(k)}
    return {"claim": claim, "verdict": overall(verdicts), "counts": counts, "checks": checks}


def reading_line(r: dict) -> str:
    if not r["checks"]:
        return f"**Reading: not measured in this run.** Claim: {r['claim']}"
    counts = ", ".join(f"{k} on {n}" for k, n in r["counts"].items())
    detail = "; ".join(f"{what}: {v}" for what, v in r["checks"])
    return f"**Reading: {r['verdict']}** ({counts} of {len(r['checks'])}). Claim: {r['claim']}. Per check: {detail}."


# -- statistics over seeds -----------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def seed_stats(per_seed: list[dict]) -> dict[str, dict]:
    """``{dotted key: {"mean", "std" (None for one seed), "n"}}`` over the seeds' metrics."""
    flat = [flatten(m) for m in per_seed]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {k: {"mean": float(np.mean([f[k] for f in flat])),
                "std": float(np.std([f[k] for f in flat])) if len(flat) > 1 else None, "n": len(flat)}
            for k in keys}


class Results:
    """The aggregated results: ``get(variant, key)`` -> (mean, std) or None where not measured."""

    def __init__(self, variants: dict):
        self.variants = variants

    def get(self, variant: str, key: str):
        s = self.variants.get(variant, {}).get("stats", {}).get(key)
        return None if s is None else (s["mean"], s["std"])

    def has(self, *variants: str) -> bool:
        return all(v in self.variants for v in variants)

    def cell(self, variant: str, key: str, digits: int = 1) -> str:
        s = self.get(variant, key)
        if s is None:
            return "-"
        mean, std = s
        return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}±{std:.{digits}f}"

    def check(self, what: str, a: tuple[str, str], b: tuple[str, str], digits: int = 1) -> tuple[str, str] | None:
        """(what, verdict of "a > b") for (variant, key) pairs, None when either is missing."""
        sa, sb = self.get(*a), self.get(*b)
        if sa is None or sb is None:
            return None
        return f"{what} {sa[0]:.{digits}f} vs {sb[0]:.{digits}f}", verdict(sa[0], sb[0], sa[1], sb[1])


def _checks(items) -> list:
    return [c for c in items if c is not None]


# -- evaluation of one run -----------------------------------------------------------------
def evaluate_run(run_dir: Path, data: Path, trained: bool, out: Path, settings: Settings) -> dict:
    """The ablation evaluation of a saved model, cached in ``<out>/evaluations/<variant>/seed<k>.json``
    as long as the model file, the data and the settings are the same."""
    from holiclip.models.registry import load_model

    from .evaluate import evaluate_emoji

    run_dir = Path(run_dir)
    model_file = run_dir / "model" / "model.safetensors"
    st = model_file.stat()
    stamp = {"model": str(model_file.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "data_key": data_key(data), "settings": settings.__dict__}
    cache = Path(out) / "evaluations" / run_dir.parent.name / f"{run_dir.name}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp:
            return saved["metrics"]
    seed = int(run_dir.name.removeprefix("seed")) if run_dir.name.startswith("seed") else 0
    model = load_model(run_dir / "model")
    metrics = evaluate_emoji(model, data, slots=demo.SLOTS, limit=settings.eval_limit, fusions=FUSIONS,
                             subsets=SUBSETS, styles=("openmoji",), probe_images=settings.probe_images,
                             probe_seed=seed)
    write_json(cache, {"stamp": stamp, "metrics": metrics})
    return metrics


def text_similarity(data: Path, images: int, seed: int = 0, embedder=None) -> dict:
    """Table 9's statistic for each slot set {web}, {web, detail}, ... (TEXT_ORDER): the mean over
    images of the mean pairwise cosine between an image's texts, in the MiniLM sentence space,
    computed as ``holiclip caption stats`` does (its embedder and pairwise mean), on a seeded
    sample of ``images`` training images."""
    import torch

    from holiclip.captioning.stats import MiniLMEmbedder, mean_pairwise_cosine

    rows = emoji.read_rows(data, "train")
    if len(rows) > images:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), images))]
    texts = [r["captions"][s] for r in rows for s in TEXT_ORDER]
    emb = torch.nn.functional.normalize(torch.as_tensor((embedder or MiniLMEmbedder())(texts)).float(), dim=-1)
    emb = emb.view(len(rows), len(TEXT_ORDER), -1)
    out = {}
    for k in range(2, len(TEXT_ORDER) + 1):
        out[k] = float(np.mean([mean_pairwise_cosine(e[:k]) for e in emb]))
    return {"images": len(rows), "order": TEXT_ORDER, "by_h": out}


def variant_seeds(mode: "demo.Mode", name: str, seeds: int | None) -> tuple[int, ...]:
    """The seeds a variant runs with: the budget's two for TWO_SEEDS unless a number was asked for."""
    return mode.seeds[:2] if seeds is None and name in TWO_SEEDS else mode.seeds


# -- the record of finished runs ---------------------------------------------------------------
# The full set of runs takes longer than one sitting on a 2-core CPU, and run folders (weights,
# checkpoints) are not kept with the source. Each finished run's numbers are therefore recorded as
# one small JSON file beside the published report (docs/reproduction/runs/<variant>/seed<k>.json):
# its training settings, data key, evaluation settings, metrics, times and machine. A later command
# uses a record instead of training again when all three still match, so the runs can be spread over
# several sittings or machines, and anyone can re-derive the report from the recorded numbers.
# the checkout this module runs from (src/holiclip/benchmarks/emoji/ablations.py -> the checkout):
# only `--publish` writes there
CHECKOUT = Path(__file__).resolve().parents[4]
DOCS = CHECKOUT / "docs" / "reproduction.md"
RECORDS = DOCS.with_suffix("") / "runs"


def data_key(data: Path) -> str:
    return json.loads((Path(data) / "meta.json").read_text())["key"]


def record_path(records: Path, name: str, seed: int) -> Path:
    return Path(records) / name / f"seed{seed}.json"


def loss_terms(run_dir: str | Path) -> dict:
    """Each named loss term of a run's metrics log: at how many logged steps it was above zero, its
    largest and last value (shows whether a hinge term such as the diversity penalty ever acted)."""
    from holiclip.training.trainer import read_metrics

    rows = read_metrics(run_dir)
    names = sorted({k for r in rows for k in r if k.endswith("_loss")})
    return {k: {"logged_steps": sum(k in r for r in rows), "active_steps": sum(r.get(k, 0.0) > 0 for r in rows),
                "max": max(r.get(k, 0.0) for r in rows), "last": next(r[k] for r in reversed(rows) if k in r)}
            for k in names}


def write_record(records: Path, name: str, seed: int, result: dict, data: Path, settings: Settings,
                 machine: dict) -> None:
    """One finished run's numbers, with what they were measured under."""
    saved = json.loads((Path(result["run_dir"]) / "model" / "holiclip_config.json").read_text())
    config = saved["train_config"]
    config = {**config, "run": {k: v for k, v in config["run"].items() if k != "out"}}
    write_json(record_path(records, name, seed), {
        "variant": name, "seed": seed, "train_config": config, "data_key": data_key(data),
        "settings": settings.__dict__, "metrics": result["metrics"],
        "train_seconds": result["train_seconds"], "logged_train_seconds": result["logged_train_seconds"],
        "eval_seconds": result["eval_seconds"], "run_dir": result["run_dir"], "loss_terms": result["loss_terms"],
        "machine": {k: machine[k] for k in ("cpu", "logical_cpus", "cpu_capability", "gpu", "torch")},
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    })


def read_record(records: Path, name: str, seed: int, wanted, data: Path, settings: Settings) -> dict | None:
    """The recorded result of (name, seed) as a run result, when it was trained with ``wanted``'s
    settings on the same data and evaluated with the same settings; None otherwise."""
    path = record_path(records, name, seed)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        log.warning("%s: unreadable record (%s): the run is done again", path, err)
        return None
    if rec.get("data_key") != data_key(data) or rec.get("settings") != settings.__dict__:
        return None
    if not demo._same_run(rec["train_config"], wanted.to_dict()):
        return None
    return {"metrics": rec["metrics"], "train_seconds": None, "logged_train_seconds": rec["logged_train_seconds"],
            "eval_seconds": rec["eval_seconds"], "run_dir": rec["run_dir"], "record": str(path),
            "machine": rec["machine"], "loss_terms": rec.get("loss_terms")}


# -- the run -------------------------------------------------------------------------------
def run_ablations(quick: bool = False, out: str | Path | None = None, seeds: int | None = None,
                  jobs: int | None = None, reuse: Sequence[str | Path] | None = None,
                  variants: Sequence[str] | None = None, docs: str | Path | None = None,
                  command: str | None = None, records: str | Path | None = None, records_only: bool = False,
                  publish: bool = False) -> dict:
    """Trains what is missing, evaluates every run, writes ``report.md``, ``results.json`` and
    plots into ``out``. With ``publish``, the full run of every variant (not quick, no ``variants``)
    also writes the report to ``docs`` (default the checkout's docs/reproduction.md, figures in
    docs/reproduction/) and fills the README's ablation summary; without it nothing is written into
    the checkout. Each finished run is recorded in ``records`` (default ``<out>/records``; with
    ``publish`` the checkout's docs/reproduction/runs), and a matching record stands for the run
    (nothing trained or evaluated); the published records are read too. ``records_only``: nothing
    is trained or evaluated; the report covers the recorded runs and lists the missing ones (a
    partial report is never published)."""
    if publish and docs is None and not (CHECKOUT / "README.md").is_file():
        raise ValueError(f"--publish writes a checkout's docs/ and README.md; there is none at {CHECKOUT} "
                         "(run it from a clone installed with pip install -e .)")
    t_start = time.perf_counter()
    mode = demo.MODES["quick" if quick else "full"]
    if seeds:
        mode = replace(mode, seeds=tuple(range(seeds)))
    out = Path(out or ("runs/ablations-quick" if quick else "runs/ablations"))
    reuse = [Path(r) for r in (reuse if reuse is not None else ["runs/demo"])]
    names = list(variants or (QUICK if quick else DEFAULT_DATA + TWO_STYLE))
    unknown = [n for n in names if n not in DEFAULT_DATA + TWO_STYLE]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; choose from {list(DEFAULT_DATA + TWO_STYLE)}")
    if command is None:
        command = f"run_ablations(quick={quick!r}, out={str(out)!r})"
    settings = Settings(eval_limit=mode.eval_limit, probe_images=40 if quick else 1000,
                        similarity_images=40 if quick else 1000)
    for n in names:  # every config checked before any build or training
        demo.variant_config(mode, n, Path("."), out, 0, Path("."))
    cache_dir = demo.text_features_dir()
    jobs = jobs if jobs is not None else min(2, os.cpu_count() or 1)
    t0 = time.perf_counter()
    groups = {}
    default_names = [n for n in names if n in DEFAULT_DATA]
    styled = [n for n in names if n in TWO_STYLE]
    if default_names:
        data = cache_root() / f"emoji-{mode.preset}"
        emoji.build(data, emoji.preset(mode.preset))
        groups[data] = default_names
    if styled:
        data = cache_root() / ("emoji-twostyle-tiny" if quick else "emoji-twostyle")
        twostyle.build(data, twostyle.params(mode.preset))
        groups[data] = styled
    data_s = time.perf_counter() - t0
    models = {demo.variant_config(mode, n, Path("."), out, 0, Path(".")).model.name for n in names}
    evaluator = functools.partial(evaluate_run, out=out, settings=settings)
    published = [] if quick or records is not None else [RECORDS]  # read, written only with publish
    records = Path(records) if records is not None else (RECORDS if publish and not quick else out / "records")
    machine = describe_machine(jobs, demo.threads_per_run(jobs, 2), command)
    data_of = {n: d for d, g in groups.items() for n in g}
    seeds_of = {n: variant_seeds(mode, n, seeds) for n in names}
    work = [(n, s) for s in mode.seeds for n in names if s in seeds_of[n]]
    runs = {}
    for n, s in work:
        cfg = demo.variant_config(mode, n, data_of[n], out / n / f"seed{s}", s, cache_dir)
        rec = next((r for folder in (records, *published) if (r := read_record(folder, n, s, cfg, data_of[n], settings))),
                   None)
        if rec is not None:
            runs[(n, s)] = rec
    todo = [w for w in work if w not in runs]
    log.info("%d of %d runs recorded in %s; %d to train or evaluate", len(runs), len(work), records, len(todo))
    missing, todo = (todo, []) if records_only else ([], todo)
    t0 = time.perf_counter()
    if todo:
        for data in {data_of[n] for n, _ in todo}:
            for model_name in sorted(models):
                demo.warm_text_cache(model_name, data, cache_dir)

    def record(name: str, seed: int, result: dict) -> None:
        result["loss_terms"] = loss_terms(result["run_dir"])
        write_record(records, name, seed, result, data_of[name], settings, machine)

    # one pool for both datasets: runs pair up across them
    runs.update(demo.run_jobs(mode, names, data_of, out, cache_dir, jobs, reuse, evaluator, work=todo,
                              on_result=record))
    runs_s = time.perf_counter() - t0
    default_data = next((d for d, g in groups.items() if g is default_names), None)
    similarity = text_similarity(default_data, settings.similarity_images) if default_data else None
    variants_out = {}
    for n in names:
        done = [s for s in seeds_of[n] if (n, s) in runs]
        if not done:  # records_only, nothing recorded yet
            continue
        per_seed = [runs[(n, s)] for s in done]
        v = demo.load_variant(n)
        variants_out[n] = {
            "label": v.label, "beyond_paper": v.ours, "seeds": done,
            "stats": seed_stats([r["metrics"] for r in per_seed]),
            "per_seed": [{"seed": s, "run_dir": r["run_dir"], "metrics": r["metrics"],
                          "train_seconds_this_run": r["train_seconds"], "logged_train_seconds": r["logged_train_seconds"],
                          "eval_seconds": r["eval_seconds"], "record": r.get("record"),
                          "loss_terms": r.get("loss_terms") or loss_terms(r["run_dir"])}  # an older record
                         for s, r in zip(done, per_seed)],
            "streams": per_seed[0]["metrics"].get("dense_probe", {}).get("streams"),
            "branches": list(per_seed[0]["metrics"].get("per_branch") or []),
        }
    summary = {
        "variants": variants_out,
        "text_similarity": similarity,
        "config": {"mode": mode.name, "steps": mode.steps, "batch_size": mode.batch_size, "seeds": list(mode.seeds),
                   "data": {str(d): g for d, g in groups.items()}, "reuse": [str(r) for r in reuse],
                   "settings": settings.__dict__, "fusions": list(FUSIONS), "subsets": SUBSETS},
        "timing": {"data_seconds": data_s, "runs_seconds": runs_s, "total_seconds": time.perf_counter() - t_start},
        "machine": machine,
        "run_machines": sorted({(r.get("machine") or machine)["cpu"] for r in runs.values()}),
        "missing": [[n, s] for n, s in missing],
        "planned_runs": len(work),
    }
    summary["readings"] = readings(Results(variants_out), similarity)
    out.mkdir(parents=True, exist_ok=True)
    figures = plot_all(summary, out)
    summary["figures"] = figures
    write_json(out / "results.json", summary)
    (out / "report.md").write_text(report_markdown(summary, figure_dir=""))
    if publish and not quick and not variants and not missing:  # only the whole set stands as the reproduction
        publish_report(summary, out, figures, Path(docs) if docs else DOCS)
    elif publish:
        log.warning("not published: --publish takes the full set of runs (no --quick, no --variants, none missing)")
    log.info("ablation report: %s", out / "report.md")
    print(f"report: {out / 'report.md'}")
    return summary


def publish_report(summary: dict, out: Path, figures: list[str], docs: Path) -> None:
    """The report as docs/reproduction.md with its figures in docs/reproduction/, and the
    README's ablation summary between its markers."""
    fig_dir = docs.with_suffix("")
    fig_dir.mkdir(parents=True, exist_ok=True)
    for f in figures:
        shutil.copyfile(out / f, fig_dir / f)
    docs.write_text(report_markdown(summary, figure_dir=fig_dir.name + "/"))
    readme = docs.parent.parent / "README.md"
    if readme.is_file():
        text = readme.read_text()
        if README_START in text and README_END in text:
            head, rest = text.split(README_START, 1)
            _, tail = rest.split(README_END, 1)
            readme.write_text(head + README_START + "\n" + readme_summary(summary) + README_END + tail)


README_START = "<!-- ablations:start (written by holiclip demo --ablations) -->"
README_END = "<!-- ablations:end -->"


# -- readings --------------------------------------------------------------------------------
def readings(r: Results, similarity: dict | None) -> dict:
    out = {}
    mlp = "holistic_mlp_l3" if r.has("holistic_mlp_l3") else next(
        (v for v in ("holistic_mlp", "holistic_cls") if r.has(v)), None)
    fusion_metrics = RETRIEVAL + ["zeroshot_heldout_style_top1"]
    out["fusion"] = reading(
        f"averaging (`mean`) beats `max` and `norm-max` on retrieval and the held-out style ({mlp or 'Psi_MLP'})",
        _checks(r.check(f"{NAMES[m]} mean vs {f}", (mlp, f"fusion.mean.{m}"), (mlp, f"fusion.{f}.{m}"))
                for f in ("max", "norm-max") for m in fusion_metrics) if mlp else [])
    subsets = []
    for v in ("holistic_cls", "holistic_mlp_l3"):
        if r.has(v):
            subsets += _checks([r.check(f"{v} ZS main: main branch vs fused", (v, "per_branch.main.zeroshot_main_top1"),
                                        (v, "fused.zeroshot_main_top1"))]
                               + [r.check(f"{v} {NAMES[m]}: detail branch vs fused", (v, f"per_branch.detail.{m}"),
                                          (v, f"fused.{m}")) for m in ("long_i2t_r1", "long_t2i_r1")])
    out["subsets"] = reading("a task's own branch beats the fused embedding (main object for classification, "
                             "detail for long-text retrieval)", subsets)
    texts = []
    if similarity:
        sims = [similarity["by_h"][k] for k in sorted(similarity["by_h"])]
        texts.append(("text similarity falls with every added slot " + " > ".join(f"{s:.3f}" for s in sims),
                      HOLDS if all(a > b for a, b in zip(sims, sims[1:])) else AGAINST))
    texts += _checks(r.check(f"{NAMES[m]} H=5 vs H=2", ("holistic_cls", f"fused.{m}"), ("texts_h2", f"fused.{m}"))
                     for m in RETRIEVAL)
    out["texts"] = reading("more texts give lower intra-image text similarity and better retrieval (H = 5 over H = 2)",
                           texts)
    out["mlp"] = reading(
        "Psi_MLP (L = 3 forked blocks) >= Psi_CLS on retrieval",
        _checks(r.check(f"{NAMES[m]} Psi_MLP L=3 vs Psi_CLS", ("holistic_mlp_l3", f"fused.{m}"),
                        ("holistic_cls", f"fused.{m}")) for m in RETRIEVAL))
    out["regulariser"] = reading(
        "the diversity regulariser (margin 0.7) makes the branches less alike (lower mean pairwise cosine)",
        _checks([r.check("branch cosine without vs with", ("holistic_cls", "branch_cosine"),
                          ("holistic_cls_diversity", "branch_cosine"), digits=3)]))
    out["control"] = reading(
        "part-to-part (M2M) matching, not the extra class tokens, gives the gain: Psi_CLS beats the fused-O2M control",
        _checks(r.check(f"{NAMES[m]} Psi_CLS vs control", ("holistic_cls", f"fused.{m}"), ("fused_o2m_h5", f"fused.{m}"))
                for m in RETRIEVAL + ["zeroshot_main_top1"]))
    order = []
    for m in RETRIEVAL + ["zeroshot_main_top1"]:
        order += _checks([r.check(f"{NAMES[m]} O2M vs CLIP", ("o2m", f"fused.{m}"), ("clip", f"fused.{m}")),
                          r.check(f"{NAMES[m]} Psi_CLS vs O2M", ("holistic_cls", f"fused.{m}"), ("o2m", f"fused.{m}"))])
    out["ordering"] = reading("CLIP < O2M < Holistic Psi_CLS on retrieval and main-object zero-shot", order)
    out["styles"] = reading(
        "Holistic CLIP is more robust to a new artwork style (ImageNet-R 49.2 -> 65.0): with two training styles, "
        "Psi_CLS beats CLIP on the held-out OpenMoji style",
        _checks([r.check("ZS OpenMoji Psi_CLS vs CLIP (two styles)",
                         ("twostyle_holistic_cls", "fused.zeroshot_heldout_style_openmoji_top1"),
                         ("twostyle_clip", "fused.zeroshot_heldout_style_openmoji_top1"))]))
    out["dense"] = reading(
        "holistic features serve dense uses better: Psi_CLS's patch tokens probe better than CLIP's and O2M's",
        _checks([r.check("probe mIoU Psi_CLS vs CLIP", ("holistic_cls", "fused.dense_probe_miou"),
                         ("clip", "fused.dense_probe_miou")),
                 r.check("probe mIoU Psi_CLS vs O2M", ("holistic_cls", "fused.dense_probe_miou"),
                         ("o2m", "fused.dense_probe_miou"))]))
    return out


# -- report ----------------------------------------------------------------------------------
TITLES = {"fusion": "Table 7, fusion", "subsets": "Table 8, branch subsets", "texts": "Table 9, number of texts",
          "mlp": "Psi_MLP L = 3", "regulariser": "diversity regulariser", "control": "fused-O2M control",
          "ordering": "CLIP < O2M < Psi_CLS", "styles": "new artwork style", "dense": "dense linear probe"}
PAPER = {
    "fusion": "Table 7 (CC12M, Psi_MLP): averaging beats max and norm-max for retrieval and ImageNet-R.",
    "subsets": "Table 8: the main-object branch alone is best for ImageNet classification (49.4 vs 48.1 with "
               "all branches); the detail branch for long-text retrieval.",
    "texts": "Table 9: 2, 3, 4, 5 texts give mean intra-image text similarity 0.56, 0.52, 0.50, 0.48; retrieval "
             "rises with the number of texts up to 4-5.",
    "mlp": "Table 1 (CC3M, COCO 5k I2T R@1): Psi_CLS 30.0, Psi_MLP 31.2 (multi-VLM); Psi_MLP forks the last "
           "L = 3 blocks.",
    "regulariser": "The research code adds a diversity regulariser (margin 0.7) between branches; the paper "
                   "reports no ablation of it.",
    "control": "Not in the paper: separates 'more class tokens' (H = 5, fused O2M loss only) from "
               "'part-to-part matching' (M2M).",
    "ordering": "Tables 1-3: CLIP < O2M < M2M (e.g. COCO I2T R@1 13.6 / 27.1 / 30.0, ImageNet 39.0 / 46.5 / 48.6).",
    "styles": "Table 3: ImageNet-R 49.2 (CLIP) -> 65.0 (Holistic CLIP).",
    "dense": "Not measured as such in the paper: it shows the full visual token sequence serving ClipCap and "
             "LLaVA; a linear probe of patch tokens is the CPU-sized stand-in.",
}


def penalty_lines(info: dict | None) -> list[str]:
    """Whether the hinge acted at all: the diversity penalty's logged values, per seed."""
    seeds = [(s["seed"], (s.get("loss_terms") or {}).get("diversity_loss")) for s in (info or {}).get("per_seed", [])]
    seeds = [(k, t) for k, t in seeds if t]
    if not seeds:
        return []
    return ["The penalty during training (logged every `run.log_every` steps): " + "; ".join(
        f"seed {k}: above zero at {t['active_steps']} of {t['logged_steps']} logged steps, largest {t['max']:.4f}"
        for k, t in seeds) + ". At zero throughout, the hinge never acts and the run is Psi_CLS's.", ""]


def partial_lines(summary: dict) -> list[str]:
    missing = summary.get("missing") or []
    if not missing:
        return []
    done = summary.get("planned_runs", 0) - len(missing)
    names = {}
    for n, s in missing:
        names.setdefault(n, []).append(s)
    return [f"**Partial report: {done} of {summary.get('planned_runs')} runs recorded so far.** Not yet run: "
            + "; ".join(f"{n} seeds {ss}" for n, ss in names.items())
            + ". Readings with one seed are inconclusive by the rule below; the tables show only what was run.", ""]


def seed_text(summary: dict) -> str:
    """'seeds [0, 1, 2]', or which variants had fewer."""
    seeds = summary["config"]["seeds"]
    fewer = {v: info["seeds"] for v, info in summary["variants"].items() if info["seeds"] != seeds}
    if not fewer:
        return f"seeds {seeds}"
    groups = {}
    for v, ss in fewer.items():
        groups.setdefault(tuple(ss), []).append(v)
    return f"seeds {seeds} (" + "; ".join(f"{list(ss)} for {', '.join(vs)}" for ss, vs in groups.items()) + ")"


def _table(r: Results, rows: list[tuple[list[str], str, list[str]]], head: list[str]) -> str:
    """rows: (leading cells, variant, the variant's result keys, one cell each)."""
    lines = [head]
    for lead, variant, row_keys in rows:
        lines.append([*lead, *[r.cell(variant, k) for k in row_keys]])
    return markdown(lines)


def report_markdown(summary: dict, figure_dir: str = "") -> str:
    r = Results(summary["variants"])
    rd = summary["readings"]
    cfg, timing = summary["config"], summary["timing"]
    vs = summary["variants"]
    fig = {f.removesuffix(".png"): f"{figure_dir}{f}" for f in summary.get("figures", [])}
    lines = [
        "# Reproducing the paper's ablations on the emoji benchmark", "",
        f"Generated by `{summary['machine']['command']}` (mode `{cfg['mode']}`): {cfg['steps']} steps x batch "
        f"{cfg['batch_size']} for every run, {seed_text(summary)}, the demo's recipe (model `holi-small-minilm`, "
        "locked MiniLM text trunk). Every number is the mean ± std over seeds (percent unless noted); fused = the "
        "renormalised mean of the branch embeddings. A reading compares the paper's claim `a > b` with the "
        "numbers: **holds** when the gap exceeds twice the larger seed std, **does not hold** when it goes the "
        "other way by as much, **inconclusive** when it is within that (or when there is one seed); a table "
        "holds when every check holds and does not hold when any check goes against it.", "",
        *partial_lines(summary),
        "## Summary", "",
        markdown([["ablation", "claim (paper's or the control's)", "here"]]
                 + [[TITLES[k], rd[k]["claim"], f"**{rd[k]['verdict']}**"] for k in rd]), "",
    ]
    metrics_head = [NAMES[m] for m in METRICS]

    # headline
    head_variants = [v for v in ("clip", "o2m", "holistic_cls", "holistic_mlp", "holistic_hybrid", "holistic_mlp_l3")
                     if v in vs]
    lines += ["## The demo's variants with seeds (hybrid and Psi_MLP included)", "", PAPER["ordering"], "",
              _table(r, [([v + (" (ours)" if vs[v]["beyond_paper"] else ""), str(len(vs[v]["seeds"]))], v,
                          [f"fused.{m}" for m in METRICS]) for v in head_variants],
                     ["variant", "seeds", *metrics_head]), "", reading_line(rd["ordering"]), ""]

    # Table 7
    holistic = [v for v in vs if vs[v]["branches"]]
    rows = [([v, f], v, [f"fusion.{f}.{m}" for m in METRICS]) for v in holistic for f in cfg["fusions"]]
    lines += ["## Table 7: fusion of the branch embeddings", "", PAPER["fusion"],
              "`mean-logits` ranks texts for an image exactly as `mean` does (a per-image scale), so image-to-text "
              "and zero-shot columns agree; they differ in text-to-image ranking.", "",
              _table(r, rows, ["variant", "fusion", *metrics_head]), "", reading_line(rd["fusion"]), ""]
    if "fusion_modes" in fig:
        lines += [f"![fusion modes]({fig['fusion_modes']})", ""]

    # Table 8
    rows = []
    for v in holistic:
        rows.append(([v, "all (fused mean)"], v, [f"fused.{m}" for m in METRICS]))
        rows += [([v, b], v, [f"per_branch.{b}.{m}" for m in METRICS]) for b in vs[v]["branches"]]
        rows += [([v, s], v, [f"subsets.{s}.{m}" for m in METRICS]) for s in cfg["subsets"]
                 if r.get(v, f"subsets.{s}.short_i2t_r1") is not None]
        rows.append(([v, "routed (task -> its branch)"], v, [f"routed.{m}" for m in METRICS]))
    lines += ["## Table 8: branch subsets", "", PAPER["subsets"],
              "Psi_CLS branches share their patch tokens, so their probe mIoU is one value; Psi_MLP's forked "
              "blocks give each branch its own tokens.", "",
              _table(r, rows, ["variant", "branches", *metrics_head]), "", reading_line(rd["subsets"]), ""]
    if "branch_subsets" in fig:
        lines += [f"![branch subsets]({fig['branch_subsets']})", ""]

    # Table 9
    sim = summary.get("text_similarity") or {"by_h": {}}
    by_h = {int(k): v for k, v in sim["by_h"].items()}
    cols = RETRIEVAL + ["zeroshot_main_top1", "zeroshot_heldout_style_top1"]
    t9 = [["H = M", "variant", "slots", "text similarity", *[NAMES[m] for m in cols]]]
    for h, v in TEXTS_H.items():
        if v in vs:
            t9.append([str(h), v, ", ".join(TEXT_ORDER[:h]) if h < 5 else "all five",
                       f"{by_h[h]:.3f}" if h in by_h else "- (one text)", *[r.cell(v, f"fused.{m}") for m in cols]])
    lines += ["## Table 9: number of texts H = M", "", PAPER["texts"],
              f"Text similarity: mean over {sim.get('images', 0)} training images of the mean pairwise cosine "
              "between an image's texts (MiniLM sentence embeddings, as `holiclip caption stats` computes it), "
              "slots added in the order " + ", ".join(TEXT_ORDER) + ". H = 1 is the `clip` run, H = 5 `holistic_cls` "
              "(the same five slots).", "", markdown(t9), "", reading_line(rd["texts"]), ""]
    if "texts_h" in fig:
        lines += [f"![number of texts]({fig['texts_h']})", ""]

    # MLP, regulariser, control
    lines += ["## Psi_MLP: L = 3 forked blocks vs L = 1 vs Psi_CLS", "", PAPER["mlp"], "",
              _table(r, [([v], v, [f"fused.{m}" for m in METRICS]) for v in ("holistic_mlp_l3", "holistic_mlp",
                                                                           "holistic_cls") if v in vs],
                     ["variant", *metrics_head]), "", reading_line(rd["mlp"]), ""]
    keys = ["branch_cosine", *[f"fused.{m}" for m in METRICS]]
    lines += ["## The diversity regulariser", "", PAPER["regulariser"],
              "`branch cos`: the branches' mean pairwise cosine on the test images (not percent).", "",
              markdown([["variant", "branch cos", *metrics_head]]
                       + [[v, r.cell(v, "branch_cosine", 3), *[r.cell(v, k) for k in keys[1:]]]
                          for v in ("holistic_cls", "holistic_cls_diversity") if v in vs]), "",
              *penalty_lines(vs.get("holistic_cls_diversity")), reading_line(rd["regulariser"]), ""]
    lines += ["## Control: H = 5 class tokens trained with the fused O2M loss only", "", PAPER["control"], "",
              _table(r, [([v], v, [f"fused.{m}" for m in METRICS]) for v in ("o2m", "fused_o2m_h5", "holistic_cls")
                         if v in vs], ["variant", *metrics_head]), "", reading_line(rd["control"]), ""]

    # two styles
    st_cols = ["zeroshot_main_top1", "zeroshot_heldout_style_openmoji_top1", *RETRIEVAL]
    t = [["variant", "training styles", *[NAMES[m] for m in st_cols]]]
    for base in ("clip", "o2m", "holistic_cls"):
        for v, styles in ((base, "Noto"), (f"twostyle_{base}", "Noto + twemoji")):
            if v in vs:
                t.append([base, styles, *[r.cell(v, f"fused.{m}") for m in st_cols]])
    lines += ["## A new artwork style: training on two styles", "", PAPER["styles"],
              "The two-style data (`holiclip.benchmarks.emoji.twostyle`) draws the training scenes half in Noto, half "
              "in twemoji, with the same classes, backgrounds and captions; test scenes are Noto; OpenMoji is never "
              "trained on. `ZS OpenMoji`: main object on OpenMoji scenes. The Noto-only rows are the default data's "
              "runs (their test and OpenMoji scenes are the default build's).", "", markdown(t), "",
              reading_line(rd["styles"]), ""]
    if "two_styles" in fig:
        lines += [f"![two styles]({fig['two_styles']})", ""]

    # dense probe
    t = [["variant", "token streams", "probe mIoU (fused)", "per branch", "dense ZS mIoU"]]
    for v, info in vs.items():
        per = "; ".join(f"{b} {r.cell(v, f'per_branch.{b}.dense_probe_miou')}" for b in info["branches"]) \
            if info["streams"] == "per-branch" else "-"
        t.append([v, info["streams"] or "-", r.cell(v, "fused.dense_probe_miou"), per, r.cell(v, "fused.dense_miou")])
    lines += ["## Dense features: a linear probe on frozen patch tokens", "", PAPER["dense"],
              f"A per-patch linear classifier (object classes + background) on the last block's patch tokens, fitted "
              f"on {cfg['settings']['probe_images']} training scenes' masks, mIoU on the test scenes "
              "(`holiclip.evaluation.dense_probe`); fused = the streams' mean. `dense ZS mIoU`: the MaskCLIP-style "
              "zero-shot read-out of the demo, for comparison.", "", markdown(t), "", reading_line(rd["dense"]), ""]
    if "dense_probe" in fig:
        lines += [f"![dense probe]({fig['dense_probe']})", ""]

    # timing
    trained = [(v, s) for v, info in vs.items() for s in info["per_seed"] if s.get("logged_train_seconds")]
    n_runs = sum(len(info["per_seed"]) for info in vs.values())
    n_recorded = sum(1 for info in vs.values() for s in info["per_seed"] if s.get("record"))
    total = sum(s["logged_train_seconds"] for _, s in trained)
    evals = [s["eval_seconds"] for info in vs.values() for s in info["per_seed"] if s.get("eval_seconds")]
    lines += ["## Training time", "",
              "Measured from each run's metrics log (steps between log lines over the logged throughput), whether "
              "the run was trained by this command or reused; runs train two side by side (one core each), so the "
              "wall time is about half the sum. Evaluation (every task, fusion, branch subset and the dense probe) "
              "is timed per run as well.", "",
              markdown([["variant", "runs", "train min per run (mean)", "train min (sum)", "eval min (sum)"]]
                       + [[v, str(len(ss)), f"{np.mean(ss) / 60:.1f}", f"{sum(ss) / 60:.1f}",
                           f"{sum(s.get('eval_seconds') or 0 for s in vs[v]['per_seed']) / 60:.1f}"]
                          for v in vs for ss in [[s["logged_train_seconds"] for s in vs[v]["per_seed"]
                                                  if s.get("logged_train_seconds")]] if ss]), "",
              f"- all runs: {total / 3600:.2f} h of training summed over {len(trained)} runs "
              f"(~{total / 2 / 3600:.2f} h of wall time at two runs side by side), {sum(evals) / 3600:.2f} h of "
              f"evaluation over {len(evals)} runs; together ~{(total + sum(evals)) / 2 / 3600:.2f} h of wall time "
              "(the budget: 3.5 h)",
              f"- this command: data {timing['data_seconds']:.0f} s, runs and evaluations {timing['runs_seconds'] / 60:.1f} "
              f"min, total {timing['total_seconds'] / 60:.1f} min; {n_recorded} of {n_runs} runs were read from "
              "their records (`docs/reproduction/runs/`: each finished run's settings, metrics, times and machine), "
              "trained and evaluated by earlier invocations", "",
              "## Machine", "", *machine_lines(summary["machine"]),
              f"- the runs were trained on: {'; '.join(summary.get('run_machines') or [summary['machine']['cpu']])}", ""]
    return "\n".join(lines) + "\n"


def readme_summary(summary: dict) -> str:
    """The README's short list of which claims hold, from the readings."""
    rd = summary["readings"]
    cfg = summary["config"]
    lines = [f"On the emoji benchmark ({cfg['steps']} steps x batch {cfg['batch_size']}, {seed_text(summary)}; "
             "[docs/reproduction.md](docs/reproduction.md) has every table with its seed spread):", ""]
    lines += [f"- {rd[k]['claim'][0].upper() + rd[k]['claim'][1:]}: **{rd[k]['verdict']}**" for k in rd]
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------------------
def plot_all(summary: dict, out: Path) -> list[str]:
    from holiclip._extras import require

    matplotlib = require("matplotlib", "emoji", "the emoji benchmark's plots")
    matplotlib.use("Agg", force=False)
    written = []
    for name, fn in (("fusion_modes.png", _plot_fusion), ("branch_subsets.png", _plot_subsets),
                     ("texts_h.png", _plot_texts), ("two_styles.png", _plot_styles),
                     ("dense_probe.png", _plot_probe)):
        if fn(summary, out / name):
            written.append(name)
    return written


def _bars(ax, groups: list[str], series: dict[str, list], errs: dict[str, list]) -> None:
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series.items()):
        ax.bar(x + i * width, vals, width, label=label, yerr=errs.get(label), capsize=2)
    ax.set_xticks(x + width * (len(series) - 1) / 2, groups, fontsize=8)


def _ms(r: Results, v: str, key: str) -> tuple[float, float]:
    s = r.get(v, key)
    return (np.nan, 0.0) if s is None else (s[0], s[1] or 0.0)


def _plot_fusion(summary: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    r = Results(summary["variants"])
    holistic = [v for v, i in summary["variants"].items() if i["branches"]]
    if not holistic:
        return False
    metrics = RETRIEVAL + ["zeroshot_main_top1", "zeroshot_heldout_style_top1"]
    fig, axes = plt.subplots(len(holistic), 1, figsize=(10, 2.6 * len(holistic)), squeeze=False)
    for ax, v in zip(axes[:, 0], holistic):
        fusions = summary["config"]["fusions"]
        _bars(ax, [NAMES[m] for m in metrics], {f: [_ms(r, v, f"fusion.{f}.{m}")[0] for m in metrics] for f in fusions},
              {f: [_ms(r, v, f"fusion.{f}.{m}")[1] for m in metrics] for f in fusions})
        ax.set_title(v, fontsize=9)
        ax.set_ylabel("%")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_subsets(summary: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    r = Results(summary["variants"])
    holistic = [v for v, i in summary["variants"].items() if i["branches"]]
    if not holistic:
        return False
    metrics = RETRIEVAL + ["zeroshot_main_top1", "zeroshot_background_top1", "zeroshot_heldout_style_top1",
                           "dense_probe_miou"]
    fig, axes = plt.subplots(1, len(holistic), figsize=(5.2 * len(holistic), 4), squeeze=False)
    for ax, v in zip(axes[0], holistic):
        labels = ["fused", *summary["variants"][v]["branches"], *summary["config"]["subsets"]]
        keys = ["fused", *[f"per_branch.{b}" for b in summary["variants"][v]["branches"]],
                *[f"subsets.{s}" for s in summary["config"]["subsets"]]]
        grid = np.array([[_ms(r, v, f"{k}.{m}")[0] for m in metrics] for k in keys])
        ax.imshow(np.nan_to_num(grid), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(metrics)), [NAMES[m] for m in metrics], rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}", ha="center", va="center",
                        fontsize=6, color="w")
        ax.set_title(v, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_texts(summary: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    r = Results(summary["variants"])
    points = [(h, v) for h, v in TEXTS_H.items() if v in summary["variants"]]
    if not points:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    hs = [h for h, _ in points]
    for m in RETRIEVAL + ["zeroshot_main_top1"]:
        vals = [_ms(r, v, f"fused.{m}") for _, v in points]
        a1.errorbar(hs, [a for a, _ in vals], yerr=[b for _, b in vals], marker="o", capsize=2, label=NAMES[m])
    a1.set_xlabel("H = M (texts per image)")
    a1.set_ylabel("%")
    a1.set_xticks(hs)
    a1.legend(fontsize=7)
    sim = {int(k): v for k, v in ((summary.get("text_similarity") or {}).get("by_h") or {}).items()}
    a2.plot(sorted(sim), [sim[k] for k in sorted(sim)], marker="o", label="emoji benchmark")
    a2.plot([2, 3, 4, 5], [0.56, 0.52, 0.50, 0.48], marker="s", ls="--", label="paper (Table 9)")
    a2.set_xticks([2, 3, 4, 5])
    a2.set_xlabel("texts per image")
    a2.set_ylabel("mean intra-image text similarity")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_styles(summary: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    r = Results(summary["variants"])
    bases = [b for b in ("clip", "o2m", "holistic_cls") if b in summary["variants"] or f"twostyle_{b}" in summary["variants"]]
    if not any(f"twostyle_{b}" in summary["variants"] for b in bases):
        return False
    key = "fused.zeroshot_heldout_style_openmoji_top1"
    fig, ax = plt.subplots(figsize=(6, 3.6))
    series = {"Noto only": [_ms(r, b, key)[0] for b in bases],
              "Noto + twemoji": [_ms(r, f"twostyle_{b}", key)[0] for b in bases]}
    errs = {"Noto only": [_ms(r, b, key)[1] for b in bases],
            "Noto + twemoji": [_ms(r, f"twostyle_{b}", key)[1] for b in bases]}
    _bars(ax, bases, series, errs)
    ax.set_ylabel("ZS main object on OpenMoji, %")
    ax.set_title("Held-out artwork style (OpenMoji)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _plot_probe(summary: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    r = Results(summary["variants"])
    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.8))
    vals = [_ms(r, v, "fused.dense_probe_miou") for v in names]
    ax.bar(range(len(names)), [a for a, _ in vals], yerr=[b for _, b in vals], capsize=2, label="fused")
    for i, v in enumerate(names):
        info = summary["variants"][v]
        if info["streams"] == "per-branch":
            ys = [_ms(r, v, f"per_branch.{b}.dense_probe_miou")[0] for b in info["branches"]]
            ax.scatter([i] * len(ys), ys, color="k", s=10, zorder=3, label="per branch" if i == names.index(v) and
                       not ax.get_legend_handles_labels()[1].count("per branch") else None)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("linear-probe mIoU, %")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def missing_runs(out: str | Path = "runs/ablations", reuse: Sequence[str | Path] = ("runs/demo",),
                 seeds: int | None = None) -> list[tuple[str, int]]:
    """(variant, seed) pairs of the full run with no finished run to reuse yet."""
    mode = demo.MODES["full"] if seeds is None else replace(demo.MODES["full"], seeds=tuple(range(seeds)))
    cache_dir = demo.text_features_dir()
    missing = []
    for n in DEFAULT_DATA + TWO_STYLE:
        data = cache_root() / ("emoji-twostyle" if n in TWO_STYLE else "emoji-default")
        for s in variant_seeds(mode, n, seeds):
            run_dir = Path(out) / n / f"seed{s}"
            cfg = demo.variant_config(mode, n, data, run_dir, s, cache_dir)
            if demo.finished_run(cfg, [run_dir, *(Path(r) / n / f"seed{s}" for r in reuse)]) is None:
                missing.append((n, s))
    return missing


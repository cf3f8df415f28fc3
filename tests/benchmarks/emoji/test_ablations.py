"""`holiclip demo --ablations`: the reading rule, the report built from results (every table,
reading, plot and the published copy), and the quick mode end to end, reusing finished runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from holiclip.benchmarks.emoji import ablations as A
from holiclip.benchmarks.emoji import demo

H, AGAINST, INC = A.HOLDS, A.AGAINST, A.INCONCLUSIVE
BRANCHES = ["web", "detail", "nouns", "background", "main"]


def test_verdict_rule():
    assert A.verdict(10.0, 5.0, 1.0, 2.0) == H  # gap 5 > 2 x the larger spread (4)
    assert A.verdict(10.0, 6.0, 1.0, 2.0) == INC  # gap 4 = 2 x 2: within it
    assert A.verdict(10.0, 9.0, 0.1, 0.6) == INC
    assert A.verdict(5.0, 10.0, 1.0, 1.0) == AGAINST
    assert A.verdict(10.0, 5.0, None, None) == INC  # one seed: no spread to judge against
    assert A.verdict(10.0, 5.0, 0.0, 0.0) == H  # seeds that agree exactly
    assert A.overall([]) == INC
    assert A.overall([H, H]) == H
    assert A.overall([H, INC]) == INC
    assert A.overall([H, INC, AGAINST]) == AGAINST


def _metrics(level: float, seed: int, branches=(), streams: str = "shared", cosine: float = 0.5,
             fusion_gap: float = 0.0) -> dict:
    """One seed's evaluation in evaluate_emoji's shape: every metric ``level`` (+ a small seed wobble)."""
    wobble = 0.2 * (seed - 0.5)
    one = {m: level + wobble for m in A.METRICS}
    out = {"fused": dict(one)}
    if branches:
        out["per_branch"] = {b: dict(one) for b in branches}
        out["routed"] = dict(one)
        out["fusion"] = {f: {m: v - (fusion_gap if f in ("max", "norm-max") else 0.0) for m, v in one.items()}
                         for f in A.FUSIONS}
        out["subsets"] = {s: dict(one) for s in A.SUBSETS}
        out["branch_cosine"] = cosine + 0.001 * seed
    out["dense_probe"] = {"streams": streams, "train_images": 10}
    return out


def _summary(levels: dict[str, float]) -> dict:
    variants = {}
    for name, level in levels.items():
        holistic = name not in ("clip", "o2m", "twostyle_clip", "twostyle_o2m")
        mlp = "mlp" in name
        per_seed = [_metrics(level, s, BRANCHES if holistic else (), "per-branch" if mlp else "shared",
                             cosine=0.3 if name == "holistic_cls_diversity" else 0.6,
                             fusion_gap=5.0 if holistic else 0.0) for s in (0, 1)]
        variants[name] = {"label": name, "beyond_paper": name == "holistic_hybrid", "seeds": [0, 1],
                          "stats": A.seed_stats(per_seed),
                          "per_seed": [{"seed": s, "run_dir": f"r/{name}/seed{s}", "metrics": m,
                                        "train_seconds_this_run": None, "logged_train_seconds": 600.0,
                                        "eval_seconds": 1.0} for s, m in enumerate(per_seed)],
                          "streams": "per-branch" if mlp else "shared",
                          "branches": BRANCHES if holistic else []}
    similarity = {"images": 10, "order": A.TEXT_ORDER, "by_h": {2: 0.56, 3: 0.52, 4: 0.5, 5: 0.48}}
    summary = {"variants": variants, "text_similarity": similarity,
               "config": {"mode": "full", "steps": 600, "batch_size": 128, "seeds": [0, 1], "data": {}, "reuse": [],
                          "settings": A.Settings().__dict__, "fusions": list(A.FUSIONS), "subsets": A.SUBSETS},
               "timing": {"data_seconds": 1.0, "runs_seconds": 2.0, "total_seconds": 3.0},
               "machine": {"cpu": "cpu", "logical_cpus": 2, "cpu_capability": None, "gpu": None, "platform": "p",
                           "python": "3", "torch": "t", "jobs": 2, "threads_per_run": 1, "command": "holiclip demo --ablations"}}
    summary["readings"] = A.readings(A.Results(variants), similarity)
    return summary


LEVELS = {"clip": 10, "o2m": 20, "holistic_cls": 30, "holistic_mlp": 25, "holistic_hybrid": 31, "texts_h2": 40,
          "texts_h3": 35, "texts_h4": 32, "holistic_mlp_l3": 30.1, "holistic_cls_diversity": 30, "fused_o2m_h5": 22,
          "twostyle_clip": 12, "twostyle_o2m": 13, "twostyle_holistic_cls": 12.2}


def test_readings_are_computed_from_the_numbers():
    rd = _summary(LEVELS)["readings"]
    assert rd["ordering"]["verdict"] == H  # 10 < 20 < 30, spread 0.1
    assert rd["fusion"]["verdict"] == H  # mean 5 above max and norm-max
    assert rd["control"]["verdict"] == H  # 30 vs 22
    assert rd["regulariser"]["verdict"] == H  # cosine 0.6 without, 0.3 with
    assert rd["texts"]["verdict"] == AGAINST  # similarity falls, but H = 5 (30) below H = 2 (40)
    assert ("text similarity falls with every added slot 0.560 > 0.520 > 0.500 > 0.480", H) in rd["texts"]["checks"]
    assert rd["mlp"]["verdict"] == INC  # 30.1 vs 30: within the spread
    assert rd["styles"]["verdict"] == INC
    assert rd["subsets"]["verdict"] == INC  # every branch equal to the fused embedding here
    assert rd["dense"]["verdict"] == H
    missing = A.readings(A.Results({k: v for k, v in _summary(LEVELS)["variants"].items() if k != "o2m"}), None)
    assert all("O2M vs CLIP" not in what for what, _ in missing["ordering"]["checks"])


def test_report_plots_and_published_copy(tmp_path):
    summary = _summary(LEVELS)
    out = tmp_path / "runs"
    out.mkdir()
    figures = A.plot_all(summary, out)
    assert figures == ["fusion_modes.png", "branch_subsets.png", "texts_h.png", "two_styles.png", "dense_probe.png"]
    assert all((out / f).stat().st_size > 1000 for f in figures)
    summary["figures"] = figures
    report = A.report_markdown(summary)
    for title in ("Table 7", "Table 8", "Table 9", "Psi_MLP: L = 3", "diversity regulariser", "fused O2M loss only",
                  "two styles", "linear probe", "Training time"):
        assert title in report
    assert "| holistic_cls | mean | 30.0±0.1 |" in report  # mean ± std over the seeds
    assert "| 2 | texts_h2 | web, detail | 0.560 |" in report
    assert "**Reading: holds** (holds on 10 of 10)" in report
    assert "![fusion modes](fusion_modes.png)" in report
    assert "4.67 h of training summed over 28 runs" in report
    # the published copy: docs/reproduction.md, figures beside it, the README's marked block filled
    checkout = tmp_path / "checkout"
    (checkout / "docs").mkdir(parents=True)
    (checkout / "README.md").write_text(f"# x\n\n{A.README_START}\nOLD-BLOCK-TEXT\n{A.README_END}\n\n## after\n")
    A.publish_report(summary, out, figures, checkout / "docs" / "reproduction.md")
    published = (checkout / "docs" / "reproduction.md").read_text()
    assert "![fusion modes](reproduction/fusion_modes.png)" in published
    assert all((checkout / "docs" / "reproduction" / f).is_file() for f in figures)
    readme = (checkout / "README.md").read_text()
    assert "OLD-BLOCK-TEXT" not in readme and readme.endswith("## after\n")
    assert "CLIP < O2M < Holistic Psi_CLS on retrieval and main-object zero-shot: **holds**" in readme


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown ablation variants"):
        A.run_ablations(quick=True, variants=["nope"], reuse=[])


def test_ablations_quick_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "ablations"
    summary = A.run_ablations(quick=True, out=out, reuse=[])
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["variants"]) == list(A.QUICK)
    assert set(saved["readings"]) == set(A.TITLES)
    for name, v in saved["variants"].items():
        fused = {k.removeprefix("fused."): s["mean"] for k, s in v["stats"].items() if k.startswith("fused.")}
        assert set(A.METRICS) <= set(fused), name
        assert all(0.0 <= fused[m] <= 100.0 for m in A.METRICS)
        assert v["per_seed"][0]["train_seconds_this_run"] > 0  # trained here
        assert (v["streams"] == "per-branch") == ("mlp" in name)
    cls = saved["variants"]["holistic_cls"]["stats"]
    assert {f"fusion.{f}.short_i2t_r1" for f in A.FUSIONS} | {f"subsets.{s}.long_t2i_r1" for s in A.SUBSETS} <= set(cls)
    assert 0.0 < cls["branch_cosine"]["mean"] <= 1.0
    assert set(saved["text_similarity"]["by_h"]) == {"2", "3", "4", "5"}
    report = (out / "report.md").read_text()
    assert "Table 9" in report and "**Reading:" in report and "--quick" not in report  # the Python call, not the CLI
    assert all((out / f).is_file() for f in saved["figures"]) and len(saved["figures"]) == 5
    assert summary["timing"]["total_seconds"] > 0
    # a second command elsewhere reuses the finished run where it is, trains nothing
    again = A.run_ablations(quick=True, out=tmp_path / "other", reuse=[out], variants=["clip"])
    seed0 = again["variants"]["clip"]["per_seed"][0]
    assert seed0["train_seconds_this_run"] is None and seed0["run_dir"] == str(out / "clip" / "seed0")
    assert seed0["metrics"] == saved["variants"]["clip"]["per_seed"][0]["metrics"]
    assert not (tmp_path / "other" / "clip").exists()
    # every finished run was recorded; with no run folder to reuse, the record stands for the run
    records = out / "records"
    assert all(A.record_path(records, n, 0).is_file() for n in A.QUICK)
    # the record says whether the regulariser's hinge acted, and the report repeats it
    terms = json.loads(A.record_path(records, "holistic_cls_diversity", 0).read_text())["loss_terms"]
    assert terms["diversity_loss"]["logged_steps"] >= 1 and "contrastive_loss" in terms
    assert 0 <= terms["diversity_loss"]["active_steps"] <= terms["diversity_loss"]["logged_steps"]
    assert "The penalty during training (logged every" in report
    third = A.run_ablations(quick=True, out=tmp_path / "third", reuse=[], records=records, variants=["clip"])
    seed0 = third["variants"]["clip"]["per_seed"][0]
    assert seed0["record"] == str(A.record_path(records, "clip", 0)) and seed0["train_seconds_this_run"] is None
    assert seed0["metrics"] == saved["variants"]["clip"]["per_seed"][0]["metrics"]
    assert not (tmp_path / "third" / "clip").exists()
    assert "1 of 1 runs were read from their records" in (tmp_path / "third" / "report.md").read_text()
    # --records-only: a report of what is recorded, the rest listed as missing, nothing trained
    A.record_path(records, "texts_h2", 0).unlink()
    partial = A.run_ablations(quick=True, out=tmp_path / "partial", reuse=[], records=records, records_only=True,
                              variants=["clip", "texts_h2"])
    assert list(partial["variants"]) == ["clip"] and partial["missing"] == [["texts_h2", 0]]
    assert not (tmp_path / "partial" / "texts_h2").exists()
    assert "**Partial report: 1 of 2 runs recorded so far.** Not yet run: texts_h2 seeds [0]" in (
        tmp_path / "partial" / "report.md").read_text()
    # a record only stands for the same training, data and evaluation settings
    mode = demo.MODES["quick"]
    data = next(Path(d) for d, names in saved["config"]["data"].items() if "clip" in names)
    settings = A.Settings(probe_images=40, similarity_images=40)
    same = demo.variant_config(mode, "clip", data, tmp_path / "x", 0, Path(".cache/holiclip"))
    assert A.read_record(records, "clip", 0, same, data, settings) is not None
    other_seed = demo.variant_config(mode, "clip", data, tmp_path / "x", 1, Path(".cache/holiclip"))
    assert A.read_record(records, "clip", 0, other_seed, data, settings) is None
    assert A.read_record(records, "clip", 0, same, data, A.Settings(probe_images=41, similarity_images=40)) is None


def test_finished_runs_are_found_wherever_they_are(tmp_path):
    mode = demo.MODES["quick"]
    cfg = demo.variant_config(mode, "clip", tmp_path, tmp_path / "a" / "clip" / "seed0", 0, tmp_path)
    elsewhere = tmp_path / "b" / "clip" / "seed0"
    (elsewhere / "model").mkdir(parents=True)
    (elsewhere / "model" / "holiclip_config.json").write_text(json.dumps({"train_config": cfg.to_dict()}))
    assert demo.finished_run(cfg, [tmp_path / "a" / "clip" / "seed0", elsewhere]) == elsewhere
    other = demo.variant_config(mode, "clip", tmp_path, elsewhere, 1, tmp_path)  # another seed: not the same run
    assert demo.finished_run(other, [elsewhere]) is None


def test_logged_train_seconds():
    logged = [{"step": 10, "samples_per_s": 64.0}, {"step": 20, "samples_per_s": 128.0}]
    assert demo.logged_train_seconds(logged, 128) == pytest.approx(10 * 128 / 64 + 10 * 128 / 128)
    assert demo.logged_train_seconds([], 128) is None
    assert demo.logged_train_seconds([{"step": 10}], 128) is None


def test_cli_runs_the_ablations_with_its_options(monkeypatch):
    from typer.testing import CliRunner

    from holiclip.cli.app import app

    seen = {}
    monkeypatch.setattr(A, "run_ablations", lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
    res = CliRunner().invoke(app, ["demo", "--ablations", "--quick", "--reuse", "runs/demo,runs/x", "--seeds", "2"])
    assert res.exit_code == 0, res.output
    assert seen["args"][:5] == (True, None, 2, None, ["runs/demo", "runs/x"])
    assert seen["kwargs"]["command"] == "holiclip demo --quick --seeds 2 --ablations --reuse runs/demo,runs/x"
    assert seen["kwargs"]["publish"] is False  # nothing goes into the checkout unless asked
    res = CliRunner().invoke(app, ["demo", "--ablations", "--publish"])
    assert res.exit_code == 0 and seen["kwargs"]["publish"] is True, res.output
    bad = CliRunner().invoke(app, ["demo", "--ablations", "--full"])
    assert bad.exit_code != 0 and "--ablations has its own" in bad.output
    bad = CliRunner().invoke(app, ["demo", "--publish"])
    assert bad.exit_code != 0 and "go with --ablations" in bad.output



def test_budget_gives_two_seeds_to_the_named_ablations_and_the_report_says_so(tmp_path):
    missing = A.missing_runs(out=tmp_path / "none", reuse=[])
    per_variant = {n: sorted(s for v, s in missing if v == n) for n in A.DEFAULT_DATA + A.TWO_STYLE}
    assert all(per_variant[n] == [0, 1] for n in A.TWO_SEEDS)
    assert all(per_variant[n] == [0, 1, 2] for n in per_variant if n not in A.TWO_SEEDS)
    assert len(missing) == 34  # what the 3.5 h budget holds
    assert len(A.missing_runs(out=tmp_path / "none", reuse=[], seeds=3)) == 42  # asked for: 3 seeds for all
    summary = _summary(LEVELS)
    summary["config"]["seeds"] = [0, 1, 2]
    assert A.seed_text(summary).startswith("seeds [0, 1, 2] ([0, 1] for clip, o2m,")
    for v in summary["variants"].values():
        v["seeds"] = [0, 1, 2]
    assert A.seed_text(summary) == "seeds [0, 1, 2]"

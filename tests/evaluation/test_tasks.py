"""Evaluation tasks: corrupt images are skipped, counted and named without shifting the pairs,
``zeroshot --limit`` takes a seeded class-stratified subset, per-branch variants."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from holiclip.evaluation import run_task
from holiclip.evaluation.datasets import load_retrieval, stratified_subset
from holiclip.evaluation.tasks import branch_variants

from tests.helpers.datasets import dataset_with_corrupt_image


def test_eval_skipping_keeps_the_right_pairs(tmp_path, eval_model):
    """Leaving a bad image out must not shift which text belongs to which image."""
    data = dataset_with_corrupt_image(tmp_path)
    ds = load_retrieval(data, slots=["web", "main"])
    kept = ds.drop([2])
    assert kept.images == ds.images[:2] + ds.images[3:]
    assert kept.texts == [t for t, i in zip(ds.texts, ds.text_to_image) if i != 2]
    assert [kept.images[j] for j in kept.text_to_image] == [ds.images[i] for i in ds.text_to_image if i != 2]
    full = run_task("retrieval", eval_model, data, slots=["web"])
    rows = [r for i, r in enumerate(data.read_text().splitlines()) if i != 2]
    (tmp_path / "five.jsonl").write_text("\n".join(rows) + "\n")
    clean = run_task("retrieval", eval_model, tmp_path / "five.jsonl", slots=["web"])
    assert full["images"] == clean["images"] == 5
    assert full["metrics"] == clean["metrics"]


def test_eval_zeroshot_and_dense_skip_corrupt_images(tmp_path, eval_model, solid_image):
    for name in ("red", "blue"):
        (tmp_path / "f" / name).mkdir(parents=True)
        for i in range(2):
            solid_image(tmp_path / "f" / name / f"{i}.png", (200, 0, 0) if name == "red" else (0, 0, 200))
    (tmp_path / "f" / "blue" / "1.png").write_bytes(b"garbage")
    res = run_task("zeroshot", eval_model, tmp_path / "f", templates="simple")
    assert res["images"] == 3 and [s["image"] for s in res["skipped_images"]] == [str(tmp_path / "f" / "blue" / "1.png")]

    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "masks").mkdir()
    (seg / "classes.txt").write_text("thing\nother\n")
    for i in range(3):
        solid_image(seg / "images" / f"{i}.png", (200, 0, 0))
        Image.fromarray(np.zeros((40, 48), np.uint8)).save(seg / "masks" / f"{i}.png")
    (seg / "images" / "1.png").write_bytes(b"garbage")
    res = run_task("dense", eval_model, seg, templates="simple")
    assert res["images"] == 2 and [s["image"] for s in res["skipped_images"]] == [str(seg / "images" / "1.png")]


# -- zeroshot --limit ------------------------------------------------------------------------------
def test_zeroshot_limit_is_a_seeded_class_stratified_subset(tmp_path, eval_model, solid_image):
    labels = [c for c in range(10) for _ in range(7)]  # class-sorted, as an ImageFolder is read
    pick = stratified_subset(labels, 20, seed=0)
    assert len(pick) == 20 and pick == sorted(set(pick)) and pick == stratified_subset(labels, 20, seed=0)
    assert np.bincount([labels[i] for i in pick], minlength=10).tolist() == [2] * 10
    assert stratified_subset(labels, 20, seed=1) != pick
    assert len({labels[i] for i in stratified_subset(labels, 4, seed=0)}) == 4
    assert stratified_subset(labels, 500) == list(range(70))

    for c in range(5):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            solid_image(tmp_path / f"c{c}" / f"{i}.png", (40 * c, 10 * i, 0))
    res = run_task("zeroshot", eval_model, tmp_path, templates="simple", limit=5)
    assert res["images"] == 5
    assert sum(r is not None for r in res["metrics"]["per_class_recall"].values()) == 5  # every class present


def test_per_branch_variants():
    rows = branch_variants(("web", "detail", "main"), "max", per_branch=True)
    assert rows == [("web", "mean", ["web"]), ("detail", "mean", ["detail"]), ("main", "mean", ["main"]),
                    ("max(web+detail+main)", "max", None)]
    rows = branch_variants(("web", "detail", "main"), "mean", branches=["main", "web"], per_branch=True)
    assert [r[0] for r in rows] == ["main", "web", "mean(main+web)"] and rows[-1][2] == ["main", "web"]
    assert branch_variants(("web",), "mean") == [("mean(web)", "mean", None)]
    with pytest.raises(KeyError):
        branch_variants(("web",), branches=["nope"])

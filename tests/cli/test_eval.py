"""`holiclip eval ...` through the main app: per-branch rows, truncation, the task options, bad input
and unreadable images."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from holiclip.cli.app import app

from tests.helpers.datasets import dataset_with_corrupt_image, make_dataset


runner = CliRunner()


def _manifest(tmp_path, solid_image, n=4):
    rows = []
    for i in range(n):
        solid_image(tmp_path / f"{i}.png", (60 * i, 255 - 60 * i, 90))
        rows.append({"image": f"{i}.png", "captions": {
            "web": f"photo {i}", "detail": f"A long description number {i}. " * 8, "main": f"object {i}",
        }})
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return tmp_path / "test.jsonl"


def test_eval_retrieval_per_branch(tmp_path, tiny_checkpoint, solid_image):
    data = _manifest(tmp_path, solid_image)
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "-c", str(tiny_checkpoint), "--slots", "web,main",
                              "--per-branch", "--fusion", "max", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [r["branches"] for r in doc["rows"]] == ["web", "detail", "main", "max(web+detail+main)"]
    assert doc["texts"] == 8 and doc["images"] == 4 and doc["task"] == "zeroshot_retrieval"
    assert all(0.0 <= v <= 1.0 for k, v in doc["metrics"].items())
    assert doc["metrics"]["t2i_R@5"] == 1.0  # 4 images: every own image is in the top 5
    assert "max(web+detail+" in res.output and "i2t_R@1" in res.output


def test_eval_long_retrieval_reports_truncation(tmp_path, tiny_checkpoint, solid_image):
    data = _manifest(tmp_path, solid_image)
    out = tmp_path / "long.json"
    res = runner.invoke(app, ["eval", "long-retrieval", "--data", str(data), "-c", str(tiny_checkpoint),
                              "--branches", "detail", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["texts"] == 4 and doc["text_stats"]["truncated"] == 4 and "truncated" in res.output
    assert doc["branches"] == ["detail"] and doc["rows"][-1]["branches"] == "mean(detail)"
    split = runner.invoke(app, ["eval", "long-retrieval", "--data", str(data), "-c", str(tiny_checkpoint),
                                "--long-text", "split", "--out", str(out), "--no-progress"])
    assert split.exit_code == 0, split.output
    assert json.loads(out.read_text())["text_stats"]["split_into_sentences"] == 4


def test_eval_zeroshot_dense_diversity_and_model_option(tmp_path, solid_image):
    for name in ("red", "blue"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        solid_image(tmp_path / "folder" / name / "0.png", (200, 0, 0) if name == "red" else (0, 0, 200))
    res = runner.invoke(app, ["eval", "zeroshot", "--data", str(tmp_path / "folder"), "--model", "holi-tiny",
                              "--templates", "simple", "--out", str(tmp_path / "z.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "z.json").read_text())
    assert doc["pretrained"] == "random-init" and set(doc["metrics"]) >= {"acc1", "acc5", "mean_per_class_recall"}

    (tmp_path / "seg" / "images").mkdir(parents=True)
    (tmp_path / "seg" / "masks").mkdir()
    solid_image(tmp_path / "seg" / "images" / "a.png", (9, 9, 9))
    Image.fromarray(np.ones((40, 48), np.uint8), mode="L").save(tmp_path / "seg" / "masks" / "a.png")
    (tmp_path / "seg" / "classes.json").write_text(json.dumps(["sky", "tree"]))
    res = runner.invoke(app, ["eval", "dense", "--data", str(tmp_path / "seg"), "--model", "holi-tiny", "--templates",
                              "simple", "--out", str(tmp_path / "d.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "mIoU" in json.loads((tmp_path / "d.json").read_text())["metrics"]

    data = _manifest(tmp_path, solid_image)
    res = runner.invoke(app, ["eval", "diversity", "--data", str(data), "--model", "holi-tiny", "--out", str(tmp_path / "v.json"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert set(json.loads((tmp_path / "v.json").read_text())["pairs"]) == {"web|detail", "web|main", "detail|main"}


def test_bad_input_is_a_clean_error(tmp_path, tiny_checkpoint):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "captions": {"web": "x"}}\n')
    res = runner.invoke(app, ["eval", "retrieval", "--data", str(tmp_path / "bad.jsonl"), "-c", str(tiny_checkpoint), "--slots", "detail"])
    assert res.exit_code == 2 and "bad.jsonl:1" in res.output
    res = runner.invoke(app, ["eval", "retrieval", "--data", str(tmp_path / "bad.jsonl")])
    assert res.exit_code == 2 and "--checkpoint" in res.output


def test_eval_retrieval_skips_and_names_a_corrupt_image(tmp_path, tiny_checkpoint):
    data = dataset_with_corrupt_image(tmp_path)
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "-c", str(tiny_checkpoint), "--slots", "web,main",
                              "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "1 unreadable image skipped" in res.output and "2.png" in res.output
    doc = json.loads(out.read_text())
    assert doc["images"] == 5 and doc["texts"] == 10  # the image and its two texts left out
    assert [s["image"] for s in doc["skipped_images"]] == [str(tmp_path / "img" / "2.png")]


def test_eval_with_only_unreadable_images_is_a_clear_error(tmp_path, tiny_checkpoint):
    data = make_dataset(tmp_path, n=2)
    for i in range(2):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"garbage")
    res = runner.invoke(app, ["eval", "retrieval", "--data", str(data), "-c", str(tiny_checkpoint), "--no-progress",
                              "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "no readable images" in res.output and "0.png" in res.output
    assert "Traceback" not in res.output


def test_every_registered_task_has_its_command():
    """`@register_task("name")` and `holiclip eval NAME` go together (docs/architecture.md)."""
    from holiclip.evaluation.tasks import TASKS

    assert {"retrieval", "long-retrieval", "zeroshot", "dense", "diversity"} <= set(TASKS)
    for name in TASKS:
        res = runner.invoke(app, ["eval", name, "--help"])
        assert res.exit_code == 0 and "--checkpoint" in res.output, (name, res.output)
    assert runner.invoke(app, ["eval", "no-such-task", "--help"]).exit_code == 2

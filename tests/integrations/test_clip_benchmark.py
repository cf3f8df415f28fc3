"""`holiclip eval clip-benchmark`: CLIP_benchmark's own command line on a holiclip model, on
CLIP_benchmark-format webdatasets written by its exporter (``clip_benchmark.webdataset_builder``,
what ``clip_benchmark_export_wds`` runs) from the tiny emoji build. Its numbers equal holiclip's
evaluation of the same images and texts; with tied scores the two tie rules differ and
``--ties clip-benchmark`` reproduces CLIP_benchmark's."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset, path_to_bytes
from typer.testing import CliRunner

from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.cli.app import app
from holiclip.integrations import clip_benchmark as HCB

TINY = B.preset("tiny")
KS = (1, 5, 10)
runner = CliRunner()


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> Path:
    """The tiny emoji build (installed sources, no download)."""
    root = tmp_path_factory.mktemp("emoji") / "tiny"
    B.build(root, TINY, sources=S.require_sources(styles=TINY.heldout_styles))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test box is shared; tiny models gain nothing from threads
    yield
    torch.set_num_threads(threads)


def _retrieval_sets(emoji: Path, out: Path, captions) -> tuple[Path, Path]:
    """The same images and texts twice: a CLIP_benchmark wds retrieval set and a holiclip JSONL.
    ``captions(row) -> list of texts``."""
    rows = B.read_rows(emoji, "train")
    items = [(str(emoji / r["image"]), captions(r)) for r in rows]
    convert_retrieval_dataset(items, "test", str(out / "wds"), transform=path_to_bytes, verbose=False)
    manifest = out / "pairs.jsonl"
    manifest.write_text("".join(
        json.dumps({"image": img, "captions": {f"c{j}": t for j, t in enumerate(texts)}}) + "\n" for img, texts in items
    ))
    return out / "wds", manifest


def _clip_benchmark(checkpoint, dataset_root: Path, out: Path, task: str, *options: str, extra=()) -> dict:
    res = runner.invoke(app, [
        "eval", "clip-benchmark", "-c", str(checkpoint), *options, "--",
        "--dataset", "wds/emoji", "--dataset_root", str(dataset_root), "--task", task, "--no_amp",
        "--num_workers", "0", "--batch_size", "16", "--output", str(out), *extra,
    ])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def _holiclip(task: str, checkpoint, data: Path, out: Path, *options: str) -> dict:
    res = runner.invoke(app, ["eval", task, "--data", str(data), "-c", str(checkpoint), "--out", str(out),
                              "--no-progress", *options])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def _same_recall(cb: dict, ours: dict) -> None:
    for k in KS:  # CLIP_benchmark's image retrieval = text query (t2i); text retrieval = image query (i2t)
        assert cb["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(ours["metrics"][f"t2i_R@{k}"], abs=1e-6)
        assert cb["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(ours["metrics"][f"i2t_R@{k}"], abs=1e-6)


@pytest.mark.parametrize("fusion,branches", [("mean", None), ("norm-max", "main,detail")])
def test_retrieval_equals_holiclip_retrieval(tmp_path, emoji, tiny_checkpoint, fusion, branches):
    def captions(r):
        return [r["captions"]["detail"], r["captions"]["main"]]

    wds, manifest = _retrieval_sets(emoji, tmp_path, captions)
    texts = [t for r in B.read_rows(emoji, "train") for t in captions(r)]
    assert len(set(texts)) == len(texts)  # distinct captions (and images): no tied scores
    assert (wds / "test" / "nshards.txt").read_text().strip() == "1"
    assert (wds / "dataset_type.txt").read_text().strip() == "retrieval"

    pick = ["--fusion", fusion] + (["--branches", branches] if branches else [])
    cb = _clip_benchmark(tiny_checkpoint, wds, tmp_path / "cb.json", "zeroshot_retrieval", *pick,
                         extra=["--recall_k", *map(str, KS)])
    assert cb["task"] == "zeroshot_retrieval" and cb["ties"] == "clip-benchmark" and cb["fusion"] == fusion
    assert cb["model"] == HCB.model_name_for(fusion, branches.split(",") if branches else None)
    for ties in ("pessimistic", "clip-benchmark"):  # no ties: both rules give CLIP_benchmark's numbers
        ours = _holiclip("retrieval", tiny_checkpoint, manifest, tmp_path / f"{ties}.json", *pick, "--ties", ties)
        assert ours["ties"] == ties and ours["texts"] == 80 and ours["images"] == 40
        _same_recall(cb, ours)
    direct = _holiclip("retrieval", tiny_checkpoint, wds, tmp_path / "direct.json", *pick)  # the wds folder itself
    assert direct["texts"] == 80 and direct["images"] == 40
    _same_recall(cb, direct)
    assert 0 < cb["metrics"]["text_retrieval_recall@10"] < 1  # a real ranking, not a saturated one


def test_tied_captions_the_rules_differ_and_clip_benchmark_rule_reproduces_it(tmp_path, emoji, tiny_checkpoint):
    """Every image has the same one caption (alt-texts collapsed): for an image query its own
    text ties with every other one."""
    wds, manifest = _retrieval_sets(emoji, tmp_path, lambda r: ["an emoji"])
    extra = ["--recall_k", *map(str, KS)]
    cb_rule = _clip_benchmark(tiny_checkpoint, wds, tmp_path / "cb.json", "zeroshot_retrieval", extra=extra)
    cb_pess = _clip_benchmark(tiny_checkpoint, wds, tmp_path / "cb-p.json", "zeroshot_retrieval", "--ties", "pessimistic",
                              extra=extra)
    ours_pess = _holiclip("retrieval", tiny_checkpoint, manifest, tmp_path / "p.json")
    ours_cb = _holiclip("retrieval", tiny_checkpoint, manifest, tmp_path / "c.json", "--ties", "clip-benchmark")
    assert cb_rule["ties"] == ours_cb["ties"] == "clip-benchmark" and cb_pess["ties"] == ours_pess["ties"] == "pessimistic"
    _same_recall(cb_rule, ours_cb)
    _same_recall(cb_pess, ours_pess)
    # pessimistic: 39 tied wrong texts rank above each image's own; topk's order puts some first
    assert ours_pess["metrics"]["i2t_R@10"] == 0.0
    assert cb_rule["metrics"]["text_retrieval_recall@1"] > 0.0 and cb_rule["metrics"]["text_retrieval_recall@10"] > 0.0
    assert ours_cb["metrics"]["t2i_R@1"] == ours_pess["metrics"]["t2i_R@1"]  # distinct images: no tie that way


def test_zeroshot_equals_holiclip_zeroshot(tmp_path, emoji, tiny_checkpoint):
    """Main-object classification of the same images: a CLIP_benchmark wds classification set
    (classnames.txt, zeroshot_classification_templates.txt) and an ImageFolder, same templates."""
    rows = [r for s in ("train", "test") for r in B.read_rows(emoji, s)]
    names = {o["id"]: o["name"] for o in B.load_classes(emoji)["objects"]}
    classes = sorted({names[r["main"]] for r in rows})  # ImageFolder's order: sorted folder names
    folder = tmp_path / "folder"
    items = []
    for i, r in enumerate(rows):
        (folder / names[r["main"]]).mkdir(parents=True, exist_ok=True)
        shutil.copy(emoji / r["image"], folder / names[r["main"]] / f"{i:03d}.png")
        items.append((str(emoji / r["image"]), classes.index(names[r["main"]])))
    wds = tmp_path / "wds"
    convert_dataset(items, "test", str(wds), transform=path_to_bytes, verbose=False)
    (wds / "classnames.txt").write_text("\n".join(classes) + "\n")
    templates = ["a picture of {}.", "an emoji of a {}, in a scene.", "{}"]
    (wds / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")

    cb = _clip_benchmark(tiny_checkpoint, wds, tmp_path / "cb.json", "zeroshot_classification", "--branches", "main")
    ours = _holiclip("zeroshot", tiny_checkpoint, folder, tmp_path / "zs.json", "--templates", str(tmp_path / "templates.txt"),
                     "--branches", "main")
    assert cb["task"] == ours["task"] == "zeroshot_classification" and cb["branches"] == ["main"]
    assert ours["images"] == len(rows) and ours["classes"] == len(classes)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert cb["metrics"][key] == pytest.approx(ours["metrics"][key], abs=1e-6), key
    # holiclip on the wds folder itself: its classnames.txt and templates file, no option
    direct = _holiclip("zeroshot", tiny_checkpoint, wds, tmp_path / "direct.json", "--branches", "main")
    assert direct["images"] == len(rows) and direct["metrics"] == ours["metrics"]


def test_loader_plugs_into_clip_benchmark(tiny_checkpoint):
    """The plug-in signature, through CLIP_benchmark's own load_clip once registered."""
    from clip_benchmark.models import MODEL_TYPES, load_clip

    HCB.register()
    assert "holiclip" in MODEL_TYPES
    model, transform, tokenizer = load_clip("holiclip", "max@main", str(tiny_checkpoint), None, "cpu")
    images = torch.stack([transform(Image.new("RGB", (50, 40), c)) for c in ("red", "teal")])  # its transform
    with torch.no_grad():
        fused = model.encode_image(images)
        branches = model.holistic.encode_image(images, normalize=True)
        text = model.encode_text(tokenizer(["a red apple", "a cat"]))
    assert fused.shape == (2, text.shape[1])
    assert torch.equal(fused, branches[:, 2])  # max over the one selected branch: the main branch


def test_missing_package_names_the_extra(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # import clip_benchmark raises ImportError
    monkeypatch.setitem(sys.modules, "clip_benchmark.cli", None)
    res = runner.invoke(app, ["eval", "clip-benchmark", "-c", str(tiny_checkpoint), "--", "--dataset", "wds/x"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: holiclip eval clip-benchmark needs clip_benchmark: pip install 'holiclip[bench]'"]


@pytest.mark.parametrize("options,message", [
    (["--", "--model", "ViT-B-32"], "--model: set from --checkpoint"),
    (["--fusion", "median", "--", "--dataset", "wds/x"], "unknown fusion 'median'"),
    (["--ties", "optimistic", "--", "--dataset", "wds/x"], "--ties must be clip-benchmark or pessimistic"),
    (["--branches", "nope", "--", "--dataset", "wds/x", "--quiet"], "unknown branch 'nope'"),
])
def test_bad_options_are_named(tiny_checkpoint, options, message):
    res = runner.invoke(app, ["eval", "clip-benchmark", "-c", str(tiny_checkpoint), *options])
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output


def test_linear_probe_without_cuda_says_so(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = runner.invoke(app, ["eval", "clip-benchmark", "-c", str(tiny_checkpoint), "--", "--dataset", "wds/x",
                              "--task", "linear_probe"])
    assert res.exit_code == 2 and "linear probe runs on CUDA only" in res.output, res.output


def test_clip_benchmark_assertion_names_its_place(tmp_path, emoji, tiny_checkpoint):
    """A retrieval set asked for classification: CLIP_benchmark's bare assert, named, no traceback."""
    wds, _ = _retrieval_sets(emoji, tmp_path, lambda r: [r["captions"]["main"]])
    res = runner.invoke(app, ["eval", "clip-benchmark", "-c", str(tiny_checkpoint), "--", "--dataset", "wds/emoji",
                              "--dataset_root", str(wds), "--task", "zeroshot_classification", "--num_workers", "0",
                              "--output", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "error: CLIP_benchmark stopped at datasets/builder.py:" in res.output, res.output
    assert "Classes not specified for wds/emoji" in res.output and "Traceback" not in res.output


def test_missing_checkpoint_is_named(tmp_path):
    res = runner.invoke(app, ["eval", "clip-benchmark", "-c", str(tmp_path / "nope"), "--", "--dataset", "wds/x"])
    assert res.exit_code == 2 and f"checkpoint not found: {tmp_path / 'nope'}" in res.output, res.output

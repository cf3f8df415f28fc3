"""CLIP_benchmark's webdataset layout (``--dataset wds/NAME --dataset_root DIR``) as an evaluation
input: zero-shot and retrieval on such a folder give the numbers of the same images as an
ImageFolder / our JSONL, ``holiclip eval`` and ``eval.sets`` take it with no option, and a
malformed folder is an error naming what is wrong."""
from __future__ import annotations

import json

import pytest
import webdataset as wds
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.data.records import DataError
from holiclip.evaluation import run_task
from holiclip.evaluation.datasets import (
    ClassificationData, RetrievalData, detect_format, load_retrieval, read_clip_benchmark_wds,
)
from holiclip.training.config import load_config
from holiclip.training.distributed import DistInfo
from holiclip.training.evaluate import evaluate
from tests.helpers.datasets import captions, draw

CLASSES = ["red", "green", "blue"]
NAMES = ["a red thing", "a green thing", "a blue thing"]
TEMPLATES = ["a photo of {c}.", "a drawing of {c}."]  # CLIP_benchmark's {c}


def _write_split(folder, samples, per_shard=4):
    """``folder/{0..N-1}.tar`` + ``nshards.txt``, as clip_benchmark_export_wds writes them."""
    folder.mkdir(parents=True)
    shards = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
    for n, part in enumerate(shards):
        with wds.TarWriter(str(folder / f"{n}.tar")) as sink:
            for sample in part:
                sink.write(sample)
    (folder / "nshards.txt").write_text(f"{len(shards)}\n")


def _images(tmp_path, count, ext="png"):
    """``count`` distinct images (index i is a colour of CLASSES)."""
    (tmp_path / "png").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = tmp_path / "png" / f"{i}.{ext}"
        draw(i % 3 + 8 * (i // 3)).save(path)
        paths.append(path)
    return paths


def _classification_pair(tmp_path, count=9):
    """The same images as a CLIP_benchmark wds folder and as an ImageFolder."""
    paths = _images(tmp_path, count)
    root = tmp_path / "wds_colours"
    _write_split(root / "test", [{"__key__": f"s{i:07d}", "png": p.read_bytes(), "cls": i % 3}
                                 for i, p in enumerate(paths)])
    (root / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    folder = tmp_path / "folder"
    for i, p in enumerate(paths):
        (folder / CLASSES[i % 3]).mkdir(parents=True, exist_ok=True)
        (folder / CLASSES[i % 3] / p.name).write_bytes(p.read_bytes())
    names = tmp_path / "names.json"  # folder -> name: the ImageFolder's sorted order differs from the index order
    names.write_text(json.dumps(dict(zip(CLASSES, NAMES))))
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(t.replace("{c}", "{}") for t in TEMPLATES) + "\n")
    return root, folder, names, templates


def _retrieval_pair(tmp_path, count=6):
    """Two captions per image as a CLIP_benchmark retrieval folder and as our JSONL (two slots)."""
    paths = _images(tmp_path, count, "webp")  # CLIP_benchmark's default image member
    texts = [[captions(i)["web"], captions(i)["detail"]] for i in range(count)]
    root = tmp_path / "wds_captions"
    _write_split(root / "test", [{"__key__": f"s{i:07d}", "webp": p.read_bytes(),
                                  "txt": "\n".join(t)} for i, (p, t) in enumerate(zip(paths, texts))])
    (root / "dataset_type.txt").write_text("retrieval\n")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps({"image": str(p), "captions": {"web": t[0], "detail": t[1]}}) + "\n"
                                for p, t in zip(paths, texts)))
    return root, manifest


def _numbers(result):
    return result["metrics"], result["rows"], result["images"]


def test_a_wds_folder_reads_as_clip_benchmark_writes_it(tmp_path):
    root, _, _, _ = _classification_pair(tmp_path, count=10)  # 3 shards, the last one short
    data = read_clip_benchmark_wds(root)
    assert isinstance(data, ClassificationData)
    assert data.classnames == NAMES and data.templates == [t.replace("{c}", "{}") for t in TEMPLATES]
    assert data.labels == [i % 3 for i in range(10)]
    assert data.images[3] == (tmp_path / "png" / "3.png").read_bytes()  # shards in nshards order: 0, 1, 2
    assert detect_format(root) == "clip-benchmark"

    rroot, _ = _retrieval_pair(tmp_path / "r")
    rdata = load_retrieval(rroot)  # auto-detected
    assert isinstance(rdata, RetrievalData) and len(rdata.images) == 6
    assert rdata.texts[:2] == [captions(0)["web"], captions(0)["detail"]] and rdata.text_to_image[:4] == [0, 0, 1, 1]


def test_zeroshot_on_a_wds_folder_equals_the_same_images_as_an_image_folder(tmp_path, eval_model):
    root, folder, names, templates = _classification_pair(tmp_path)
    wds_result = run_task("zeroshot", eval_model, root, per_branch=True)  # its own names and templates
    folder_result = run_task("zeroshot", eval_model, folder, classnames=str(names), templates=str(templates),
                             per_branch=True)
    assert wds_result["images"] == 9 and wds_result["classes"] == 3
    assert _numbers(wds_result) == _numbers(folder_result)
    # and as eval.sets during training, with no option but the data
    cfg = load_config(None, ["model.name=holi-tiny", "eval.every=1", "eval.per_branch=true",
                             f"eval.sets=[{{task: zeroshot, data: {root}, name: zs}}]"])
    metrics = evaluate(eval_model.model, eval_model.tokenizer, cfg, DistInfo(), "cpu")
    assert metrics == {f"eval/zs/{row['branches']}/{col}": row[col]
                       for row in folder_result["rows"] for col in folder_result["columns"][1:]}


def test_retrieval_on_a_wds_folder_equals_our_jsonl(tmp_path, eval_model):
    root, manifest = _retrieval_pair(tmp_path)
    wds_result = run_task("retrieval", eval_model, root, per_branch=True)
    jsonl_result = run_task("retrieval", eval_model, manifest, slots=["web", "detail"], per_branch=True)
    assert wds_result["texts"] == jsonl_result["texts"] == 12
    assert _numbers(wds_result) == _numbers(jsonl_result)


def test_the_cli_takes_a_wds_folder_with_no_option(tmp_path, tiny_checkpoint):
    root, _, _, _ = _classification_pair(tmp_path)
    out = tmp_path / "zs.json"
    res = CliRunner().invoke(app, ["eval", "zeroshot", "--data", str(root), "-c", str(tiny_checkpoint), "--no-progress",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["classes"] == 3
    bad = CliRunner().invoke(app, ["eval", "zeroshot", "--data", str(root), "-c", str(tiny_checkpoint), "--split", "train"])
    assert bad.exit_code == 2 and "train" in bad.output and "Traceback" not in bad.output


def test_a_malformed_wds_folder_is_a_named_error(tmp_path):
    root, _, _, _ = _classification_pair(tmp_path)
    (root / "classnames.txt").unlink()
    with pytest.raises(DataError, match=r"wds_colours: no classnames\.txt"):
        read_clip_benchmark_wds(root)

    other = tmp_path / "no_cls"
    _write_split(other / "test", [{"__key__": "s0000000", "png": (tmp_path / "png" / "0.png").read_bytes(), "cls": 0},
                                  {"__key__": "s0000001", "png": (tmp_path / "png" / "1.png").read_bytes()}])
    (other / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"0\.tar:s0000001: no cls member"):
        read_clip_benchmark_wds(other)

    (other / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(DataError, match=r"nshards\.txt: says 3 shards but .*1\.tar is missing"):
        read_clip_benchmark_wds(other)

    rroot, _ = _retrieval_pair(tmp_path / "r")
    with pytest.raises(DataError, match="a retrieval set"):
        run_task("zeroshot", None, rroot)

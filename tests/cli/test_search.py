"""`holiclip embed` and `holiclip search`: the INDEX folder, table and JSON output, one-line errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holiclip.cli.app import app

from tests.helpers.cli import invoke, one_line_error

runner = CliRunner()
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("imgs")
    for name, rgb in COLORS.items():
        Image.fromarray(np.full((40, 48, 3), rgb, dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def index(tmp_path_factory, collection, tiny_checkpoint):
    out = tmp_path_factory.mktemp("index") / "idx"
    res = runner.invoke(app, ["embed", "-c", str(tiny_checkpoint), "--images", str(collection), "--out", str(out),
                              "--fusion", "mean,norm-max", "--batch-size", "3", "--chunk-size", "3"])
    assert res.exit_code == 0, res.output
    assert f"embedded 4 images: 5 flat indexes (web, detail, main, fused-mean, fused-norm-max) in {out}" in res.output
    return out


def test_embed_writes_the_index(index):
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["count"] == 4 and manifest["fusion"] == ["mean", "norm-max"]
    assert (index / "faiss" / "fused-norm-max.index").is_file() and (index / "embeddings" / "web.npy").is_file()


def test_search_text_json(index, collection):
    res = runner.invoke(app, ["search", str(index), "a red background", "--branch", "main", "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["target"] == "main" and doc["kind"] == "text" and doc["query"] == "a red background"
    assert [r["rank"] for r in doc["results"]] == [1, 2, 3]
    assert {r["id"] for r in doc["results"]} <= {str((collection / f"{c}.png").resolve()) for c in COLORS}
    scores = [r["score"] for r in doc["results"]]
    assert scores == sorted(scores, reverse=True)


def test_search_image_table(index, collection):
    example = collection / "blue.png"
    res = runner.invoke(app, ["search", str(index), "--image", str(example), "--fusion", "norm-max", "-k", "2"])
    assert res.exit_code == 0, res.output
    assert "on fused-norm-max" in res.output and "rank" in res.output and "image id" in res.output
    first = next(line for line in res.output.splitlines() if line.strip().startswith("1 "))
    assert str(example.resolve()) in first and "1.0000" in first  # the example itself, cosine 1


@pytest.mark.parametrize("args, message", [
    (["q", "--image", "x.png"], "give a text QUERY or --image PATH (one of them)"),
    ([], "give a text QUERY or --image PATH (one of them)"),
    (["q", "--branch", "style"], "unknown branch 'style'"),
    (["q", "--branch", "main", "--fusion", "mean"], "give --branch or --fusion, not both"),
    (["q", "--fusion", "max"], "no 'max' fused embedding (it has ['mean', 'norm-max'])"),
])
def test_search_errors(index, args, message):
    res = runner.invoke(app, ["search", str(index), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_search_unreadable_query_image(index, tmp_path):
    (tmp_path / "q.png").write_bytes(b"nope")
    res = runner.invoke(app, ["search", str(index), "--image", str(tmp_path / "q.png")])
    assert res.exit_code == 2 and f"{tmp_path / 'q.png'}: unreadable image" in res.output


def test_search_not_an_index(tmp_path):
    res = runner.invoke(app, ["search", str(tmp_path), "q"])
    assert res.exit_code == 2 and "manifest.json not found: not an index written by `holiclip embed`" in res.output


@pytest.mark.parametrize("command", ["embed", "search"])
def test_missing_faiss_is_one_line(command, index, collection, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    args = (["embed", "-c", str(tiny_checkpoint), "--images", str(collection), "--out", str(tmp_path / "o")]
            if command == "embed" else ["search", str(index), "a red background"])
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert res.output.strip() == "error: holiclip embed / search needs faiss: pip install 'holiclip[search]'"


# -- the index checked when opened and searched: every mismatch one line naming the file and the fix ----
@pytest.fixture
def index_copy(index, tmp_path):
    import shutil

    return Path(shutil.copytree(index, tmp_path / "idx"))


def test_a_model_of_another_width_is_refused(index, tmp_path):
    """holi-small (width 256) on an index of holi-tiny (64): never reshaped into 4 queries."""
    import numpy as np
    import torch

    import holiclip
    from holiclip.integrations.search import SearchError, SearchIndex

    torch.manual_seed(0)
    wide = holiclip.save_model(holiclip.create_model("holi-small", branches=("web", "detail", "main")), tmp_path / "w")
    line = one_line_error(invoke("search", index, "a red background", "-c", wide))
    assert f"model {wide} gives embeddings of width 256, the index {index} has width 64" in line
    idx = SearchIndex.open(index)
    for shape in ((1, 256), (2, 32), (64,) * 2 + (1,)):
        with pytest.raises(SearchError, match=r"query embeddings of shape .* whose embeddings have width 64"):
            idx.search(np.zeros(shape, np.float32), "fused-mean")
    assert len(idx.search(np.ones(64, np.float32), "fused-mean", k=2)) == 1  # one vector: one query


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_faiss_file_names_the_file_and_the_rebuild(index_copy, damage):
    target = index_copy / "faiss" / "fused-mean.index"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"not faiss at all" * 64)
    line = one_line_error(invoke("search", index_copy, "a red background"))
    assert f"{target}: not a readable faiss index" in line and "rebuild it with `holiclip embed -c" in line
    # the command it gives rebuilds the index from its chunks, and the search works again
    command = line.split("rebuild it with `holiclip ")[1].rstrip("`").split()
    assert invoke(*command).exit_code == 0
    assert invoke("search", index_copy, "a red background").exit_code == 0


@pytest.mark.parametrize("edit, where, why", [
    ("short ids", "ids.json", "3 image ids for the 4 rows manifest.json gives"),
    ("dim", "embeddings/web.npy", "shape (4, 64); manifest.json says (4, 65)"),
    ("count", "ids.json", "4 image ids for the 5 rows manifest.json gives"),
    ("no branch file", "manifest.json", "'faiss' lists"),
    ("ids not a list", "ids.json", "not a list of image ids"),
])
def test_an_edited_index_is_named_when_opened(index_copy, edit, where, why):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    ids = json.loads((index_copy / "ids.json").read_text())
    if edit == "short ids":
        ids = ids[:-1]
    elif edit == "dim":
        manifest["dim"] += 1
    elif edit == "count":
        manifest["count"] += 1
    elif edit == "no branch file":
        del manifest["faiss"]["main"]
    else:
        ids = {"ids": ids}
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    (index_copy / "ids.json").write_text(json.dumps(ids))
    line = one_line_error(invoke("search", index_copy, "a red background"))
    assert f"{index_copy / where}: {why}" in line and "holiclip embed" in line

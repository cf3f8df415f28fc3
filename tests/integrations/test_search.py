"""Embedding a collection and searching it: the faiss top-k equals brute force with the model,
an interrupted embedding resumes to the same arrays, the IVF index, unreadable images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from holiclip.benchmarks.emoji.data import build as B
from holiclip.benchmarks.emoji.data import sources as S
from holiclip.evaluation.features import encode_images, encode_texts
from holiclip.integrations import search as SR
from holiclip.models.fusion import fuse

TINY = B.preset("tiny")
FUSION = ["mean", "max"]
CHUNK = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for the whole module (the box is shared, and embeddings compared bit for bit
    must come from the same thread count), given back afterwards: later tests compare this process
    with others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def emoji_images(tmp_path_factory) -> Path:
    """The images of every split of the tiny emoji build (installed sources, no download)."""
    root = tmp_path_factory.mktemp("emoji") / "tiny"
    B.build(root, TINY, sources=S.require_sources(styles=TINY.heldout_styles))
    return root / "images"


def _embed(em, checkpoint, images, out, **kw):
    kw = {"fusion": FUSION, "chunk_size": CHUNK, "batch_size": 8, "progress": False, **kw}
    return SR.embed_collection(em.model, em.transform, images, out, checkpoint=checkpoint, **kw)


@pytest.fixture(scope="module")
def index(tmp_path_factory, eval_model, tiny_checkpoint, emoji_images):
    out = tmp_path_factory.mktemp("index")
    _embed(eval_model, tiny_checkpoint, emoji_images, out)
    return SR.SearchIndex.open(out)


@pytest.fixture(scope="module")
def brute(eval_model, emoji_images):
    """Every image's branch embeddings computed with the model directly, by absolute path."""
    paths = sorted(str(p.resolve()) for p in emoji_images.rglob("*.png"))
    feats = encode_images(eval_model.model, paths, eval_model.transform, batch_size=5)
    return paths, feats


def _brute_top(brute, names, query: torch.Tensor, target: str, k: int):
    paths, feats = brute
    emb = feats[:, names.index(target)] if target in names else fuse(feats, target.removeprefix("fused-"))
    scores = emb @ query.reshape(-1)
    top = torch.topk(scores, k)
    return [paths[i] for i in top.indices], top.values.numpy()


def test_manifest_and_arrays(index, brute, eval_model):
    m = index.manifest
    paths, feats = brute
    assert m["branches"] == ["web", "detail", "main"] and m["fusion"] == FUSION
    assert m["count"] == len(paths) == len(index.ids) > 3 * CHUNK and m["index"] == {"kind": "flat"}
    assert m["dim"] == feats.shape[2] and m["model"] == "holi-tiny" and m["skipped"] == 0
    assert sorted(index.targets) == sorted(["web", "detail", "main", "fused-mean", "fused-max"])
    assert sorted(index.ids) == paths
    order = [paths.index(i) for i in index.ids]
    main = index.embeddings("main")
    assert isinstance(main, np.memmap) and main.dtype == np.float32
    np.testing.assert_allclose(main, feats[order, 2].numpy(), atol=1e-5)
    np.testing.assert_allclose(index.embeddings("fused-max"), fuse(feats[order], "max").numpy(), atol=1e-5)


@pytest.mark.parametrize("text", ["a plain red background", "The main object is a large robot."])
def test_text_search_equals_brute_force(index, brute, eval_model, text):
    q = SR.encode_text_query(eval_model.model, eval_model.tokenizer, [text])
    direct = encode_texts(eval_model.model, eval_model.tokenizer, [text]).features
    torch.testing.assert_close(q, direct)
    names = list(eval_model.branch_names)
    for target in index.targets:
        hits = index.search(q, target, k=7)[0]
        ids, scores = _brute_top(brute, names, q, target, 7)
        assert [h.id for h in hits] == ids, target
        assert [h.rank for h in hits] == list(range(1, 8))
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)


def test_image_search_equals_brute_force(index, brute, eval_model):
    paths, feats = brute
    example = paths[5]
    names = list(eval_model.branch_names)
    for target in index.targets:
        q = SR.encode_image_query(eval_model.model, eval_model.transform, example, target)
        hits = index.search(q, target, k=4)[0]
        ids, scores = _brute_top(brute, names, q, target, 4)
        assert [h.id for h in hits] == ids, target
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
        if target != "fused-max":  # unit vectors: the example itself is the best match
            assert hits[0].id == example and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_k_larger_than_collection(index, eval_model):
    q = SR.encode_text_query(eval_model.model, eval_model.tokenizer, ["x"])
    assert len(index.search(q, "main", k=10_000)[0]) == len(index.ids)


def test_resume_after_interruption(tmp_path, index, eval_model, tiny_checkpoint, emoji_images, monkeypatch):
    calls, real = [], SR.encode_images

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 3:  # killed while encoding the third chunk
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(SR, "encode_images", interrupted)
    out = tmp_path / "idx"
    with pytest.raises(KeyboardInterrupt):
        _embed(eval_model, tiny_checkpoint, emoji_images, out)
    assert sorted(p.name for p in (out / "chunks").glob("*.npz")) == ["000000.npz", "000001.npz"]
    with pytest.raises(SR.SearchError, match="not finished: run it again to resume"):
        SR.SearchIndex.open(out)
    (out / "chunks" / "000002.npz.123.deadbeef.tmp").write_bytes(b"half a chunk")  # a kill mid-write

    calls.clear()
    monkeypatch.setattr(SR, "encode_images", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    _embed(eval_model, tiny_checkpoint, emoji_images, out)
    n_chunks = -(-len(index.ids) // CHUNK)
    assert len(calls) == n_chunks - 2  # the two finished chunks were not encoded again
    resumed = SR.SearchIndex.open(out)
    assert resumed.ids == index.ids
    for target in index.targets:
        np.testing.assert_array_equal(resumed.embeddings(target), index.embeddings(target))


def test_rerun_with_other_settings_is_refused(tmp_path, eval_model, tiny_checkpoint, emoji_images):
    out = tmp_path / "idx"
    _embed(eval_model, tiny_checkpoint, emoji_images, out)
    with pytest.raises(SR.SearchError, match=r"another embedding run \(chunk_size: 16 -> 32\)"):
        _embed(eval_model, tiny_checkpoint, emoji_images, out, chunk_size=32)


def test_ivf_index(tmp_path, index, eval_model, tiny_checkpoint, emoji_images):
    import faiss

    out = tmp_path / "ivf"
    out.mkdir()
    (out / "chunks").symlink_to(index.root / "chunks")  # the same chunks: only the indexes are rebuilt
    m = _embed(eval_model, tiny_checkpoint, emoji_images, out, ivf=4)
    assert m["index"] == {"kind": "ivf-flat", "nlist": 4}
    ivf = SR.SearchIndex.open(out)
    assert isinstance(ivf.faiss_index("web"), faiss.IndexIVFFlat) and ivf.faiss_index("main").nlist == 4
    q = SR.encode_text_query(eval_model.model, eval_model.tokenizer, ["a blue striped background"])
    for target in index.targets:
        exact = index.search(q, target, k=5)[0]
        approx = ivf.search(q, target, k=5, nprobe=4)[0]  # every list visited: exact again
        assert [h.id for h in approx] == [h.id for h in exact]
        assert len(ivf.search(q, target, k=5, nprobe=1)[0]) >= 1
    with pytest.raises(SR.SearchError, match=f"--ivf 100000 needs at least 100000 images.*has {len(index.ids)}"):
        _embed(eval_model, tiny_checkpoint, emoji_images, tmp_path / "big", ivf=100000)


def test_unreadable_images_are_skipped_and_listed(tmp_path, eval_model, tiny_checkpoint, solid_image):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        solid_image(folder / f"ok{i}.png", (40 * i, 90, 200))
    (folder / "bad.png").write_bytes(b"not a png")
    m = _embed(eval_model, tiny_checkpoint, folder, tmp_path / "idx", chunk_size=1)  # bad.png is a chunk alone
    assert m["count"] == 3 and m["skipped"] == 1
    skipped = json.loads((tmp_path / "idx" / "skipped.json").read_text())
    assert [s["image"] for s in skipped] == [str((folder / "bad.png").resolve())] and skipped[0]["index"] == 0
    assert "unreadable" in skipped[0]["error"]
    assert SR.SearchIndex.open(tmp_path / "idx").ids == [str((folder / f"ok{i}.png").resolve()) for i in range(3)]


def test_bad_input_errors(tmp_path, index, eval_model, tiny_checkpoint):
    with pytest.raises(SR.SearchError, match="nowhere: no such file or folder"):
        _embed(eval_model, tiny_checkpoint, tmp_path / "nowhere", tmp_path / "o")
    with pytest.raises(SR.SearchError, match="unknown fusion mode 'avg'"):
        _embed(eval_model, tiny_checkpoint, tmp_path, tmp_path / "o", fusion=["avg"])
    with pytest.raises(SR.SearchError, match=r"unknown branch 'style'; .* has \['web', 'detail', 'main'\]"):
        index.target(branch="style")
    with pytest.raises(SR.SearchError, match=r"no 'norm-max' fused embedding \(it has \['mean', 'max'\]\)"):
        index.target(fusion="norm-max")
    assert index.target() == "fused-mean" and index.target(fusion="max") == "fused-max"
    with pytest.raises(SR.SearchError, match="manifest.json not found: not an index"):
        SR.SearchIndex.open(tmp_path)


def test_missing_faiss_names_the_extra(tmp_path, eval_model, tiny_checkpoint, monkeypatch, solid_image):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss -> ImportError
    solid_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(ImportError) as err:
        _embed(eval_model, tiny_checkpoint, tmp_path, tmp_path / "idx")
    assert str(err.value) == "holiclip embed / search needs faiss: pip install 'holiclip[search]'"
    assert not (tmp_path / "idx").exists()  # refused before any encoding


def test_jsonl_and_webdataset_sources(tmp_path, brute, eval_model, tiny_checkpoint, emoji_images):
    from tests.helpers.shards import write_shards

    paths, feats = brute
    some = paths[:20]
    jsonl = tmp_path / "list.jsonl"  # image paths relative to the JSONL's folder
    jsonl.write_text("".join(json.dumps({"image": str(Path(p).relative_to(emoji_images.parent))}) + "\n"
                             for p in some))
    (tmp_path / "images").symlink_to(emoji_images)
    shards = write_shards(tmp_path / "shards", [12, 8], members=lambda i, s: {"png": Path(some[i]).read_bytes()})
    for src, ids in ((jsonl, [str(tmp_path / "images" / Path(p).relative_to(emoji_images)) for p in some]),
                     (tmp_path / "shards", [f"{shards[i >= 12]}::{i:06d}" for i in range(20)])):
        out = tmp_path / f"idx-{Path(src).stem}"
        _embed(eval_model, tiny_checkpoint, src, out, chunk_size=7)
        index = SR.SearchIndex.open(out)
        assert index.ids == ids
        np.testing.assert_allclose(index.embeddings("detail"), feats[:20, 1].numpy(), atol=1e-5)

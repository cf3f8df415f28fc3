"""The text-feature cache of a locked text trunk: memory-mapped segments with a hashed index,
filled in chunks, appendable by concurrent runs, keyed by trunk and tokenizer; the trainer and
the loader use it without holding the features in memory."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from holiclip.data.loader import Collate
from holiclip.models.registry import create_model, get_tokenizer
from holiclip.training.text_cache import TextCache, TextCacheMiss, _find, cache_path, text_hashes
from holiclip.training.trainer import Trainer

from tests.helpers.datasets import make_dataset
from tests.helpers.training import cfg_for


class CharTokenizer:
    """Stand-in tokenizer: character codes, padded with 0."""

    context_length = 12

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [min(ord(c), 998) + 1 for c in t[: self.context_length]]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class StandInTrunk(torch.nn.Module):
    """A text trunk whose output depends on the text alone; counts the texts it computes."""

    def __init__(self, width: int = 8, fail_after: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(1000, width)
        self.computed, self.fail_after = 0, fail_after

    def text_trunk(self, tokens):
        if self.fail_after is not None and self.computed >= self.fail_after:
            raise RuntimeError("trunk failed")
        self.computed += len(tokens)
        return self.emb(tokens).sum(1)


def want(texts, trunk=None):
    with torch.no_grad():
        return (trunk or StandInTrunk()).text_trunk(CharTokenizer()(list(texts)))


def minilm():
    model = create_model("holi-small-minilm", branches=["global"], lock_text=True).eval()
    return model, get_tokenizer("holi-small-minilm")


# -- the cache ---------------------------------------------------------------------------------------
def test_text_cache_grows_and_matches_the_trunk(tmp_path):
    model, tok = minilm()
    cache = TextCache.open(tmp_path, model, tok)
    assert cache.ensure(["a red apple", "a dog"], model, tok, "cpu", progress=False)["new"] == 2
    row = cache.rows(["a red apple"])
    more = TextCache.open(tmp_path, model, tok)
    assert more.ensure(["a dog", "two cats on a mat"], model, tok, "cpu", progress=False) == {
        "texts": 2, "new": 1, "rows": 3}  # only the new text was added
    assert np.array_equal(more.rows(["a red apple"]), row)  # rows never move
    with torch.no_grad():
        expected = model.text_trunk(tok(["two cats on a mat", "a red apple"]))
    torch.testing.assert_close(more.lookup(["two cats on a mat", "a red apple"]), expected, rtol=1e-4, atol=1e-5)
    folder = cache_path(tmp_path, model, tok)
    assert more.path == folder and folder.is_dir()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["lock", "seg-000000.features.npy", "seg-000000.keys.npy",
                     "seg-000001.features.npy", "seg-000001.keys.npy"]
    for name in files[1:]:  # plain arrays, readable without pickle; the texts are not stored
        np.load(folder / name, allow_pickle=False)
        assert b"apple" not in (folder / name).read_bytes()


def test_text_cache_never_serves_another_trunks_features(tmp_path):
    """Other trunk weights (model.pretrained=, a fine-tuned trunk) or another tokenizer get their own cache."""
    texts = ["a red apple", "a dog on a sofa"]
    model, tok = minilm()
    TextCache.open(tmp_path, model, tok).ensure(texts, model, tok, "cpu", progress=False)
    with torch.no_grad():  # "other text weights": perturb the trunk
        for p in model.clip.text.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        expected = model.text_trunk(tok(texts))
    cache = TextCache.open(tmp_path, model, tok)
    assert cache.ensure(texts, model, tok, "cpu", progress=False)["new"] == 2
    torch.testing.assert_close(cache.lookup(texts), expected, rtol=1e-4, atol=1e-5)
    assert len([p for p in tmp_path.glob("text_trunk_*") if p.is_dir()]) == 2
    shorter = get_tokenizer("holi-small-minilm", context_length=16)
    assert cache_path(tmp_path, model, shorter) != cache_path(tmp_path, model, tok)


def test_fill_is_streamed_in_chunks_deduplicated_and_split_in_segments(tmp_path):
    texts = [f"caption {i % 23}" for i in range(70)]  # 23 texts, each repeated across chunks
    trunk, tok = StandInTrunk(), CharTokenizer()
    cache = TextCache(tmp_path / "c")
    stream = iter(texts)  # an iterator: read once, never materialised by the cache
    got = cache.ensure(stream, trunk, tok, batch_size=4, progress=False, chunk=5, segment_rows=6)
    assert got == {"texts": 70, "new": 23, "rows": 23} and trunk.computed == 23
    assert len(list((tmp_path / "c").glob("seg-*.keys.npy"))) == 4  # 6 + 6 + 6 + 5 rows
    unique = sorted(set(texts))
    torch.testing.assert_close(cache.lookup(unique), want(unique))
    assert len(set(cache.rows(unique).tolist())) == 23
    again = TextCache(tmp_path / "c").ensure(texts + ["new one"], trunk, tok, progress=False, chunk=7)
    assert again == {"texts": 71, "new": 1, "rows": 24} and trunk.computed == 24
    torch.testing.assert_close(cache.features(cache.rows(texts[:6]).reshape(2, 3)), want(texts[:6]).view(2, 3, -1))


def test_missing_text_is_an_error_naming_it(tmp_path):
    cache = TextCache(tmp_path / "c")
    cache.ensure(["a dog"], StandInTrunk(), CharTokenizer(), progress=False)
    with pytest.raises(TextCacheMiss, match=r"1 text\(s\) not in the text cache .*'a cat on a mat'"):
        cache.rows(["a dog", "a cat on a mat"])


def test_keys_sharing_their_high_half_are_told_apart():
    hi = np.array([1, 5, 5, 5, 9], dtype=np.uint64)
    lo = np.array([0, 30, 10, 20, 0], dtype=np.uint64)  # sorted by the high half only
    q_hi, q_lo = np.array([5, 5, 5, 5, 9, 2], dtype=np.uint64), np.array([10, 20, 30, 40, 0, 0], dtype=np.uint64)
    assert _find(hi, lo, q_hi, q_lo).tolist() == [2, 3, 1, -1, 4, -1]
    a, b = text_hashes(["x", "y", "x"])
    assert a[0] == a[2] and (a[0], b[0]) != (a[1], b[1])


def test_pickled_cache_maps_the_files_again_and_keeps_its_rows(tmp_path):
    texts = [f"text {i}" for i in range(300)]
    cache = TextCache(tmp_path / "c")
    cache.ensure(texts, StandInTrunk(), CharTokenizer(), progress=False, segment_rows=100)
    blob = pickle.dumps(cache)
    assert len(blob) < 500  # the folder and the segment count, not the arrays
    TextCache(tmp_path / "c").ensure(["added later"], StandInTrunk(), CharTokenizer(), progress=False)
    copy = pickle.loads(blob)
    assert len(copy) == 300 and len(TextCache(tmp_path / "c")) == 301  # the copy sees what the original saw
    assert np.array_equal(copy.rows(texts), cache.rows(texts))
    torch.testing.assert_close(copy.lookup(texts[::7]), want(texts[::7]))


def test_old_single_file_cache_is_ignored(tmp_path):
    texts = ["a dog", "a cat"]
    folder = tmp_path / "text_trunk_0123456789abcdef"  # the old cache: one file beside the new folder
    save_file({"features": torch.full((2, 8), 7.0)}, str(folder.with_suffix(".safetensors")),
              metadata={"texts": '["a dog", "a cat"]'})
    cache = TextCache(folder)
    assert len(cache) == 0
    assert cache.ensure(texts, StandInTrunk(), CharTokenizer(), progress=False)["new"] == 2
    torch.testing.assert_close(cache.lookup(texts), want(texts))


def test_failed_fill_publishes_nothing(tmp_path):
    cache = TextCache(tmp_path / "c")
    with pytest.raises(RuntimeError, match="trunk failed"):
        cache.ensure([f"t{i}" for i in range(20)], StandInTrunk(fail_after=8), CharTokenizer(), batch_size=4,
                     progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == []  # no segment, no temporary file
    assert len(TextCache(tmp_path / "c")) == 0


def _fill(folder, texts, barrier):
    barrier.wait()  # both runs fill at the same time
    TextCache(folder).ensure(texts, StandInTrunk(), CharTokenizer(), batch_size=3, progress=False, chunk=4,
                             segment_rows=5)


def test_concurrent_runs_append_without_losing_or_tearing_segments(tmp_path):
    folder = tmp_path / "c"
    a, b = [f"a{i}" for i in range(40)] + ["shared"], [f"b{i}" for i in range(40)] + ["shared"]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_fill, args=(folder, texts, barrier)) for texts in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    names = sorted(os.listdir(folder))
    numbers = sorted(int(n[4:10]) for n in names if n.endswith(".keys.npy"))
    assert numbers == list(range(len(numbers))) and len(numbers) >= 16  # contiguous, each run's 9 segments
    assert not [n for n in names if n.startswith(".tmp")]
    cache = TextCache(folder)
    torch.testing.assert_close(cache.lookup(a + b), want(a + b))


def test_collate_gathers_trunk_features_in_loader_workers(tmp_path):
    texts = [f"sample {i} slot {j}" for i in range(12) for j in range(3)]
    cache = TextCache(tmp_path / "c")
    cache.ensure(texts, StandInTrunk(), CharTokenizer(), progress=False)
    items = [{"image": torch.zeros(3, 2, 2), "texts": texts[3 * i: 3 * i + 3], "index": i, "bad": []}
             for i in range(12)]
    loader = DataLoader(items, batch_size=4, num_workers=2, collate_fn=Collate(text_cache=cache))
    batches = list(loader)
    assert [tuple(b["text_trunk_features"].shape) for b in batches] == [(4, 3, 8)] * 3
    assert all("texts" not in b for b in batches)
    torch.testing.assert_close(torch.cat([b["text_trunk_features"] for b in batches]).view(36, 8), want(texts))


def test_damaged_segment_is_an_error_naming_the_file(tmp_path):
    cache = TextCache(tmp_path / "c")
    cache.ensure(["a dog", "a cat"], StandInTrunk(), CharTokenizer(), progress=False)
    features = tmp_path / "c" / "seg-000000.features.npy"
    features.write_bytes(features.read_bytes()[:-10])  # a torn copy of the cache
    with pytest.raises(OSError, match=r"text cache file .*seg-000000\.features\.npy is unreadable \(shorter"):
        TextCache(tmp_path / "c")


# -- the trainer -------------------------------------------------------------------------------------
MINILM = ("model.name=holi-small-minilm", "model.lock_text=true", "optim.batch_size=4")


def test_trainer_feeds_cached_trunk_features_and_the_loss_equals_the_uncached(tmp_path):
    data = make_dataset(tmp_path, n=8)
    cached = Trainer(cfg_for(tmp_path, data, tmp_path / "a", *MINILM))
    cached._build()
    plain = Trainer(cfg_for(tmp_path, data, tmp_path / "b", *MINILM, "data.text_cache=off"))
    plain._build()
    assert cached.text_cache is not None and plain.text_cache is None
    assert len(cached.text_cache) == 24  # 8 samples x 3 slots, all different
    items = cached.dataset.__getitems__(list(range(4)))
    with_cache, without = cached.collate(items), plain.collate(items)
    assert with_cache["text_trunk_features"].shape == (4, 3, 384) and "texts" not in with_cache
    assert "text_trunk_features" not in without
    torch.testing.assert_close(cached.model.state_dict(), plain.model.state_dict(), rtol=0, atol=0)
    cached.model.train(), plain.model.train()
    got, expected = cached._forward_loss(with_cache), plain._forward_loss(without)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)
    # no tensor of all the features on the trainer: only the memory-mapped cache
    assert not [k for k, v in vars(cached).items() if torch.is_tensor(v) and v.numel() >= 24 * 384]


@pytest.mark.parametrize("extra", [("data.text_cache=off",), ("model.lock_text=false",)])
def test_no_text_cache_when_it_cannot_help(tmp_path, extra):
    data = make_dataset(tmp_path, n=8)
    t = Trainer(cfg_for(tmp_path, data, tmp_path / "run", *MINILM, *extra))
    t._build()
    assert t.text_cache is None and t.collate.text_cache is None
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("text_trunk_*"))


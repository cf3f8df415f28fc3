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

from tests.helpers.datasets import captions, make_dataset
from tests.helpers.text_cache import CharTokenizer, StandInTrunk, want
from tests.helpers.training import cfg_for


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
    assert files == ["seg-000000.claim", "seg-000000.features.npy", "seg-000000.keys.npy",
                     "seg-000001.claim", "seg-000001.features.npy", "seg-000001.keys.npy"]
    for name in (n for n in files if n.endswith(".npy")):  # plain arrays, readable without pickle; the texts are not stored
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


def test_writers_on_nodes_without_a_shared_lock_keep_both_their_segments(tmp_path, monkeypatch):
    """flock is node-local on many cluster file systems (Lustre localflock, some NFS): two nodes'
    writers publish at the same moment. Here the lock is a no-op and both writers are held until
    each is about to move its features into place: each must still get its own segment number."""
    import fcntl
    import threading

    monkeypatch.setattr(fcntl, "flock", lambda fd, op: None)  # what a node-local lock is to another node
    both = threading.Barrier(2, timeout=10)
    replace, held = os.replace, set()

    def meeting_replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".features.npy") and threading.get_ident() not in held:
            held.add(threading.get_ident())
            both.wait()  # each has chosen its number, neither has published yet
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", meeting_replace)
    folder = tmp_path / "c"
    texts = {"a": [f"writer a {i}" for i in range(5)], "b": [f"writer b {i}" for i in range(5)]}
    errors = []
    trunks = {name: StandInTrunk() for name in texts}  # built here: torch's global seed is not per thread

    def write(name):
        try:
            TextCache(folder).ensure(texts[name], trunks[name], CharTokenizer(), progress=False)
        except Exception as err:  # seen by the test below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(name,)) for name in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    cache = TextCache(folder)
    assert len(cache) == 10 and sorted(n for n in os.listdir(folder) if n.endswith(".keys.npy")) == [
        "seg-000000.keys.npy", "seg-000001.keys.npy"]
    torch.testing.assert_close(cache.lookup(texts["a"] + texts["b"]), want(texts["a"] + texts["b"]))


def test_claimed_number_of_a_writer_that_died_is_passed_over(tmp_path):
    folder = tmp_path / "c"
    cache = TextCache(folder)
    cache.ensure(["first"], StandInTrunk(), CharTokenizer(), progress=False)
    (folder / "seg-000001.claim").touch()  # claimed, never published
    cache.ensure(["second"], StandInTrunk(), CharTokenizer(), progress=False)
    assert sorted(n for n in os.listdir(folder) if n.endswith(".keys.npy")) == [
        "seg-000000.keys.npy", "seg-000002.keys.npy"]
    torch.testing.assert_close(TextCache(folder).lookup(["second", "first"]), want(["second", "first"]))


# -- completion records and the text pass over shards -------------------------------------------------
def shard_stream(root, **kw):
    from holiclip.data.shards import ShardStream

    from tests.helpers.shards import SLOTS

    return ShardStream(str(root), SLOTS, 2, transform=None, **kw)


def count_reads(monkeypatch) -> list[str]:
    """Every shard opened from here on (for its texts, samples or count), by URL."""
    from holiclip.data import shards

    opened = []
    for name in ("tar_members", "_open"):
        def counted(url, *args, _real=getattr(shards, name), **kwargs):
            opened.append(str(url))
            return _real(url, *args, **kwargs)
        monkeypatch.setattr(shards, name, counted)
    return opened


def test_complete_shards_are_not_read_again_until_they_change(tmp_path, monkeypatch):
    from holiclip.training.text_cache import fill_text_cache

    from tests.helpers.shards import write_shards

    paths = write_shards(tmp_path / "shards", [3, 4, 2])
    opened = count_reads(monkeypatch)
    trunk, tok = StandInTrunk(), CharTokenizer()
    first = fill_text_cache(TextCache(tmp_path / "c"), shard_stream(tmp_path / "shards"), trunk, tok, progress=False)
    assert first == {"sources": 3, "complete": 0, "read": 3, "texts": 27, "new": 27, "rows": 27}
    assert sorted(opened) == sorted(map(str, paths))
    opened.clear()
    again = fill_text_cache(TextCache(tmp_path / "c"), shard_stream(tmp_path / "shards"), trunk, tok, progress=False)
    assert again == {"sources": 3, "complete": 3, "read": 0, "texts": 0, "new": 0, "rows": 27} and opened == []
    # the slots decide the texts: another choice is another source
    other = shard_stream(tmp_path / "shards", missing_slot_policy="fill:web")
    other.slots = ["web", "main"]
    assert fill_text_cache(TextCache(tmp_path / "c"), other, trunk, tok, progress=False)["read"] == 3
    opened.clear()
    # a shard written again (new captions): read again, its new texts cached
    write_shards(tmp_path / "new", [3, 4, 2], members=lambda i, s: {**s, "json": s["json"].replace(b"#", b"# new ")})
    os.replace(tmp_path / "new" / "shard-000001.tar", paths[1])
    stream = shard_stream(tmp_path / "shards")
    got = fill_text_cache(TextCache(tmp_path / "c"), stream, trunk, tok, progress=False)
    assert got["read"] == 1 and got["new"] == 4 and opened == [str(paths[1])]  # its 4 new web captions
    texts = list(stream.iter_texts())
    torch.testing.assert_close(TextCache(tmp_path / "c").lookup(texts), want(texts))


def test_manifest_rows_are_recorded_complete_by_block(tmp_path, monkeypatch):
    from holiclip.data.loader import MultiTextDataset, load_manifest
    from holiclip.training import text_cache
    from holiclip.training.text_cache import fill_text_cache

    from tests.helpers.training import SLOTS

    monkeypatch.setattr(text_cache, "MANIFEST_ROWS", 3)
    data = make_dataset(tmp_path, n=8)
    slots = SLOTS.strip("[]").split(",")

    def fill():
        dataset = MultiTextDataset(load_manifest(data, slots), transform=None)
        return fill_text_cache(TextCache(tmp_path / "c"), dataset, StandInTrunk(), CharTokenizer(), progress=False)

    assert fill()["read"] == 3  # rows 0-2, 3-5, 6-7
    assert fill() == {"sources": 3, "complete": 3, "read": 0, "texts": 0, "new": 0, "rows": 24}
    lines = data.read_text().splitlines()
    lines[4] = lines[4].replace("picture number 4", "picture number four")
    data.write_text("\n".join(lines) + "\n")
    got = fill()
    assert (got["complete"], got["read"], got["new"]) == (2, 1, 1)  # the block holding row 4 alone


def test_damaged_shard_is_cached_up_to_the_damage_and_read_again_next_time(tmp_path, monkeypatch, caplog):
    from holiclip.training.text_cache import fill_text_cache

    from tests.helpers.shards import write_shards

    paths = write_shards(tmp_path / "shards", [4, 3])
    paths[0].write_bytes(paths[0].read_bytes()[:9000])  # truncated in its third sample (4 KiB each)
    opened = count_reads(monkeypatch)
    for launch in range(2):  # the second launch reads the damaged shard alone
        got = fill_text_cache(TextCache(tmp_path / "c"), shard_stream(tmp_path / "shards"), StandInTrunk(),
                              CharTokenizer(), progress=False)
        assert (got["complete"], got["read"]) == (launch, 2 - launch)
    assert opened.count(str(paths[0])) == 2 and opened.count(str(paths[1])) == 1
    before_damage = list(captions(0).values())  # the first sample's texts
    torch.testing.assert_close(TextCache(tmp_path / "c").lookup(before_damage), want(before_damage))
    assert "shard-000000.tar: damaged tar" in caplog.text and "read again next time" in caplog.text


def test_text_pass_reads_no_image_bytes_of_a_local_shard(tmp_path):
    from holiclip.data.shards import count_samples

    from tests.helpers.shards import write_shards

    big = os.urandom(1 << 20)  # 1 MiB "images": 8 MiB of shard
    write_shards(tmp_path, [8], members=lambda i, s: {**s, "png": big})

    def read_bytes():
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])

    stream = shard_stream(tmp_path)
    before = read_bytes()
    texts = list(stream.iter_texts())
    assert len(texts) == 8 * 3 and count_samples(str(tmp_path / "shard-000000.tar")) == 8
    assert read_bytes() - before < 256 * 1024  # tar headers and json members only, twice


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


"""Streamed webdataset shards: sources, each sample once per epoch over ranks and DataLoader
workers, an exact resume that decodes nothing it skips, resampling, sizes files, bad samples
named by shard and key, replaced and counted; the text pass that reads no image."""
from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

from holiclip.data import shards as shards_mod
from holiclip.data.records import DataError
from holiclip.data.shards import ShardStream, count_samples, shard_sizes, shard_urls
from holiclip.training.config import ConfigError, load_config

from tests.helpers.shards import SLOTS, TextCollate, noisy, number, to_tensor, write_shards

SIZES = [7, 13, 5, 10, 1]  # unequal, one shard of a single sample
TOTAL = sum(SIZES)


def stream(root, rank=0, world_size=1, batch_size=4, transform=to_tensor, **kw):
    kw.setdefault("shuffle_buffer", 6)
    return ShardStream(str(root), SLOTS, batch_size, transform, TextCollate(), rank=rank, world_size=world_size, **kw)


def numbers(batches) -> list[list[int]]:
    return [[number(t[0]) for t in b["texts"]] for b in batches]


def epoch_batches(s, epoch=0, start=0, workers=0):
    s.set_epoch(epoch, start)
    return list(s.loader(workers=workers))


# -- sources -----------------------------------------------------------------------------------------
def test_shard_sources_are_told_from_manifests(tmp_path):
    paths = [str(p) for p in write_shards(tmp_path / "s", [2, 2, 2])]
    assert shard_urls(str(tmp_path / "s")) == paths  # a folder of .tar files
    assert shard_urls(str(tmp_path / "s" / "shard-{000000..000002}.tar")) == paths  # a brace pattern
    assert shard_urls(paths[:2]) == paths[:2] and shard_urls("::".join(paths[1:])) == paths[1:]  # lists
    assert shard_urls(paths[0]) == paths[:1]
    assert shard_urls("pipe:cat /data/a-{0..1}.tar") == ["pipe:cat /data/a-0.tar", "pipe:cat /data/a-1.tar"]
    assert shard_urls("s3://bucket/cc3m/{00000..00002}.tar")[-1] == "s3://bucket/cc3m/00002.tar"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train.jsonl").write_text("")
    for manifest in ("train.jsonl", "train.csv", "t.tsv", str(tmp_path / "m")):  # a folder without shards too
        assert shard_urls(manifest) is None
    # the config takes a YAML list as webdataset's "::" list
    cfg = load_config(None, [f"data.train=[{paths[0]},{paths[1]}]"])
    assert cfg.data.train == f"{paths[0]}::{paths[1]}" and shard_urls(cfg.data.train) == paths[:2]
    with pytest.raises(ConfigError, match="data.shuffle_buffer must be >= 0"):
        load_config(None, ["data.shuffle_buffer=-1"])
    with pytest.raises(ConfigError, match="data.train_num_samples must be >= 1"):
        load_config(None, ["data.train_num_samples=0"])


def test_pipe_and_fsspec_urls_stream_the_same_samples(tmp_path):
    import fsspec

    paths = write_shards(tmp_path, [3, 4])
    local = numbers(epoch_batches(stream(tmp_path, batch_size=7, shuffle_buffer=0)))
    mem = fsspec.filesystem("memory")
    for p in paths:
        mem.pipe(f"/shards-test/{p.name}", p.read_bytes())
    mem.pipe("/shards-test/sizes.json", (tmp_path / "sizes.json").read_bytes())
    try:
        for urls in ([f"pipe:cat {p}" for p in paths], [f"memory://shards-test/{p.name}" for p in paths]):
            s = ShardStream(urls, SLOTS, 7, to_tensor, TextCollate(), shuffle_buffer=0)
            assert numbers(epoch_batches(s)) == local
    finally:
        mem.rm("/shards-test", recursive=True)


# -- each sample once per epoch ---------------------------------------------------------------------------
@pytest.mark.parametrize("world_size,workers", [(1, 0), (1, 2), (2, 1), (2, 2), (3, 2)])
def test_ranks_and_workers_see_each_sample_once_per_epoch(tmp_path, world_size, workers):
    write_shards(tmp_path, SIZES)
    per_rank, seen = [], Counter()
    for rank in range(world_size):
        s = stream(tmp_path, rank, world_size, workers=workers)
        batches = numbers(epoch_batches(s, epoch=1, workers=workers))
        assert all(len(b) == 4 for b in batches)
        per_rank.append(len(batches))
        seen.update(n for b in batches for n in b)
    assert len(set(per_rank)) == 1 and per_rank[0] == TOTAL // (4 * world_size)  # full batches alike on every rank
    assert max(seen.values()) == 1 and set(seen) <= set(range(TOTAL))  # never twice
    assert TOTAL - len(seen) == s.left_out_per_epoch < 4 * world_size  # only the drop_last remainder is left out


def test_epochs_reorder_and_seeds_repeat(tmp_path):
    write_shards(tmp_path, SIZES)
    a = numbers(epoch_batches(stream(tmp_path), epoch=0))
    assert numbers(epoch_batches(stream(tmp_path), epoch=0)) == a  # seeded
    assert numbers(epoch_batches(stream(tmp_path), epoch=1)) != a
    assert numbers(epoch_batches(stream(tmp_path, seed=1), epoch=0)) != a
    flat = [n for b in a for n in b]
    assert flat != sorted(flat)  # the shard order and the buffer shuffle


# -- exact resume ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers,resumed_with", [(2, 2), (2, 0), (2, 3), (0, 2)])
def test_resume_continues_the_epoch_exactly_whatever_the_workers(tmp_path, workers, resumed_with):
    write_shards(tmp_path, SIZES)
    s = stream(tmp_path, rank=1, world_size=2, batch_size=3, transform=noisy, workers=workers)
    full = epoch_batches(s, epoch=2, workers=workers)
    assert len(full) == 6
    for consumed in (1, 3):
        state = s.state()
        again = stream(tmp_path, rank=1, world_size=2, batch_size=3, transform=noisy)
        again.load_state(state, epoch=2, batch_in_epoch=consumed)
        rest = epoch_batches(again, epoch=2, start=consumed, workers=resumed_with)
        assert numbers(rest) == numbers(full[consumed:])
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(rest, full[consumed:]))  # same crops


def test_skipped_batches_are_not_decoded(tmp_path, monkeypatch):
    write_shards(tmp_path, SIZES)
    decoded = []
    real = shards_mod.open_image
    monkeypatch.setattr(shards_mod, "open_image", lambda data, limit: decoded.append(1) or real(data, limit))
    s = stream(tmp_path)
    full = epoch_batches(s)
    assert len(decoded) == len(full) * 4
    decoded.clear()
    assert numbers(epoch_batches(stream(tmp_path), start=5)) == numbers(full[5:])
    assert len(decoded) == (len(full) - 5) * 4  # only the batches still to come


def test_resampled_epochs_are_seeded_resumable_and_sized_by_train_num_samples(tmp_path):
    write_shards(tmp_path, SIZES)
    s = stream(tmp_path, resampled=True, num_samples=60)
    assert s.batches_per_epoch == 15
    full = numbers(epoch_batches(s, epoch=3))
    assert len(full) == 15 and numbers(epoch_batches(stream(tmp_path, resampled=True, num_samples=60), epoch=3)) == full
    assert Counter(n for b in full for n in b).most_common(1)[0][1] > 1  # 60 draws from 36 samples: repeats
    assert numbers(epoch_batches(s, epoch=4)) != full
    assert numbers(epoch_batches(s, epoch=3, start=9)) == full[9:]
    # without replacement train_num_samples shortens the epoch; more than the shards hold is an error
    short = numbers(epoch_batches(stream(tmp_path, num_samples=17)))
    assert len(short) == 4 and len({n for b in short for n in b}) == 16
    with pytest.raises(DataError, match=r"train_num_samples=99 is more than the 36 samples.*data.resampled=true"):
        stream(tmp_path, num_samples=99)


# -- resume on another world size -----------------------------------------------------------------------------
def fake_shards(tmp_path, n=16, size=100) -> list[str]:
    """Empty files standing in for shards whose sizes are given: positions only, nothing is read."""
    urls = [str(tmp_path / f"s{i:03d}.tar") for i in range(n)]
    for url in urls:
        open(url, "wb").close()
    return urls


def trained_positions(urls, world, state=None, trained=0, stop=None, **kw) -> tuple[list[list[int]], ShardStream]:
    """Epoch 0's global batches (the ranks' batches of positions in rank order) that ``world`` ranks train, resumed
    from ``state`` after ``trained`` batches, up to batch ``stop``; the last rank's stream."""
    per_rank = []
    for rank in range(world):
        s = ShardStream(urls, ["web"], 5, transform=None, rank=rank, world_size=world, sizes=[100] * len(urls),
                        workers=2, shuffle_buffer=50, **kw)
        start = s.load_state(state, 0, trained)
        s.set_epoch(0, start)
        positions = list(s.positions())
        per_rank.append(positions[: None if stop is None else stop - start])
    assert len({len(p) for p in per_rank}) == 1  # every rank trains as many batches
    return [[p for rank in per_rank for p in rank[k]] for k in range(len(per_rank[0]))], s


@pytest.mark.parametrize("worlds,stops,kw", [
    ((2, 4), (20,), {}), ((2, 4), (21,), {}), ((4, 2), (7,), {}), ((2, 4, 3), (11, 5), {}),
    ((2, 4), (20,), {"resampled": True, "num_samples": 1500}),
])
def test_resume_on_another_world_size_trains_each_remaining_position_once(tmp_path, worlds, stops, kw):
    """2 -> 4 ranks (8 -> 16 GPUs scaled down), 2 streams per rank, a shuffle buffer: the positions of
    the epoch not yet trained, in the order the 2-rank run would have trained them, re-cut over the new
    ranks; none repeated, none lost but the last part of a global batch (drop_last). Also fewer ranks, a
    second change within the epoch, and shards drawn with replacement (the sequence is seeded by epoch)."""
    urls = fake_shards(tmp_path)
    uninterrupted = [p for b in trained_positions(urls, worlds[0], **kw)[0] for p in b]
    batches, s = trained_positions(urls, worlds[0], stop=stops[0], **kw)
    state, trained = s.state(), stops[0]
    for world, stop in zip(worlds[1:], (*stops[1:], None)):
        more, s = trained_positions(urls, world, state, trained, stop, **kw)
        assert all(len(b) == 5 * world for b in more)
        batches += more
        state, trained = s.state(), stop
    seen = [p for b in batches for p in b]
    assert seen == uninterrupted[: len(seen)]  # the first run's order, each position once
    untrained, trains = s.remainder(0, 0)
    assert len(uninterrupted) - len(seen) == untrained - trains < 5 * worlds[-1]
    if stops == (20,):  # 1600 (1500) positions, 160 (150) batches of 5 per rank: 140 (130) left on each of 2
        # ranks = 70 (65) global batches of 20 on 4 ranks: the whole epoch is trained
        assert len(seen) == len(uninterrupted) == (1500 if kw else 1600)
        assert trains == untrained == len(uninterrupted) - 200 and s.batches(0) == untrained // 20


def test_shard_stream_resumed_on_more_ranks_streams_the_remaining_samples_with_their_crops(tmp_path):
    write_shards(tmp_path, SIZES)
    old = [stream(tmp_path, rank=r, world_size=2, batch_size=3, transform=noisy, workers=2) for r in range(2)]
    full = [epoch_batches(s, epoch=2, workers=2) for s in old]  # 6 batches per rank
    order = [b for k in range(6) for b in (full[0][k], full[1][k])]  # the 2-rank run's order, rank-batch by batch
    state = old[1].state()
    resumed = []
    for rank in range(4):
        s = stream(tmp_path, rank=rank, world_size=4, batch_size=3, transform=noisy)
        assert s.load_state(state, epoch=2, batch_in_epoch=2) == 0
        resumed.append(epoch_batches(s, epoch=2, workers=2 if rank == 1 else 0))
    assert [len(r) for r in resumed] == [2] * 4  # 8 rank-batches left = 2 global batches of 4
    again = [resumed[r][k] for k in range(2) for r in range(4)]
    assert numbers(again) == numbers(order[4:])
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(again, order[4:]))  # the same crops


def test_replacements_in_an_epoch_resumed_on_more_ranks_stay_out_of_the_global_batch(tmp_path):
    """On 2 ranks each rank's stream is its own; resumed on 4, ranks 0 and 2 train consecutive batches of one
    stream in one global batch: a replacement for rank 0 must not be a sample of rank 2's batch."""
    write_shards(tmp_path, [24], members=lambda i, s: {**s, "png": b"broken"} if i in (1, 2, 3) else s)
    state = stream(tmp_path, rank=0, world_size=2, batch_size=3, shuffle_buffer=0).state()
    ranks = []
    for rank in range(4):
        s = stream(tmp_path, rank=rank, world_size=4, batch_size=3, shuffle_buffer=0)
        s.load_state(state, epoch=0, batch_in_epoch=1)
        ranks.append(numbers(epoch_batches(s)))
    for k in range(len(ranks[0])):
        together = [n for r in ranks for n in r[k]]
        assert len(together) == len(set(together)), (k, [r[k] for r in ranks])


# -- sizes -----------------------------------------------------------------------------------------------------
def test_sizes_from_sizes_json_img2dataset_stats_or_counted(tmp_path, caplog):
    paths = write_shards(tmp_path, SIZES, sizes_file=False)
    with caplog.at_level(logging.WARNING, logger="holiclip.data.shards"):
        assert shard_sizes([str(p) for p in paths]) == SIZES
    assert "counting them" in caplog.text and "no sizes.json" in caplog.text
    assert [count_samples(str(p)) for p in paths] == SIZES
    for p, n in zip(paths, SIZES):  # img2dataset writes <shard>_stats.json
        (tmp_path / f"{p.stem}_stats.json").write_text(json.dumps({"successes": n, "count": n + 2}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="holiclip.data.shards"):
        assert shard_sizes([str(p) for p in paths]) == SIZES
    assert "counting" not in caplog.text
    (tmp_path / "sizes.json").write_text(json.dumps({paths[0].name: "seven"}))
    with pytest.raises(DataError, match=r"sizes.json: samples of shard-000000.tar must be a whole number"):
        shard_sizes([str(paths[0])])


def test_sizes_file_promising_more_than_a_shard_holds_names_the_missing_samples(tmp_path):
    paths = write_shards(tmp_path, [6, 6])
    (tmp_path / "sizes.json").write_text(json.dumps({paths[0].name: 8, paths[1].name: 6}))
    s = stream(tmp_path, on_bad_row="skip", shuffle_buffer=0)
    batches = epoch_batches(s)
    missing = [m for b in batches for m in b["bad_rows"]]
    assert missing == [f"{paths[0]}:#6: sample missing: the shard ends after 6 samples, not the 8 its sizes say",
                       f"{paths[0]}:#7: sample missing: the shard ends after 6 samples, not the 8 its sizes say"]
    assert [len(set(b)) for b in numbers(batches)] == [4, 4, 4]  # replaced by samples the shards hold


def test_a_shard_longer_than_its_size_is_warned_once_or_stops_the_run(tmp_path, caplog):
    paths = write_shards(tmp_path, [6, 6])
    (tmp_path / "sizes.json").write_text(json.dumps({paths[0].name: 4, paths[1].name: 6}))
    s = stream(tmp_path, on_bad_row="skip", shuffle_buffer=0, batch_size=5)
    with caplog.at_level(logging.WARNING, logger="holiclip.data.shards"):
        seen = [n for epoch in (0, 1) for b in numbers(epoch_batches(s, epoch)) for n in b]
        texts = list(s.iter_texts())
    warnings = [r.getMessage() for r in caplog.records if "never read" in r.getMessage()]
    assert warnings == [f"warning: {paths[0]}: the shard holds 6 samples, its sizes (sizes.json or *_stats.json) "
                        "say 4: the 2 past them are never read; correct the sizes (or delete sizes.json to have "
                        "the shards counted)"]  # once, over two epochs and the text pass
    assert sorted(seen) == sorted([0, 1, 2, 3, *range(6, 12)] * 2) and len(texts) == 10 * len(SLOTS)
    shards_mod._LONGER_SEEN.clear()
    with pytest.raises(DataError, match=rf"{paths[0]}: the shard holds 6 samples, .* say 4: .*data.on_bad_row=skip"):
        epoch_batches(stream(tmp_path, shuffle_buffer=0, batch_size=5))  # on_bad_row=error, the default


def test_a_longer_shard_on_the_command_line_is_one_line(tmp_path):
    from tests.helpers.cli import invoke, one_line_error

    paths = write_shards(tmp_path / "shards", [10, 10])
    (tmp_path / "shards" / "sizes.json").write_text(json.dumps({paths[0].name: 10, paths[1].name: 8}))
    line = one_line_error(invoke(
        "train", f"data.train={tmp_path / 'shards'}", f"data.slots=[{','.join(SLOTS)}]", "model.name=holi-tiny",
        "optim.batch_size=6", "optim.steps=4", f"run.out={tmp_path / 'run'}", "run.progress=false",
        "run.tensorboard=false", "data.shuffle_buffer=0", f"run.cache_dir={tmp_path / 'cache'}"))
    assert f"{paths[1]}: the shard holds 10 samples, its sizes (sizes.json or *_stats.json) say 8" in line


# -- bad samples -------------------------------------------------------------------------------------------------
def _bad_members(n, sample):
    if n == 3:
        return {**sample, "png": b"\x89PNG\r\n\x1a\n not an image"}
    if n == 8:
        return {**sample, "json": b'{"captions": {"web": "torn'}
    if n == 12:
        caps = json.loads(sample["json"])["captions"]
        del caps["main"]
        return {**sample, "json": json.dumps({"captions": caps}).encode()}
    if n == 15:
        return {"json": sample["json"]}
    return sample


def test_bad_samples_are_named_by_shard_and_key_replaced_and_counted(tmp_path):
    paths = write_shards(tmp_path, [10, 10, 10], members=_bad_members)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # a truncated tar: its second half is gone
    s = stream(tmp_path, batch_size=5, shuffle_buffer=8, on_bad_row="skip", missing_slot_policy="drop")
    batches = epoch_batches(s, workers=2)
    assert len(batches) == 6 and all(len(b["index"]) == 5 for b in batches)
    bad = [m for b in batches for m in b["bad"]]
    rows = [m for b in batches for m in b["bad_rows"]]
    dropped = [m for b in batches for m in b["dropped"]]
    assert len(bad) == 1 and bad[0].startswith(f"{paths[0]}:000003.png: cannot identify image file")
    assert any(r.startswith(f"{paths[0]}:000008: malformed json member (Unterminated string") for r in rows)
    assert any(r.startswith(f"{paths[1]}:000015: no image member (jpg/jpeg/png/webp/bmp/gif/tif/tiff; members: json)") for r in rows)
    truncated = [r for r in rows if r.startswith(f"{paths[2]}:#")]
    assert truncated and all("truncated or damaged tar" in r for r in truncated)
    assert len(rows) == 2 + len(truncated)
    assert dropped == [f"{paths[1]}:000012 (no 'main'; data.missing_slot_policy=drop)"]
    for b in numbers(batches):
        assert len(set(b)) == len(b)  # a replacement never repeats a sample of its batch
    left_out = {3, 8, 12, 15} | {20 + int(r.split("#")[1].split(":")[0]) for r in truncated}
    assert not left_out & {n for b in numbers(batches) for n in b}


@pytest.mark.parametrize("n,policy,message", [
    (8, {}, r"shard-000000.tar:000008: malformed json member .*data.on_bad_row=skip skips such samples"),
    (15, {}, r"shard-000001.tar:000015: no image member \(jpg/jpeg/png/webp"),
    (12, {"on_bad_row": "skip"}, r"shard-000001.tar:000012: caption slot 'main' is missing"),
])
def test_bad_samples_stop_the_stream_under_the_error_policies(tmp_path, n, policy, message):
    write_shards(tmp_path, [10, 10], members=lambda i, s: _bad_members(i, s) if i == n else s)
    with pytest.raises(DataError, match=message) as err:
        epoch_batches(stream(tmp_path, **policy), workers=1)  # raised from a worker: the message alone
    assert "Traceback" not in str(err.value)


def test_unreadable_image_in_the_last_batch_is_replaced_from_the_streams_start(tmp_path):
    write_shards(tmp_path, [8], members=lambda i, s: {**s, "png": b"broken"} if i == 7 else s)
    batches = epoch_batches(stream(tmp_path, shuffle_buffer=0))
    assert numbers(batches)[1] == [4, 5, 6, 0]  # 7 replaced by the stream's first sample, not by one of its batch
    assert batches[1]["bad"] == [f"{tmp_path / 'shard-000000.tar'}:000007.png: cannot identify image file"]


def test_iter_texts_reads_json_only(tmp_path, monkeypatch):
    write_shards(tmp_path, [3, 4])
    monkeypatch.setattr(shards_mod, "open_image", lambda *a: pytest.fail("an image was decoded"))
    texts = list(stream(tmp_path).iter_texts())
    assert len(texts) == 7 * len(SLOTS) and sorted({number(t) for t in texts[::3]}) == list(range(7))


def test_items_decode_and_augment_as_the_map_style_dataset(tmp_path):
    from holiclip.data.loader import MultiTextDataset, load_manifest

    from tests.helpers.datasets import make_dataset

    write_shards(tmp_path / "shards", [5, 7], image_size=64)
    manifest = load_manifest(make_dataset(tmp_path / "jsonl", n=12), SLOTS)  # the same samples, rows in shard order
    mapped = MultiTextDataset(manifest, noisy, seed=3)
    mapped.set_epoch(2)
    (batch,) = epoch_batches(stream(tmp_path / "shards", batch_size=12, transform=noisy, seed=3), epoch=2)
    for image, texts, index in zip(batch["images"], batch["texts"], batch["index"].tolist()):
        item = mapped[index]
        assert texts == item["texts"] and number(texts[0]) == index
        assert torch.equal(image, item["image"])  # same decode, same seeded draw per (seed, epoch, sample)

"""A launch's text cache and shard counting over 2 gloo ranks with a 5 s process-group timeout
(NCCL's default is 10 minutes): a complete cache reads no shard, a fill is shared by the ranks
and may outlast the timeout, an error on one rank stops both; shards without sizes.json are
counted by both ranks, each its share."""
from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from holiclip.data import shards
from holiclip.data.records import DataError
from holiclip.data.shards import ShardStream, shard_sizes
from holiclip.training.text_cache import TextCache, fill_text_cache

from tests.helpers.distributed import free_port
from tests.helpers.shards import SLOTS, write_shards
from tests.helpers.text_cache import CharTokenizer, StandInTrunk, want

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 2
TIMEOUT = 5  # seconds: every collective of the process group fails past it
SIZES = [3, 4, 2, 5, 1]


class SlowTrunk(StandInTrunk):
    """Sleeps ``seconds`` before its first batch: a fill longer than the process group's timeout."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def text_trunk(self, tokens):
        time.sleep(self.seconds)
        self.seconds = 0
        return super().text_trunk(tokens)


def _counting(names, log):
    """Wraps the shards module's functions ``names`` to log the URL of each call."""
    for name in names:
        def counted(url, *args, _real=getattr(shards, name), **kwargs):
            log.append(str(url))
            return _real(url, *args, **kwargs)
        setattr(shards, name, counted)


def _stream(root, rank):
    return ShardStream(str(root / "shards"), SLOTS, 2, transform=None, rank=rank, world_size=WORLD)


def _fill(root, rank, trunk):
    return fill_text_cache(TextCache(root / "cache"), _stream(root, rank), trunk, CharTokenizer(), rank=rank,
                           world_size=WORLD, progress=False, poll=0.05)


def _complete(root, rank):
    opened = []
    _counting(["tar_members", "_open"], opened)  # every way a shard is opened
    first = _fill(root, rank, StandInTrunk())
    first_opened, opened[:] = list(opened), []
    second = _fill(root, rank, StandInTrunk())
    second_opened = list(opened)
    texts = list(_stream(root, rank).iter_texts())  # every text of the shards is in the cache
    torch.testing.assert_close(TextCache(root / "cache").lookup(texts), want(texts))
    return {"first": first, "first_opened": first_opened, "second": second, "second_opened": second_opened}


def _slow(root, rank):
    trunk = SlowTrunk(TIMEOUT + 2 if rank == 1 else 0)
    started = time.monotonic()
    got = _fill(root, rank, trunk)
    waited = time.monotonic() - started
    ok = torch.ones(1)
    dist.all_reduce(ok)  # the process group is still healthy
    texts = list(_stream(root, rank).iter_texts())
    torch.testing.assert_close(TextCache(root / "cache").lookup(texts), want(texts))
    return {"counts": got, "computed": trunk.computed, "seconds": waited, "all_reduce": ok.item()}


def _failing(root, rank):
    try:
        _fill(root, rank, StandInTrunk(fail_after=0 if rank == 1 else None))
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None}


def _count(root, rank):
    counted = []
    _counting(["count_samples"], counted)
    urls = [str(root / "shards" / f"shard-{k:06d}.tar") for k in range(len(SIZES))]
    return {"sizes": shard_sizes(urls, rank, WORLD), "counted": counted}


def _count_failing(root, rank):
    def count(url):
        if url.endswith("shard-000001.tar"):  # counted by rank 1
            raise DataError(f"{url}: cannot open the shard")
        return 1

    shards.count_samples = count
    urls = [str(root / "shards" / f"shard-{k:06d}.tar") for k in range(len(SIZES))]
    try:
        shard_sizes(urls, rank, WORLD)
    except DataError as err:
        return {"error": str(err)}
    return {"error": None}


SCENARIOS = {f.__name__[1:]: f for f in (_complete, _slow, _failing, _count, _count_failing)}


def _rank(rank, port, root, scenario):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT))
    try:
        result = SCENARIOS[scenario](root, rank)
    finally:
        dist.destroy_process_group()
    (root / f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(root, scenario, sizes_file=True):
    write_shards(root / "shards", SIZES, sizes_file=sizes_file)
    # fork: the ranks inherit the imported modules (spawn would import open_clip again: seconds each)
    mp.start_processes(_rank, args=(free_port(), root, scenario), nprocs=WORLD, join=True, start_method="fork")
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_second_launch_on_a_complete_cache_reads_no_shard(tmp_path):
    ranks = run_ranks(tmp_path, "complete")
    urls = [str(tmp_path / "shards" / f"shard-{k:06d}.tar") for k in range(len(SIZES))]
    texts = sum(SIZES) * len(SLOTS)
    # the first launch: each shard read once, by one rank, rank r taking shards r, r + 2, ...
    assert [sorted(r["first_opened"]) for r in ranks] == [urls[0::2], urls[1::2]]
    for r in ranks:
        assert r["first"] == {"sources": 5, "complete": 0, "read": 5, "texts": texts, "new": texts, "rows": texts}
        assert r["second"] == {"sources": 5, "complete": 5, "read": 0, "texts": 0, "new": 0, "rows": texts}
        assert r["second_opened"] == []  # the second launch opens no shard on any rank


def test_fill_longer_than_the_process_group_timeout_does_not_time_out_the_waiting_rank(tmp_path):
    ranks = run_ranks(tmp_path, "slow")
    assert [r["all_reduce"] for r in ranks] == [2.0, 2.0]
    assert ranks[0]["seconds"] > TIMEOUT  # rank 0 finished its share at once, then waited past the timeout
    per_rank = [sum(SIZES[0::2]) * len(SLOTS), sum(SIZES[1::2]) * len(SLOTS)]
    for r, most in zip(ranks, per_rank):  # each rank computed the texts of its own shards only
        assert 0 < r["computed"] <= most
    assert ranks[0]["counts"] == ranks[1]["counts"] and ranks[0]["counts"]["read"] == len(SIZES)


def test_fill_failing_on_one_rank_stops_both_with_its_error(tmp_path):
    ranks = run_ranks(tmp_path, "failing")
    assert ranks[1]["error"] == "RuntimeError: trunk failed"
    assert ranks[0]["error"].startswith("RuntimeError: rank 1 stopped filling the text cache")
    assert ranks[0]["error"].endswith(": trunk failed")


def test_shards_without_sizes_are_counted_by_both_ranks_each_its_share(tmp_path):
    ranks = run_ranks(tmp_path, "count", sizes_file=False)
    urls = [str(tmp_path / "shards" / f"shard-{k:06d}.tar") for k in range(len(SIZES))]
    assert [r["sizes"] for r in ranks] == [SIZES, SIZES]
    assert [r["counted"] for r in ranks] == [urls[0::2], urls[1::2]]


def test_counting_error_on_one_rank_is_raised_on_both(tmp_path):
    ranks = run_ranks(tmp_path, "count_failing", sizes_file=False)
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["error"].endswith("shard-000001.tar: cannot open the shard")

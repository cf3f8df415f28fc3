"""Several machines: two torchrun launchers, one per node, rendezvousing on 127.0.0.1. Between them
they see each sample once per epoch, and on a manifest they train as one process does with the
same global batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from holiclip.training.config import load_config
from holiclip.training.trainer import read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.shards import number, write_shards
from tests.helpers.training import SLOTS, weights

TIMEOUT_S = 300
SAMPLES, NODES, BATCH = 16, 2, 4  # a global batch of 8: two steps an epoch

# `holiclip train ARGS` on one rank, writing the web caption of each sample its loader hands out
# (one line per batch) to SEEN_DIR/rank<RANK>.jsonl
_RANK = """
import json, os, sys
from holiclip.cli.app import main
from holiclip.data.loader import Collate

real = Collate.__call__
path = os.path.join(os.environ["SEEN_DIR"], f"rank{os.environ['RANK']}.jsonl")

def recording(self, items):
    with open(path, "a") as fh:
        fh.write(json.dumps([it["texts"][0] for it in items]) + "\\n")
    return real(self, items)

Collate.__call__ = recording
sys.argv = ["holiclip", "train", *sys.argv[1:]]
main()
"""


def _launch_nodes(tmp_path: Path, args: list[str]) -> list[list[list[str]]]:
    """``holiclip train ARGS`` as NODES torchrun launchers (one process each) on the loopback
    interface; returns, per rank, the web captions of each batch it loaded. A launcher that fails
    or hangs fails the test with every node's output."""
    script, seen = tmp_path / "rank.py", tmp_path / "seen"
    script.write_text(_RANK)
    seen.mkdir()
    port = free_port()  # chosen right before the launchers start: the window for another taker is short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEEN_DIR": str(seen)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NODES), "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a hung launcher is stopped with its worker
        )
        for node in range(NODES)
    ]
    outputs, deadline = [""] * NODES, time.monotonic() + TIMEOUT_S
    try:
        for node, proc in enumerate(procs):
            try:
                outputs[node] = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                pass
    finally:
        for node, proc in enumerate(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                outputs[node] += proc.communicate()[0] + f"\n[killed after {TIMEOUT_S} s]"
    report = "\n".join(f"--- node {n} (exit {p.returncode}) ---\n{out[-4000:]}"
                       for n, (p, out) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    return [[json.loads(line) for line in (seen / f"rank{r}.jsonl").read_text().splitlines()] for r in range(NODES)]


def _jsonl(tmp_path):
    return make_dataset(tmp_path, n=SAMPLES)


def _shards(tmp_path):
    write_shards(tmp_path / "shards", [5, 6, 5])  # shards of unequal size, split mid-shard between nodes
    return tmp_path / "shards"


SOURCES = {"jsonl": _jsonl, "shards": _shards}


@pytest.mark.parametrize("source", list(SOURCES))
def test_two_nodes_on_loopback_see_each_sample_once_per_epoch(tmp_path, source):
    data = SOURCES[source](tmp_path)
    common = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=4",
              "optim.warmup_steps=1", "optim.lr=1e-3", "run.progress=false", "run.tensorboard=false",
              "run.log_every=1", "run.save_every=2", f"run.cache_dir={tmp_path}/cache"]
    # a shared run folder, as on a cluster file system: rank 0 writes it
    seen = _launch_nodes(tmp_path, [*common, f"optim.batch_size={BATCH}", f"run.out={tmp_path}/nodes"])
    steps_per_epoch = SAMPLES // (NODES * BATCH)
    for epoch in range(2):
        batches = [b for rank in seen for b in rank[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]]
        assert all(len(b) == BATCH for b in batches)
        assert sorted(number(text) for b in batches for text in b) == list(range(SAMPLES)), (epoch, seen)
    nodes = read_metrics(tmp_path / "nodes")
    assert [m["step"] for m in nodes] == [1, 2, 3, 4]
    assert [m["data/seen"] for m in nodes] == [8, 16, 24, 32]
    assert all(m["samples_per_s_per_device"] == pytest.approx(m["samples_per_s"] / NODES) for m in nodes)
    if source != "jsonl":  # a stream splits its epoch by rank: one process makes other global batches
        return
    train(load_config(None, [*common, f"optim.batch_size={NODES * BATCH}", f"run.out={tmp_path}/one"]))
    one = read_metrics(tmp_path / "one")
    assert [m["loss"] for m in nodes] == pytest.approx([m["loss"] for m in one], rel=1e-5, abs=1e-6)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "nodes")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

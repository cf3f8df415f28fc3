"""Several machines: two torchrun launchers, one per node, rendezvousing on 127.0.0.1, train as one
process does with the same global batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from holiclip.training.config import load_config
from holiclip.training.trainer import read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import SLOTS, weights

TIMEOUT_S = 300


def _launch_nodes(args: list[str], nodes: int = 2) -> list[str]:
    """``holiclip train ARGS`` as ``nodes`` torchrun launchers (one process each) on the loopback
    interface; returns each node's output. A launcher that fails or hangs fails the test with every
    node's output."""
    port = free_port()  # chosen right before the launchers start: the window for another taker is short
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "holiclip.cli.app", "train", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a hung launcher is stopped with its worker
        )
        for node in range(nodes)
    ]
    outputs, deadline = [""] * nodes, time.monotonic() + TIMEOUT_S
    try:
        for node, proc in enumerate(procs):
            try:
                outputs[node] = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            except subprocess.TimeoutExpired:
                pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                outputs[procs.index(proc)] += proc.communicate()[0] + f"\n[killed after {TIMEOUT_S} s]"
    report = "\n".join(f"--- node {n} (exit {p.returncode}) ---\n{out[-4000:]}"
                       for n, (p, out) in enumerate(zip(procs, outputs)))
    assert all(p.returncode == 0 for p in procs), report
    return outputs


def _jsonl(tmp_path):
    return make_dataset(tmp_path, n=16)


# the webdataset shards join here once the trainer streams them (each sample once per epoch across nodes)
SOURCES = {"jsonl": _jsonl}


@pytest.mark.parametrize("source", list(SOURCES))
def test_two_nodes_on_loopback_match_one_process(tmp_path, source):
    data = SOURCES[source](tmp_path)
    common = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=3",
              "optim.warmup_steps=1", "optim.lr=1e-3", "run.progress=false", "run.tensorboard=false",
              "run.log_every=1", f"run.cache_dir={tmp_path}/cache"]
    train(load_config(None, [*common, "optim.batch_size=8", f"run.out={tmp_path}/one"]))
    # a shared run folder, as on a cluster file system: rank 0 writes it
    _launch_nodes([*common, "optim.batch_size=4", f"run.out={tmp_path}/nodes"])
    one, nodes = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "nodes")
    assert [m["step"] for m in nodes] == [1, 2, 3]
    for a, b in zip(one, nodes):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["data/seen"] == a["data/seen"]  # the global batch: 2 nodes x 4 = 8
        assert b["samples_per_s_per_device"] == pytest.approx(b["samples_per_s"] / 2)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "nodes")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)

"""Two gloo ranks training together (the real Trainer, a 20 s process-group timeout).

* An error on one rank (a loader's DataError, a TextCacheMiss, unreadable images past the limit,
  a failed write on rank 0, a non-finite loss) stops both ranks with the same error and message;
  a rank left waiting would instead fail on the timeout with another error.
* A step waits on the device only at log and save steps: collectives and host reads per step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from holiclip.data.loader import Collate
from holiclip.data.records import DataError
from holiclip.training import checkpoint as ckpt
from holiclip.training.logger import MetricLogger
from holiclip.training.text_cache import TextCacheMiss
from holiclip.training.trainer import Trainer

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import cfg_for

WORLD = 2
HOLICLIP = Path(sys.modules["holiclip"].__file__).parent
# the training step's own code (in a real run the loader's code runs in its worker processes)
STEP_CODE = tuple(str(HOLICLIP / p) for p in ("training", "models", "loss.py"))


def _fail_on(rank: int, target, name: str, error: Exception, at_call: int = 1):
    """Patches ``target.name`` so that its ``at_call``-th call on ``rank`` raises ``error``."""
    real = getattr(target, name)
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if dist.get_rank() == rank and len(calls) == at_call:
            raise error
        return real(*args, **kwargs)

    return mock.patch.object(target, name, patched)


def _bad_images_on_rank1():
    real = Collate.__call__

    def patched(self, items):
        out = real(self, items)
        if dist.get_rank() == 1:
            out["bad"] = out["bad"] + ["img/x.png: cannot identify image file", "img/y.png: truncated"]
        return out

    return mock.patch.object(Collate, "__call__", patched)


def _nan_loss_on_rank1_at(step: int):
    real = Trainer._loss

    def patched(self, out):
        losses = real(self, out)
        if dist.get_rank() == 1 and self.step == step:
            losses = {k: v * float("nan") for k, v in losses.items()}
        return losses

    return mock.patch.object(Trainer, "_loss", patched)


# case -> (the fault, config overrides)
CASES = {
    "loader_data_error": (lambda: _fail_on(1, Collate, "__call__", DataError("shard-00003.tar:17: 'json' is not JSON"),
                                           at_call=2), []),
    "text_cache_miss": (lambda: _fail_on(1, Collate, "__call__", TextCacheMiss("text 'a dog' is not in the cache")), []),
    "bad_fraction": (_bad_images_on_rank1, ["data.max_bad_fraction=0.001"]),
    "rank0_save_fails": (lambda: _fail_on(0, ckpt, "save_checkpoint", OSError(28, "No space left on device")),
                         ["run.save_every=2"]),
    "rank0_log_fails": (lambda: _fail_on(0, MetricLogger, "log", PermissionError(13, "metrics.jsonl: denied")), []),
    "non_finite_between_checks": (lambda: _nan_loss_on_rank1_at(1), ["run.log_every=3", "run.save_every=3"]),
    # config-based: refused on every rank before anything runs
    "local_loss_without_grad_gather": (contextlib.nullcontext, ["loss.local_loss=true", "loss.gather_with_grad=false"]),
}


class _Counts:
    """Counts collectives (by caller: a file of holiclip, or ``torch``) and the host reads of tensors
    that the training step's code makes."""

    COLLECTIVES = ("all_reduce", "all_gather", "broadcast_object_list", "all_gather_object", "broadcast")
    READS = ("item", "tolist", "__bool__", "cpu")

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.patches = [mock.patch.object(dist, n, self._wrap(getattr(dist, n), n, False)) for n in self.COLLECTIVES]
        self.patches += [mock.patch.object(torch.Tensor, n, self._wrap(getattr(torch.Tensor, n), n, True))
                         for n in self.READS]

    def _wrap(self, fn, name, reads):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if reads:
                key = name if caller.startswith(STEP_CODE) else None
            else:
                where = os.path.relpath(caller, HOLICLIP) if caller.startswith(str(HOLICLIP)) else "torch"
                key = f"{name}@{where}"
            if key:
                self.counts[key] = self.counts.get(key, 0) + 1
            return fn(*args, **kwargs)
        return wrapped

    def __enter__(self):
        for p in self.patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in self.patches:
            p.stop()


def count_per_step(cfg) -> list[dict[str, int]]:
    """Collectives and holiclip's host reads between the starts of consecutive steps (a step's
    work, its logging or saving, and the next step's exchange)."""
    marks: list[dict[str, int]] = []
    real = Trainer._train_step
    with _Counts() as counter:
        def marked(self, micro_batches):
            marks.append(dict(counter.counts))
            return real(self, micro_batches)

        with mock.patch.object(Trainer, "_train_step", marked):
            Trainer(cfg).train()
    return [{k: b.get(k, 0) - a.get(k, 0) for k in b if b.get(k, 0) - a.get(k, 0)} for a, b in zip(marks, marks[1:])]


def _worker(rank: int, port: int, data: str, out_dir: str, extra: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(out_dir)
    results: dict = {}
    # the first Trainer sets the process group up (run.dist_timeout); the others reuse it
    cfg = cfg_for(root, data, root / "counts", "optim.batch_size=4", "optim.steps=7", "run.log_every=3",
                  "run.save_every=100", *extra)
    results["counts"] = count_per_step(cfg)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("holiclip").addHandler(handler)
    Trainer(cfg_for(root, data, root / "warned", "optim.batch_size=4", "optim.steps=1", "loss.local_loss=false",
                    "loss.gather_with_grad=false", *extra)).train()
    logging.getLogger("holiclip").removeHandler(handler)
    results["warned"] = [w for w in warnings if "gather_with_grad" in w]
    for case, (fault, overrides) in CASES.items():
        with fault():
            try:
                Trainer(cfg_for(root, data, root / case, "optim.batch_size=4", *extra, *overrides)).train()
                results[case] = None
            except Exception as err:
                results[case] = [type(err).__name__, str(err)]
        results[case + "_checkpoints"] = sorted(p.name for p in (root / case / "checkpoints").glob("*.pt"))
    (root / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_two_ranks(data: Path, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the workers inherit the imported modules (spawn would re-import open_clip: ~5 s each)
        mp.start_processes(_worker, args=(free_port(), str(data), out_dir, extra), nprocs=WORLD, join=True,
                           start_method="fork")
        return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    data = make_dataset(tmp_path_factory.mktemp("data"), n=16)
    return run_two_ranks(data, ["run.dist_timeout=20"])


EXPECTED = {
    "loader_data_error": ("DataError", r"shard-00003.tar:17: 'json' is not JSON"),
    "text_cache_miss": ("TextCacheMiss", r"text 'a dog' is not in the cache"),
    "bad_fraction": ("DataError", r"(?s)2 of 100 images unreadable .*img/x.png: cannot identify"),
    "rank0_save_fails": ("OSError", r"No space left on device"),
    "rank0_log_fails": ("PermissionError", r"metrics.jsonl: denied"),
    "non_finite_between_checks": ("NonFiniteLoss", r"non-finite loss at step 1: contrastive_loss=nan \(found at step 2"),
    "local_loss_without_grad_gather": ("ConfigError", r"wrong gradient on several ranks: .* the gradient a sample "
                                                      r"gets as a negative in the other ranks' losses is lost"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_error_on_one_rank_stops_both_with_it(two_ranks, case):
    name, pattern = EXPECTED[case]
    raised = [r[case] for r in two_ranks]
    assert raised[0] == raised[1], raised  # the same error, the same message, on both ranks
    assert raised[0][0] == name and re.search(pattern, raised[0][1]), raised[0]


def test_non_finite_loss_between_checks_saves_nothing(two_ranks):
    # NaN at step 1 (0-based), checked at step 3, the first save step: no checkpoint holds NaN weights
    assert [r["non_finite_between_checks_checkpoints"] for r in two_ranks] == [[], []]


def test_a_step_waits_on_the_device_only_at_log_steps(two_ranks):
    """Steps 1..6 of 7 (log_every=3): per step one host-side exchange (gloo all_gather) and the
    loss's own feature gathers; at the log step (3, 6) one all-reduce and one read of the device."""
    for rank in two_ranks:
        steps = rank["counts"]
        assert len(steps) == 6
        for i, counts in enumerate(steps, start=1):
            ours = {k: v for k, v in counts.items() if not k.endswith("@torch")}
            logged = {"all_reduce@training/trainer.py": 1, "tolist": 1} if i % 3 == 0 else {}
            assert ours == {"all_gather@training/distributed.py": 1, **logged}, (i, counts)


def test_a_multi_rank_run_warns_of_a_gradient_scaled_by_the_world_size(two_ranks):
    rank0, rank1 = (r["warned"] for r in two_ranks)
    assert len(rank0) == 1 and not rank1  # once, from rank 0
    assert "the towers get 1/2 of the full-batch gradient while the logit scale gets all of it" in rank0[0]

"""optim.accum_steps=k with cached features: k micro-batches of B train as one batch of k x B
(loss, every parameter's gradient, under torchrun too), the random state is replayed for the
recompute, and a run with accumulation resumes bit-identically."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from holiclip.training import trainer as trainer_mod
from holiclip.training.accumulate import backward_as_one_batch
from holiclip.training.config import load_config
from holiclip.training.trainer import NonFiniteLoss, Trainer, read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import SLOTS, cfg_for, weights

pytestmark = pytest.mark.usefixtures("single_thread")

B = 4  # micro-batch

# loss settings on the tiny model; the dataset has the three slots web, detail, main
SETTINGS = {
    "H=M": (),
    "H<M-paired": ("model.branches=[a,b]",),
    "H<M-research": ("model.branches=[a,b]", "loss.free_matching=research"),
    "H>M-paired": ("data.slots=[web,main]", "model.branches=[a,b,c]"),
    "H>M-research": ("data.slots=[web,main]", "model.branches=[a,b,c]", "loss.free_matching=research"),
    "O2M": ("model.branches=[global]",),
    "hybrid": ("loss.fused_weight=0.5",),
    "diversity": ("loss.diversity_margin=-1.0",),  # a margin of -1 keeps the hinge active
    "text-cache": ("model.name=holi-small-minilm", "model.lock_text=true"),  # frozen trunk: cached features
}


def _gradients(trainer: Trainer, micro_batches) -> tuple[dict, dict]:
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = trainer._backward(micro_batches)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return {k: v.item() for k, v in losses.items()}, grads


def _assert_same(got, want):
    (got_loss, got_grads), (want_loss, want_grads) = got, want
    assert got_loss.keys() == want_loss.keys()
    for k in want_loss:
        assert got_loss[k] == pytest.approx(want_loss[k], rel=1e-5), k
    assert got_grads.keys() == want_grads.keys() and "clip.logit_scale" in want_grads
    for name, want_grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], want_grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("accum"), n=3 * B)


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, data, setting):
    trainer = Trainer(cfg_for(tmp_path, data, tmp_path / "run", f"optim.batch_size={B}", *setting))
    trainer._build()
    trainer.model.train()
    items = [trainer.dataset[i] for i in range(3 * B)]
    for k in (2, 3):
        big = _gradients(trainer, [trainer.collate(items[: k * B])])
        micro = _gradients(trainer, [trainer.collate(items[j * B: (j + 1) * B]) for j in range(k)])
        _assert_same(micro, big)


def test_recompute_replays_the_random_state():
    """With dropout, each recompute draws the masks its cached forward drew: the gradient is that
    of the k cached forwards taken as one batch, and the random stream goes on from after them."""
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.5))
    scale = torch.nn.Parameter(torch.tensor(2.0))
    inputs = torch.randn(9, 6, generator=torch.Generator().manual_seed(1))
    micro = [inputs[:3], inputs[3:6], inputs[6:]]

    def forward(x):
        return {"features": F.normalize(net(x), dim=-1), "scale": scale.exp()}

    def loss(out):  # couples every pair of samples, as a contrastive loss does
        logits = out["scale"] * out["features"] @ out["features"].T
        return {"loss": F.cross_entropy(logits, torch.arange(len(logits)))}

    def grads():
        return [p.grad.clone() for p in (*net.parameters(), scale)]

    torch.manual_seed(5)
    outs = [forward(x) for x in micro]
    want = loss({"features": torch.cat([o["features"] for o in outs]), "scale": outs[0]["scale"]})["loss"]
    want.backward()
    want_grads, want_next = grads(), torch.rand(3)
    for p in (*net.parameters(), scale):
        p.grad = None
    torch.manual_seed(5)
    got = backward_as_one_batch(micro, forward, loss, lambda total: total.backward())["loss"]
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for a, b in zip(grads(), want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(torch.rand(3), want_next)


def test_non_finite_loss_stops_with_message_under_accumulation(tmp_path, data, monkeypatch):
    real = trainer_mod.Trainer._loss
    monkeypatch.setattr(trainer_mod.Trainer, "_loss",
                        lambda self, out: {k: v * float("nan") for k, v in real(self, out).items()})
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 0: contrastive_loss=nan"):
        train(cfg_for(tmp_path, data, tmp_path / "run", f"optim.batch_size={B}", "optim.accum_steps=2"))


def test_accumulated_run_matches_big_batch_and_resumes_bit_identically(tmp_path):
    data = make_dataset(tmp_path, n=4 * B)  # 2 steps per epoch: the resume crosses an epoch
    accum = (f"optim.batch_size={B}", "optim.accum_steps=2")
    train(cfg_for(tmp_path, data, tmp_path / "big", f"optim.batch_size={2 * B}"))
    train(cfg_for(tmp_path, data, tmp_path / "full", *accum))
    assert train(cfg_for(tmp_path, data, tmp_path / "part", *accum, "run.max_steps_this_run=3"))["step"] == 3
    assert train(cfg_for(tmp_path, data, tmp_path / "part", *accum), resume="latest")["step"] == 6
    full, part = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(full[k], part[k]) for k in full)
    # the loss logged once per step is the whole batch's: the big batch's, step by step
    big_rows, full_rows = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "full")
    assert [m["step"] for m in full_rows] == [m["step"] for m in big_rows] == list(range(1, 7))
    assert [m["loss"] for m in full_rows] == pytest.approx([m["loss"] for m in big_rows], rel=1e-4)
    big = weights(tmp_path / "big")
    for k in big:
        torch.testing.assert_close(full[k], big[k], rtol=1e-3, atol=1e-5, msg=k)


_EACH_RANK = """
import sys
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from holiclip.training.config import load_config
from holiclip.training.trainer import Trainer


def main(out, overrides):
    trainer = Trainer(load_config(None, overrides))
    trainer._build()
    trainer.model.train()
    calls = []

    def count(state, bucket):  # DDP's all-reduce of one gradient bucket, counted
        calls.append(1)
        return allreduce_hook(state, bucket)

    trainer.net.register_comm_hook(None, count)
    batches = trainer._batches()
    micro = [next(batches), next(batches)]
    for _ in range(2):  # one micro-batch: the all-reduces of one backward (DDP re-buckets after the first)
        before = len(calls)
        trainer._backward(micro[:1])
        trainer.optimizer.zero_grad(set_to_none=True)
    one, before = len(calls) - before, len(calls)
    losses = trainer._backward(micro)
    loss = torch.stack(list(losses.values())).sum().reshape(1)
    dist.all_reduce(loss)
    if dist.get_rank() == 0:
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss / dist.get_world_size(), "grads": grads, "reduces": (one, len(calls) - before)}, out)


# the trainer (DDP and its hook) is gone when the group is destroyed, as after train(); a DDP
# model left for the interpreter's exit to free can abort the process there
main(sys.argv[1], sys.argv[2:])
dist.barrier()
dist.destroy_process_group()
"""


def test_torchrun_accumulation_equals_one_process_with_the_global_batch(tmp_path):
    micro = B // 2  # per rank: 2 ranks x 2 micro-batches make one global batch of 4 x micro
    data = make_dataset(tmp_path, n=8 * micro)
    common = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "loss.diversity_margin=-1.0",
              "run.progress=false", "run.tensorboard=false", f"run.cache_dir={tmp_path}/cache",
              f"run.out={tmp_path}/run"]
    script = tmp_path / "each_rank.py"
    script.write_text(_EACH_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), str(tmp_path / "rank0.pt"),
           *common, f"optim.batch_size={micro}", "optim.accum_steps=2"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-8000:]
    ranks = torch.load(tmp_path / "rank0.pt", weights_only=True)
    one, accumulated = ranks["reduces"]
    assert one == accumulated > 0  # no_sync: the gradients are all-reduced once per step, not per micro-batch

    single = Trainer(load_config(None, [*common, f"optim.batch_size={4 * micro}"]))
    single._build()
    single.model.train()
    batch = next(single._batches())  # the same samples as the ranks' first step
    loss, grads = _gradients(single, [batch])
    assert ranks["loss"].item() == pytest.approx(sum(loss.values()), rel=1e-5)
    assert grads.keys() == ranks["grads"].keys()
    for name, want in grads.items():
        torch.testing.assert_close(ranks["grads"][name], want, rtol=1e-4, atol=1e-6, msg=name)

"""M2MLoss across 2 gloo processes against the single-process loss on the full batch.

Each rank holds half of a global batch. DDP averages parameter gradients over ranks, so a
combination is *correct* when the loss averaged over ranks equals the full-batch loss and each
rank's input-feature gradient divided by the world size equals the full-batch gradient of its
rows (then J^T g / W summed over ranks is the full-batch parameter gradient).

What open_clip's scheme gives (checked below, all four combinations):
* local_loss=False, gather_with_grad=True  -> correct.
* local_loss=True,  gather_with_grad=True  -> correct (the recommended setting).
* local_loss=False, gather_with_grad=False -> same loss; every rank's gradient equals the full
  gradient of its rows *without* the 1/W, so after DDP averaging the step is W times too small.
* local_loss=True,  gather_with_grad=False -> wrong: the gradient through other ranks' rows is lost.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from holiclip import M2MLoss

from tests.helpers.distributed import free_port
from tests.helpers.tensors import unit

pytestmark = pytest.mark.usefixtures("single_thread")

WORLD = 2
BATCH = 12  # global
COMBOS = [(False, False), (False, True), (True, False), (True, True)]
# (branches, slots, fused_weight, diversity_margin, free_matching): one-to-one, free matching
# (H < M and H > M, both modes), hybrid, and the diversity term (computed per rank on local
# rows; with an always-active hinge its rank average is the full-batch value, so it must match too)
SETTINGS = [
    (3, 3, 0.0, None, "paired"), (2, 4, 0.0, None, "paired"), (3, 3, 0.4, None, "paired"),
    (4, 2, 0.0, None, "paired"), (3, 3, 0.2, -1.0, "paired"),
    (2, 4, 0.0, None, "research"), (4, 2, 0.0, None, "research"), (4, 2, 0.4, -1.0, "research"),
]
PLAIN = [s for s in SETTINGS if s[3] is None]
RESEARCH = [s for s in SETTINGS if s[4] == "research"]


def _inputs(branches, slots):
    image = unit(BATCH, branches, 16, seed=branches * 10 + slots)
    text = unit(BATCH, slots, 16, seed=branches * 10 + slots + 1)
    return image, text, torch.tensor(30.0, dtype=torch.float64)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {}
        half = BATCH // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        for setting in SETTINGS:
            branches, slots, fused, margin, mode = setting
            image, text, scale = _inputs(branches, slots)
            for local_loss, with_grad in COMBOS:
                img = image[rows].clone().requires_grad_(True)
                txt = text[rows].clone().requires_grad_(True)
                s = scale.clone().requires_grad_(True)
                loss_fn = M2MLoss(
                    local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=WORLD,
                    fused_weight=fused, diversity_margin=margin, free_matching=mode,
                )
                loss = loss_fn(img, txt, s)
                loss.backward()
                results[setting, local_loss, with_grad] = (loss.detach(), img.grad, txt.grad, s.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as out_dir:
        # fork: the workers inherit the imported modules (spawn would re-import open_clip: ~5 s each)
        mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True, start_method="fork")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


def _single(setting, mode=None):
    branches, slots, fused, margin, setting_mode = setting
    image, text, scale = _inputs(branches, slots)
    image, text, scale = (t.clone().requires_grad_(True) for t in (image, text, scale))
    loss_fn = M2MLoss(fused_weight=fused, diversity_margin=margin, free_matching=mode or setting_mode)
    loss = loss_fn(image, text, scale)
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad


def _name(setting):
    branches, slots, fused, margin, mode = setting
    return f"H{branches}M{slots}w{fused}d{margin}-{mode}"


def _ddp_view(results, key):
    """Loss averaged over ranks; input grads / W concatenated; logit-scale grad averaged."""
    loss = sum(r[key][0] for r in results) / WORLD
    image_grad = torch.cat([r[key][1] for r in results]) / WORLD
    text_grad = torch.cat([r[key][2] for r in results]) / WORLD
    scale_grad = sum(r[key][3] for r in results) / WORLD
    return loss, image_grad, text_grad, scale_grad


@pytest.mark.parametrize("setting", SETTINGS, ids=_name)
@pytest.mark.parametrize("local_loss,with_grad", [(False, True), (True, True)])
def test_gather_with_grad_matches_single_process(distributed_results, setting, local_loss, with_grad):
    ours = _ddp_view(distributed_results, (setting, local_loss, with_grad))
    for a, b in zip(ours, _single(setting)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("setting", PLAIN, ids=_name)
def test_no_grad_gather_global_loss_is_w_times_too_small(distributed_results, setting):
    """local_loss=False, gather_with_grad=False: right loss, gradients 1/W of the full batch's."""
    loss, image_grad, text_grad, _ = _ddp_view(distributed_results, (setting, False, False))
    full = _single(setting)
    torch.testing.assert_close(loss, full[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(image_grad * WORLD, full[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(text_grad * WORLD, full[2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("setting", PLAIN, ids=_name)
def test_no_grad_gather_global_loss_gives_the_logit_scale_all_its_gradient(distributed_results, setting):
    """... while the shared logit scale gets the full-batch gradient (as loss.gather_problem says)."""
    *_, scale_grad = _ddp_view(distributed_results, (setting, False, False))
    torch.testing.assert_close(scale_grad, _single(setting)[3], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("setting", PLAIN, ids=_name)
def test_local_loss_without_grad_gather_loses_gradient(distributed_results, setting):
    """local_loss=True, gather_with_grad=False: right loss value, wrong gradients (documented)."""
    loss, image_grad, _, _ = _ddp_view(distributed_results, (setting, True, False))
    full = _single(setting)
    torch.testing.assert_close(loss, full[0], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(image_grad, full[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("setting", RESEARCH, ids=_name)
def test_research_settings_differ_from_paired(setting):
    """The research-mode 2-rank checks above are not the paired loss under another name."""
    research, paired = _single(setting), _single(setting, mode="paired")
    assert not torch.allclose(research[0], paired[0])
    assert not torch.allclose(research[1], paired[1])

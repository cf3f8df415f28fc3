"""M2MLoss against open_clip's ClipLoss and against plain per-slot Python reference loops."""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from holiclip import M2MLoss
from holiclip.loss import diversity_penalty, gather_problem, pair_branches

from tests.helpers.tensors import unit

pytestmark = pytest.mark.usefixtures("single_thread")


# -- references (the research code's style: one slot at a time, one sample at a time) ------
def ref_clip(image: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
    """Symmetric InfoNCE between (B, D) image and (B, D) text."""
    logits = scale * image @ text.T
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ref_choice(image: torch.Tensor, text: torch.Tensor, m: int) -> list[int]:
    """Branch that trains slot m, per sample: by index when H <= M and m < H, else the argmax."""
    num_branches, num_slots = image.shape[1], text.shape[1]
    if num_branches <= num_slots and m < num_branches:
        return [m] * image.shape[0]
    choices = []
    for b in range(image.shape[0]):
        sims = [float(image[b, h].detach() @ text[b, m].detach()) for h in range(num_branches)]
        choices.append(max(range(num_branches), key=sims.__getitem__))
    return choices


def ref_cross_entropy(logits: torch.Tensor, label: int) -> torch.Tensor:
    return torch.logsumexp(logits, dim=0) - logits[label]


def ref_m2m(image: torch.Tensor, text: torch.Tensor, scale, mode: str = "paired") -> torch.Tensor:
    """One slot at a time, one query sample at a time."""
    batch, num_slots = image.shape[0], text.shape[1]
    total = 0.0
    for m in range(num_slots):
        h = ref_choice(image, text, m)
        image_to_text = sum(ref_cross_entropy(scale * text[:, m] @ image[b, h[b]], b) for b in range(batch))
        text_to_image = 0.0
        for j in range(batch):
            if mode == "paired":  # image k is its own chosen branch h[k]
                candidates = torch.stack([image[k, h[k]] for k in range(batch)])
            else:  # research: every image k on the branch chosen for the query's own image j
                candidates = image[:, h[j]]
            text_to_image = text_to_image + ref_cross_entropy(scale * candidates @ text[j, m], j)
        total = total + (image_to_text + text_to_image) / (2 * batch)
    return total / num_slots


def ref_o2m_fused(image: torch.Tensor, text: torch.Tensor, scale) -> torch.Tensor:
    fused = F.normalize(image.mean(dim=1), dim=-1)
    return sum(ref_clip(fused, text[:, m], scale) for m in range(text.shape[1])) / text.shape[1]


def ref_diversity(image: torch.Tensor, margin: float) -> torch.Tensor:
    num_branches = image.shape[1]
    sims = [
        F.cosine_similarity(image[:, h], image[:, g], dim=-1).mean()
        for h in range(num_branches) for g in range(num_branches) if h != g
    ]
    return torch.clamp(sum(sims) / len(sims) - margin, min=0)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(loss_fn, image, text, scale):
    image, text, scale = leaves(image, text, scale)
    loss = loss_fn(image, text, scale)
    loss.backward()
    return loss.detach(), image.grad, text.grad, scale.grad


# -- H = M = 1 is open_clip's ClipLoss -----------------------------------------------------
@pytest.mark.parametrize("seed,batch,scale", [(0, 8, 14.3), (1, 32, 50.0), (2, 17, 100.0), (3, 64, 1 / 0.07)])
def test_single_branch_equals_open_clip(seed, batch, scale):
    image = unit(batch, 64, seed=seed, dtype=torch.float32)
    text = unit(batch, 64, seed=seed + 100, dtype=torch.float32)
    scale = torch.tensor(scale)
    ours = grads_of(lambda i, t, s: M2MLoss()(i.unsqueeze(1), t.unsqueeze(1), s), image, text, scale)
    theirs = grads_of(open_clip.ClipLoss(), image, text, scale)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # 2-D inputs are accepted as H = M = 1
    torch.testing.assert_close(M2MLoss()(image, text, scale), theirs[0], rtol=1e-6, atol=1e-6)


# -- H = M (one InfoNCE per slot) and H != M (free matching) against the reference loop -----
@pytest.mark.parametrize("mode", ["paired", "research"])
@pytest.mark.parametrize(
    "batch,branches,slots,scale",
    [
        (16, 5, 5, 20.0), (9, 3, 3, 100.0), (32, 2, 2, 14.3),  # one-to-one
        (24, 2, 5, 25.0), (24, 1, 5, 25.0), (24, 3, 4, 60.0),  # H < M; H = 1 is O2M
        (24, 5, 3, 25.0), (16, 4, 1, 40.0), (20, 3, 2, 100.0),  # H > M: every slot free-matched
    ],
)
def test_m2m_equals_reference_loop(batch, branches, slots, scale, mode):
    image, text = unit(batch, branches, 32, seed=batch + slots), unit(batch, slots, 32, seed=batch + 1)
    scale = torch.tensor(scale, dtype=torch.float64)
    ours = grads_of(M2MLoss(free_matching=mode), image, text, scale)
    ref = grads_of(lambda i, t, s: ref_m2m(i, t, s, mode), image, text, scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("branches,slots", [(2, 5), (5, 3), (4, 1)])
def test_research_differs_from_paired_when_choices_differ(branches, slots):
    image, text = unit(24, branches, 16, seed=40), unit(24, slots, 16, seed=41)
    scale = torch.tensor(30.0, dtype=torch.float64)
    # some free-matched slot really has different choices across the batch
    assert any(len(set(ref_choice(image, text, m))) > 1 for m in range(slots))
    paired = grads_of(M2MLoss(free_matching="paired"), image, text, scale)
    research = grads_of(M2MLoss(free_matching="research"), image, text, scale)
    assert not torch.allclose(paired[0], research[0])
    assert not torch.allclose(paired[1], research[1])


@pytest.mark.parametrize("branches,slots", [(3, 3), (1, 4), (1, 1)])
def test_research_equals_paired_without_a_choice(branches, slots):
    """One-to-one (by index) and one branch: every query's branch is fixed, so the modes agree."""
    image, text = unit(16, branches, 16, seed=42), unit(16, slots, 16, seed=43)
    scale = torch.tensor(30.0, dtype=torch.float64)
    paired = grads_of(M2MLoss(free_matching="paired"), image, text, scale)
    research = grads_of(M2MLoss(free_matching="research"), image, text, scale)
    for a, b in zip(paired, research):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["Paired", "", "greedy", None])
def test_free_matching_is_validated(mode):
    with pytest.raises(ValueError, match="free_matching must be one of 'paired', 'research'"):
        M2MLoss(free_matching=mode)


def test_one_to_one_is_not_slot_agnostic():
    """Pairing is by index: swapping two text slots changes the loss (the test above can fail)."""
    image, text = unit(16, 3, 32, seed=5), unit(16, 3, 32, seed=6)
    text_swapped = text[:, [1, 0, 2]]
    scale = torch.tensor(30.0, dtype=torch.float64)
    assert not torch.allclose(M2MLoss()(image, text, scale), M2MLoss()(image, text_swapped, scale))


def test_free_matching_picks_per_sample_argmax():
    image, text = unit(6, 3, 8, seed=9), unit(6, 5, 8, seed=10)
    paired = pair_branches(image, text)
    assert paired.shape == (6, 5, 8)
    torch.testing.assert_close(paired[:, :3], image)
    for b in range(6):
        for m in range(3, 5):
            best = torch.argmax(image[b] @ text[b, m])
            torch.testing.assert_close(paired[b, m], image[b, best])
    # the choice is not constant: with random features different samples pick different branches
    best = torch.einsum("bhd,bmd->bmh", image, text[:, 3:]).argmax(-1)
    assert best.unique().numel() > 1


def test_o2m_uses_its_only_branch_for_every_slot():
    image, text = unit(12, 1, 16, seed=11), unit(12, 5, 16, seed=12)
    scale = torch.tensor(10.0, dtype=torch.float64)
    expected = sum(ref_clip(image[:, 0], text[:, m], scale) for m in range(5)) / 5
    torch.testing.assert_close(M2MLoss()(image, text, scale), expected)


@pytest.mark.parametrize("mode", ["paired", "research"])
def test_more_branches_than_slots_trains_every_branch(mode):
    """H > M: slots are free-matched over all H branches, so no branch is left without gradient."""
    image, text = leaves(unit(16, 5, 16, seed=13), unit(16, 3, 16, seed=14))
    scale = torch.tensor(10.0, dtype=torch.float64)
    M2MLoss(free_matching=mode)(image, text, scale).backward()
    per_branch = image.grad.abs().amax(dim=(0, 2))
    assert (per_branch > 0).all(), per_branch
    # paired: exactly the chosen (sample, branch) pairs get a gradient; research: also every
    # image's branch that some query text chose (it is a text-to-image candidate there)
    chosen = torch.zeros(16, 5, dtype=torch.bool)
    for m in range(3):
        for b, h in enumerate(ref_choice(image, text, m)):
            chosen[b, h] = True
    expected = chosen if mode == "paired" else chosen | chosen.any(dim=0, keepdim=True)
    torch.testing.assert_close(image.grad.abs().amax(dim=-1) > 0, expected)
    assert mode == "research" or not chosen.all()  # the paired check is not vacuous


# -- hybrid objective (ours) -------------------------------------------------------------------
@pytest.mark.parametrize("weight", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("branches,slots", [(5, 5), (2, 5)])
def test_fused_weight_mixes_m2m_and_fused_o2m(weight, branches, slots):
    image, text = unit(20, branches, 16, seed=15), unit(20, slots, 16, seed=16)
    scale = torch.tensor(40.0, dtype=torch.float64)

    def ref(i, t, s):
        return (1 - weight) * ref_m2m(i, t, s) + weight * ref_o2m_fused(i, t, s)

    ours = grads_of(M2MLoss(fused_weight=weight), image, text, scale)
    for a, b in zip(ours, grads_of(ref, image, text, scale)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    terms = M2MLoss(fused_weight=weight)(image, text, scale, output_dict=True)
    torch.testing.assert_close(terms["contrastive_loss"], (1 - weight) * ref_m2m(image, text, scale))
    torch.testing.assert_close(terms["fused_loss"], weight * ref_o2m_fused(image, text, scale))


def test_fused_weight_zero_is_the_papers_loss():
    image, text = unit(20, 5, 16, seed=17), unit(20, 5, 16, seed=18)
    scale = torch.tensor(40.0, dtype=torch.float64)
    torch.testing.assert_close(M2MLoss(fused_weight=0.0)(image, text, scale), ref_m2m(image, text, scale))
    # and the fused term really is a different quantity
    assert not torch.allclose(ref_m2m(image, text, scale), ref_o2m_fused(image, text, scale))


def test_fused_weight_one_is_fused_o2m_only():
    image, text = unit(20, 3, 16, seed=19), unit(20, 3, 16, seed=20)
    scale = torch.tensor(40.0, dtype=torch.float64)
    terms = M2MLoss(fused_weight=1.0)(image, text, scale, output_dict=True)
    torch.testing.assert_close(sum(terms.values()), ref_o2m_fused(image, text, scale))


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_fused_weight_out_of_range(weight):
    with pytest.raises(ValueError, match="fused_weight"):
        M2MLoss(fused_weight=weight)


@pytest.mark.parametrize(
    "kwargs,keys",
    [
        ({}, {"contrastive_loss"}),
        ({"fused_weight": 0.3}, {"contrastive_loss", "fused_loss"}),
        ({"diversity_margin": 0.7}, {"contrastive_loss", "diversity_loss"}),
        ({"fused_weight": 0.3, "diversity_margin": 0.7}, {"contrastive_loss", "fused_loss", "diversity_loss"}),
        ({"fused_weight": 1.0}, {"contrastive_loss", "fused_loss"}),
    ],
)
def test_output_dict_keys_and_total(kwargs, keys):
    image, text = unit(8, 3, 16, seed=21), unit(8, 3, 16, seed=22)
    scale = torch.tensor(20.0, dtype=torch.float64)
    loss = M2MLoss(**kwargs)
    terms = loss(image, text, scale, output_dict=True)
    assert set(terms) == keys
    torch.testing.assert_close(sum(terms.values()), loss(image, text, scale))


# -- diversity regulariser (research code) -----------------------------------------------------
def test_diversity_zero_for_orthogonal_branches():
    basis = torch.eye(8, dtype=torch.float64)[:4]  # 4 orthonormal branch directions
    image = basis.unsqueeze(0).repeat(6, 1, 1)
    assert diversity_penalty(image, 0.0) == 0
    terms = M2MLoss(diversity_margin=0.0)(image, unit(6, 4, 8, seed=23), torch.tensor(10.0), output_dict=True)
    assert terms["diversity_loss"] == 0


def test_diversity_positive_for_collapsed_branches():
    shared = unit(10, 1, 16, seed=24)
    image = F.normalize(shared + 0.1 * unit(10, 4, 16, seed=25), dim=-1)  # nearly collapsed branches
    for margin in (0.0, 0.5, 0.7):
        expected = ref_diversity(image, margin)
        assert expected > 0
        torch.testing.assert_close(diversity_penalty(image, margin), expected)
        terms = M2MLoss(diversity_margin=margin, diversity_weight=0.5)(
            image, unit(10, 4, 16, seed=26), torch.tensor(10.0), output_dict=True
        )
        torch.testing.assert_close(terms["diversity_loss"], 0.5 * expected)
    # fully collapsed: mean cosine is 1
    collapsed = shared.expand(-1, 3, -1)
    torch.testing.assert_close(diversity_penalty(collapsed, 0.7), torch.tensor(0.3, dtype=torch.float64))
    # the margin is a hinge
    assert diversity_penalty(image, 1.0) == 0


def test_diversity_is_zero_for_one_branch_and_keeps_graph():
    image = leaves(unit(4, 1, 8, seed=27))[0]
    penalty = diversity_penalty(image, 0.0)
    assert penalty == 0
    penalty.backward()  # part of the graph, no error


def test_diversity_gradient_matches_reference():
    """Through the L2 normalisation the model applies (the penalty takes unit vectors)."""
    raw = unit(10, 1, 16, seed=28) + 0.2 * unit(10, 3, 16, seed=29)
    a, b = leaves(raw, raw)
    diversity_penalty(F.normalize(a, dim=-1), 0.2).backward()
    ref_diversity(b, 0.2).backward()
    assert a.grad.abs().max() > 0
    torch.testing.assert_close(a.grad, b.grad)


# -- errors ---------------------------------------------------------------------------------------
def test_batch_mismatch_raises():
    with pytest.raises(ValueError, match="batch sizes differ"):
        M2MLoss()(unit(4, 2, 8), unit(5, 2, 8), torch.tensor(10.0))


def test_scale_is_applied():
    image, text = unit(16, 2, 8, seed=30), unit(16, 2, 8, seed=31)
    low = M2MLoss()(image, text, torch.tensor(1.0, dtype=torch.float64))
    # with scale 1 on unit vectors the loss stays near log(B)
    assert abs(low.item() - math.log(16)) < 0.5
    assert not torch.allclose(low, M2MLoss()(image, text, torch.tensor(50.0, dtype=torch.float64)))


def test_embedding_size_mismatch_is_named():
    with pytest.raises(ValueError, match="embedding sizes differ"):
        M2MLoss()(unit(4, 2, 8), unit(4, 2, 16), 10.0)


def test_gather_problem_names_what_goes_wrong_on_several_ranks():
    assert all(gather_problem(local, with_grad, 1) is None for local in (True, False) for with_grad in (True, False))
    assert gather_problem(True, True, 8) is None and gather_problem(False, True, 8) is None
    severity, reason = gather_problem(True, False, 8)
    assert severity == "error" and "wrong gradient" in reason and "loss.gather_with_grad=true" in reason
    severity, reason = gather_problem(False, False, 8)
    assert severity == "warning" and "1/8 of the full-batch gradient while the logit scale gets all of it" in reason

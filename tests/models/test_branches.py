"""Psi_CLS and Psi_MLP image encoders: class-token masking, per-branch MLP streams, parameter
counts, token read-outs, initialisation."""
from __future__ import annotations

import pytest
import torch

import holiclip
from holiclip.models.branches import ENCODERS, BranchLinear, MultiBranchViT

from tests.helpers.models import FIVE, SMALL_CONFIGS, forked_layers, images_for, n_params, open_clip_model

pytestmark = pytest.mark.usefixtures("single_thread")


# -- Psi_CLS masking ------------------------------------------------------------------------------
def _perturbed_outputs(model: holiclip.HolisticCLIP, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = images_for(model)
    with torch.no_grad():
        before = model.encode_image(images, normalize=False)
        model.visual.class_embedding[j] += torch.randn_like(model.visual.class_embedding[j])
        after = model.encode_image(images, normalize=False)
    return before, after


@pytest.mark.parametrize("j", [0, 2])
def test_cls_class_tokens_do_not_see_each_other(one_layer_config, j):
    model = holiclip.create_model(one_layer_config, "cls", ["a", "b", "c"]).eval()
    before, after = _perturbed_outputs(model, j)
    for i in range(3):
        if i == j:
            assert not torch.allclose(after[:, i], before[:, i], atol=1e-4)
        else:
            torch.testing.assert_close(after[:, i], before[:, i], atol=1e-6, rtol=0)


def test_cls_mask_values(one_layer_config):
    visual = holiclip.create_model(one_layer_config, "cls", ["a", "b", "c"]).visual
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
def test_cls_without_proper_mask_branches_interact(monkeypatch, one_layer_config, broken_mask):
    """Makes the masking test meaningful: with no mask, or the research code's 0/1 float mask
    added to the scores, perturbing class token 0 changes the other branches."""
    model = holiclip.create_model(one_layer_config, "cls", ["a", "b", "c"]).eval()

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


# -- read-outs ---------------------------------------------------------------------------------------
def test_attention_maps_match_manual_softmax(one_layer_config):
    """Last-block class-to-patch attention recomputed by hand (one layer, H = 2, cls)."""
    model = holiclip.create_model(one_layer_config, "cls", ["a", "b"]).eval()
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


# -- initialisation -----------------------------------------------------------------------------------
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

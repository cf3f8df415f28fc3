"""encode_image_tokens: the class and patch token states a multimodal LLM reads (LLaVA's read-out)."""
from __future__ import annotations

import pytest
import torch

import holiclip
from holiclip.models.branches import ENCODERS

from tests.helpers.models import images_for

pytestmark = pytest.mark.usefixtures("single_thread")

BRANCHES = ("a", "b", "c")


@pytest.fixture(scope="module", params=ENCODERS)
def model(request):
    torch.manual_seed(0)
    return holiclip.create_model("holi-small", request.param, BRANCHES).eval()  # 4 blocks; Psi_MLP forks at block 2


def _sizes(model):
    visual = model.visual
    return len(visual.transformer.resblocks), visual.grid_size[0] * visual.grid_size[1], visual.class_embedding.shape[-1]


def _block_states(model, images):
    """forward_intermediates' state after every block, as (H', B, T, W) (H' = 1 for a shared stream)."""
    states = model.visual.forward_intermediates(images, intermediates_only=True)["image_intermediates"]
    return [s if s.dim() == 4 else s.unsqueeze(0) for s in states]


def test_shapes(model):
    blocks, patches, width = _sizes(model)
    images = images_for(model, batch=2)
    with torch.no_grad():
        for layer in range(-(blocks + 1), blocks + 1):
            for h, name in enumerate(BRANCHES):
                assert model.encode_image_tokens(images, name, layer).shape == (2, 1 + patches, width)
                assert model.encode_image_tokens(images, h, layer, all_class_tokens=True).shape == (
                    2, 3 + patches, width)
        shared = range(model.visual.fork_at + 1)  # every layer for Psi_CLS, up to the fork for Psi_MLP
        for layer in shared:
            assert model.encode_image_tokens(images, None, layer).shape == (2, 3 + patches, width)
    assert len(shared) == (blocks + 1 if model.encoder == "cls" else 3)


def test_equals_forward_intermediates(model):
    """Layer k >= 1 is forward_intermediates' block k - 1; the tokens are the branch's class token(s)
    then its patches; layer 0 is the embeddings."""
    visual = model.visual
    blocks, _, _ = _sizes(model)
    prefix = visual.num_prefix_tokens
    images = images_for(model, batch=2)
    with torch.no_grad():
        states = _block_states(model, images)
        for k in range(1, blocks + 1):
            state = states[k - 1]
            own_stream = lambda h: state[h if state.shape[0] > 1 else 0]  # noqa: E731
            for h, name in enumerate(BRANCHES):
                got = model.encode_image_tokens(images, name, k)
                stream = own_stream(h)
                cls = stream[:, h: h + 1] if model.encoder == "cls" else stream[:, :1]
                torch.testing.assert_close(got, torch.cat([cls, stream[:, prefix:]], 1), atol=0, rtol=0)
                every = model.encode_image_tokens(images, name, k, all_class_tokens=True)
                classes = torch.stack([own_stream(j)[:, j if model.encoder == "cls" else 0] for j in range(3)], 1)
                torch.testing.assert_close(every, torch.cat([classes, stream[:, prefix:]], 1), atol=0, rtol=0)
            if model.encoder == "cls":  # the whole state as forward_intermediates gives it
                torch.testing.assert_close(model.encode_image_tokens(images, None, k), state[0], atol=0, rtol=0)
        embeddings = visual.embed(images)
        torch.testing.assert_close(model.encode_image_tokens(images, "b", 0)[:, 1:], embeddings[:, prefix:],
                                   atol=0, rtol=0)
        # the last layer's class tokens through the shared head are the branch embeddings
        last = model.encode_image_tokens(images, "c", -1, all_class_tokens=True)[:, :3]
        torch.testing.assert_close(visual.head(last), model.encode_image(images), atol=1e-6, rtol=1e-5)


def test_mlp_streams_differ_after_the_fork_only(model):
    blocks, _, _ = _sizes(model)
    images = images_for(model, batch=2)
    fork = model.visual.fork_at
    with torch.no_grad():
        for k in range(blocks + 1):
            a, b = (model.encode_image_tokens(images, name, k) for name in ("a", "b"))
            patches_equal = torch.equal(a[:, 1:], b[:, 1:])
            if model.encoder == "mlp":
                assert patches_equal == (k <= fork), k  # layer fork + 1 is the first forked block's output
                assert torch.equal(a[:, 0], b[:, 0]) == (k <= fork), k
            else:
                assert patches_equal, k  # Psi_CLS shares the patches; the class tokens are the branches' own
                assert not torch.equal(a[:, 0], b[:, 0]), k
            if model.encoder == "mlp" and k <= fork:  # one shared class token, repeated per branch
                every = model.encode_image_tokens(images, None, k)
                assert all(torch.equal(every[:, j], a[:, 0]) for j in range(3))


def test_layer_indexing(model):
    blocks, _, _ = _sizes(model)
    images = images_for(model, batch=2)
    with torch.no_grad():
        for k in range(blocks + 1):
            positive = model.encode_image_tokens(images, "a", k)
            negative = model.encode_image_tokens(images, "a", k - (blocks + 1))
            torch.testing.assert_close(positive, negative, atol=0, rtol=0)
        default = model.encode_image_tokens(images, "a")
        torch.testing.assert_close(default, model.encode_image_tokens(images, "a", blocks - 1), atol=0, rtol=0)
        several = model.encode_image_tokens(images, "a", [-1, 0, 2])  # one pass, in the order asked
        assert isinstance(several, list) and len(several) == 3
        for got, k in zip(several, [-1, 0, 2]):
            torch.testing.assert_close(got, model.encode_image_tokens(images, "a", k), atol=0, rtol=0)
        assert not torch.equal(several[0], several[2])


def test_bad_branch_or_layer(model):
    blocks, _, _ = _sizes(model)
    images = images_for(model, batch=1)
    with pytest.raises(ValueError, match=r"unknown branch 'nope'; the model's branches are \['a', 'b', 'c'\]"):
        model.encode_image_tokens(images, "nope")
    with pytest.raises(ValueError, match="branch index 3 out of range"):
        model.encode_image_tokens(images, 3)
    for layer in (blocks + 1, -(blocks + 2), "2", True, [0, 9]):
        with pytest.raises(ValueError, match=rf"not a layer of the image tower: it has {blocks} blocks, so layers "
                                             rf"-{blocks + 1}\.\.{blocks}"):
            model.encode_image_tokens(images, "a", layer)
    with pytest.raises(ValueError, match="no layer requested"):
        model.encode_image_tokens(images, "a", [])
    if model.encoder == "mlp":  # no shared stream after the fork
        with pytest.raises(ValueError, match=r"from layer 3 on .* so layer -2 needs a named branch"):
            model.encode_image_tokens(images)
    else:
        assert model.encode_image_tokens(images).shape[1] == 3 + model.visual.grid_size[0] ** 2

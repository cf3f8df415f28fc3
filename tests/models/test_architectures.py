"""Every architecture of ``list_models()`` (timm style): its shapes for both encoders, built on the
meta device (no memory, no compute), and, for those small enough for a CPU test, the same model
through every entry point after a save."""
from __future__ import annotations

import pytest
import torch

import holiclip
from holiclip.models.branches import ENCODERS

from tests.helpers.models import FIVE, images_for

ALL = holiclip.list_models()


def fits_a_cpu_test(name: str) -> bool:
    """Real weights and forward passes for these (the ViT-B ones would take minutes here)."""
    vision = holiclip.get_model_config(name)["vision_cfg"]
    return vision["image_size"] <= 64 and vision["width"] <= 256


SMALL = [name for name in ALL if fits_a_cpu_test(name)]


def test_the_lists_are_what_the_tests_run_on():
    assert {"holi-tiny", "holi-small", "holi-small-minilm", "ViT-B-16", "ViT-B-32"} <= set(ALL)
    assert {"holi-tiny", "holi-small", "holi-small-minilm"} <= set(SMALL) and "ViT-B-16" not in SMALL


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", ALL)
def test_every_architecture_has_its_shapes(name, encoder):
    cfg = holiclip.get_model_config(name)
    size, dim = cfg["vision_cfg"]["image_size"], cfg["embed_dim"]
    grid = size // cfg["vision_cfg"]["patch_size"]
    with torch.device("meta"):
        model = holiclip.create_model(name, encoder=encoder, branches=FIVE, pretrained_text=False, device="meta")
        images = torch.empty(2, 3, size, size)
        assert model.encode_image(images).shape == (2, len(FIVE), dim)
        assert model.encode_dense(images).shape == (2, len(FIVE), grid, grid, dim)
        tokens = holiclip.get_tokenizer(name)(["a cat", "a dog on a sofa"])
        assert tokens.shape == (2, cfg["text_cfg"].get("context_length", 77))
        if model._is_hf_text():  # its attention mask reads token values, which meta tensors have not
            assert model.clip.text.proj.out_features == dim
        else:
            assert model.encode_text(tokens.to("meta")).shape == (2, dim)
    assert model.branch_names == FIVE and model.encoder == encoder and model.image_size == (size, size)
    assert holiclip.get_transforms(name).transforms[0].size in (size, (size, size))


@pytest.mark.parametrize("name", SMALL)
def test_every_entry_point_gives_the_saved_model(name, tmp_path, single_thread):
    torch.manual_seed(0)
    model = holiclip.create_model(name, encoder="mlp", branches=("web", "main"), pretrained_text=False).eval()
    folder = holiclip.save_model(model, tmp_path / "saved")
    images, texts = images_for(model, batch=2), ["a red square", "a blue circle"]
    with torch.no_grad():
        want_image = model.encode_image(images)
        want_text = model.encode_text(holiclip.get_tokenizer(name)(texts))
    for src in (folder, folder / "model.safetensors"):
        for loaded in (holiclip.load_model(src),
                       holiclip.create_model_and_transforms(str(src), fusion=None)[0],
                       holiclip.create_model_and_transforms(name, pretrained=str(src), fusion=None)[0]):
            assert (loaded.model_name, loaded.encoder, loaded.branch_names) == (name, "mlp", ("web", "main"))
            tokens = holiclip.get_tokenizer(str(src))(texts)
            torch.testing.assert_close(tokens, holiclip.get_tokenizer(name)(texts), rtol=0, atol=0)
            with torch.no_grad():
                torch.testing.assert_close(loaded.eval().encode_image(images), want_image, rtol=0, atol=0)
                torch.testing.assert_close(loaded.encode_text(tokens), want_text, rtol=0, atol=0)
    assert holiclip.get_model_config(str(folder)) == holiclip.get_model_config(name)

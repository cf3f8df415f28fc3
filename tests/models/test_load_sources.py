"""load_model from anywhere a model is: a run folder (final model, else its latest checkpoint), a
model folder, a lone .safetensors file, a training checkpoint; clear errors for anything else."""
from __future__ import annotations

import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import holiclip
from holiclip.models.sources import ModelSourceError
from holiclip.training.trainer import train

from tests.helpers.cli import invoke, one_line_error
from tests.helpers.datasets import make_dataset
from tests.helpers.hub import hub_cache, publish  # noqa: F401 (a fixture)
from tests.helpers.training import cfg_for


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A holi-tiny run trained for 6 steps (checkpoints at steps 3 and 6, then model/)."""
    tmp = tmp_path_factory.mktemp("run")
    train(cfg_for(tmp, make_dataset(tmp, n=8), tmp / "run"))
    return tmp / "run"


def same_weights(model, state):
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        torch.testing.assert_close(own[k], v, msg=k)


def test_run_folder_loads_its_final_model(run):
    model = holiclip.load_model(run)
    assert model.branch_names == ("web", "detail", "main")
    same_weights(model, load_file(str(run / "model" / "model.safetensors")))
    assert model.holiclip_meta["train_config"]["optim"]["steps"] == 6


def test_run_folder_without_final_model_loads_latest_checkpoint(run, tmp_path, caplog):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("model"))
    checkpoint = copy / "checkpoints" / "step_00000006.pt"
    with caplog.at_level(logging.WARNING):
        model = holiclip.load_model(copy)
    assert f"{copy} has no final model (model/); loading its latest checkpoint {checkpoint}" in caplog.text
    same_weights(model, torch.load(checkpoint, map_location="cpu", weights_only=True)["model"])
    assert model.branch_names == ("web", "detail", "main")
    # the last checkpoint is the final model's state
    same_weights(model, load_file(str(run / "model" / "model.safetensors")))
    # an explicit checkpoint file loads too
    step3 = holiclip.load_model(copy / "checkpoints" / "step_00000003.pt")
    same_weights(step3, torch.load(copy / "checkpoints" / "step_00000003.pt", weights_only=True)["model"])


def test_lone_safetensors_carries_its_config(run, tmp_path):
    lone = tmp_path / "elsewhere.safetensors"
    shutil.copy(run / "model" / "model.safetensors", lone)
    with safe_open(str(lone), framework="pt") as f:
        assert "holiclip_config" in f.metadata()
    model = holiclip.load_model(lone)
    assert model.branch_names == ("web", "detail", "main")
    same_weights(model, load_file(str(lone)))


def test_safetensors_without_metadata_reads_the_config_beside_it(run, tmp_path):
    shutil.copytree(run / "model", tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # as written before the config was embedded
    assert holiclip.load_model(weights).branch_names == ("web", "detail", "main")
    (tmp_path / "m" / "holiclip_config.json").unlink()
    with pytest.raises(ModelSourceError, match=rf"{weights}: no holiclip config in its metadata .* no "
                                               r"holiclip_config.json beside it"):
        holiclip.load_model(weights)


@pytest.mark.parametrize("case", ["missing", "empty folder", "text file", "damaged checkpoint", "bad config"])
def test_bad_sources_name_the_path(tmp_path, case):
    if case == "missing":
        path, match = tmp_path / "nope", "no such folder or file; expected a model folder"
    elif case == "empty folder":
        path, match = tmp_path, "a folder with neither holiclip_config.json"
    elif case == "text file":
        path, match = tmp_path / "notes.txt", "neither .safetensors nor a step_\\*.pt checkpoint"
        path.write_text("hello")
    elif case == "damaged checkpoint":
        path, match = tmp_path / "step_00000001.pt", "is not a torch file of tensors .* damaged"
        path.write_bytes(b"\x80\x02garbage")
    else:
        path, match = tmp_path, "not a holiclip config \\(missing encoder, branches\\)"
        (tmp_path / "holiclip_config.json").write_text('{"model": "holi-tiny"}')
        (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSourceError, match=match) as err:
        holiclip.load_model(path)
    assert str(path) in str(err.value)


# -- one resolver: every README source through every entry point ---------------------------------------
SOURCES = ("run folder", "model folder", ".safetensors", "checkpoint", "hf-hub")


def source_of(kind, run, hub_cache):
    if kind == "run folder":
        return str(run)
    if kind == "model folder":
        return str(run / "model")
    if kind == ".safetensors":
        return str(run / "model" / "model.safetensors")
    if kind == "checkpoint":
        return str(run / "checkpoints" / "step_00000006.pt")  # the last step: the final model's weights
    publish(hub_cache, "someone/holi", run / "model")
    return "hf-hub:someone/holi"


@pytest.mark.parametrize("kind", SOURCES)
def test_every_source_loads_through_every_entry_point(run, hub_cache, kind):
    src = source_of(kind, run, hub_cache)
    final = load_file(str(run / "model" / "model.safetensors"))
    texts = ["a red square", "a blue circle"]
    models = [holiclip.load_model(src),
              holiclip.create_model_and_transforms(src, fusion=None)[0],
              holiclip.create_model_and_transforms("holi-tiny", pretrained=src, fusion=None)[0],
              holiclip.create_model_and_transforms(src)[0].holistic]
    for model in models:
        assert model.branch_names == ("web", "detail", "main")
        same_weights(model, final)
    tokens = holiclip.get_tokenizer(src)(texts)
    assert torch.equal(tokens, holiclip.get_tokenizer("holi-tiny")(texts))
    assert holiclip.get_model_config(src) == holiclip.get_model_config("holi-tiny")
    assert holiclip.get_transforms(src).transforms[0].size == holiclip.get_transforms("holi-tiny").transforms[0].size


def test_the_model_card_snippet_runs(run, tmp_path, monkeypatch):
    """The `## Use` block of the card save_pretrained writes, run as written but for the folder's path."""
    import re

    from huggingface_hub import ModelCard

    folder = holiclip.save_pretrained(holiclip.load_model(run), tmp_path / "export")
    card = ModelCard.load(folder / "README.md").text
    code = re.search(r"## Use\s+```python\n(.*?)```", card, re.S).group(1)
    assert 'holiclip.get_tokenizer("path/to/this/folder")' in code
    namespace: dict = {}
    exec(code.replace("path/to/this/folder", str(folder)), namespace)  # noqa: S102 (our own card)
    model, tokenizer, preprocess = namespace["model"], namespace["tokenizer"], namespace["preprocess"]
    from PIL import Image

    with torch.no_grad():
        image = model.encode_image(preprocess(Image.new("RGB", (40, 30), "red")).unsqueeze(0))
        text = model.encode_text(tokenizer(["a red square"]))
    assert image.shape == text.shape == (1, holiclip.get_model_config("holi-tiny")["embed_dim"])


@pytest.mark.parametrize("name, error, message", [
    ("nope/dir", ModelSourceError, "nope/dir: no such folder or file; expected a model folder"),
    ("./holi-tiny.safetensors", ModelSourceError, "holi-tiny.safetensors: no such folder or file"),
    ("holi-tinny", KeyError, "unknown model 'holi-tinny'; holiclip models: .*'holi-tiny'"),
])
def test_a_typo_is_named_as_a_path_or_an_architecture(name, error, message):
    for entry in (holiclip.create_model_and_transforms, holiclip.get_tokenizer, holiclip.create_model,
                  holiclip.load_model):
        if entry is holiclip.load_model and error is KeyError:
            continue  # load_model takes saved models only: any name is a path to it
        with pytest.raises(error, match=message):
            entry(name)


def test_a_typo_on_the_command_line_is_one_line(tmp_path):
    line = one_line_error(invoke("eval", "retrieval", "--model", "nope/dir", "--data", tmp_path / "x.jsonl"))
    assert "nope/dir: no such folder or file" in line


def test_a_saved_model_is_not_built_as_an_architecture(run):
    with pytest.raises(ModelSourceError, match=r"a saved model, which load_model\(.*\) .* load with its weights"):
        holiclip.create_model(str(run / "model"))


# -- damaged or foreign weights: one line naming the file -------------------------------------------
@pytest.mark.parametrize("change", ["removed", "added"])
def test_safetensors_with_other_keys_names_them(run, tmp_path, change):
    shutil.copytree(run / "model", tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    if change == "removed":
        del state["clip.visual.proj"]
        match = r"keys 1 missing \(clip.visual.proj\)"
    else:
        state["clip.extra.weight"] = torch.zeros(2)
        match = r"keys 1 unexpected \(clip.extra.weight\)"
    save_file(state, str(weights), metadata=metadata)
    for src in (tmp_path / "m", weights):
        with pytest.raises(ModelSourceError, match=rf"{src}: its weights do not fit a holi-tiny cls model .*{match}"):
            holiclip.load_model(src)
    line = one_line_error(invoke("eval", "retrieval", "-c", tmp_path / "m", "--data", tmp_path / "x.jsonl"))
    assert f"{tmp_path / 'm'}: its weights do not fit" in line and "save the model again" in line


class Payload:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickle_payload_is_refused_without_suggesting_unsafe_loading(run, tmp_path):
    marker = tmp_path / "code-ran"
    state = torch.load(run / "checkpoints" / "step_00000006.pt", weights_only=True)
    state["payload"] = Payload(marker)
    evil = tmp_path / "checkpoints" / "step_00000009.pt"
    evil.parent.mkdir()
    torch.save(state, evil)
    weights = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, weights)
    errors = []
    for call in (lambda: holiclip.load_model(evil), lambda: holiclip.load_state_dict(weights),
                 lambda: holiclip.create_model("holi-tiny", pretrained=str(weights))):
        with pytest.raises(ModelSourceError) as err:
            call()
        errors.append(str(err.value))
    line = one_line_error(invoke("eval", "retrieval", "-c", evil, "--data", tmp_path / "x.jsonl"))
    line_train = one_line_error(invoke("train", f"run.out={tmp_path / 'r'}", "--resume", evil))
    for message in (*errors, line, line_train):
        assert "holds Python objects (posix.mkdir) that a weights-only load refuses" in message, message
        assert "weights_only=False" not in message and "truncated or corrupt" not in message
    assert not marker.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_model_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = holiclip.save_model(holiclip.create_model("holi-tiny"), tmp_path / "m")
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(plain.stat().st_mode)
    assert mode == 0o666 & ~umask
    for name in ("model.safetensors", "holiclip_config.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == mode, name

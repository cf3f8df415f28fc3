"""load_model from anywhere a model is: a run folder (final model, else its latest checkpoint), a
model folder, a lone .safetensors file, a training checkpoint; clear errors for anything else."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import holiclip
from holiclip.models.sources import ModelSourceError
from holiclip.training.trainer import train

from tests.helpers.datasets import make_dataset
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

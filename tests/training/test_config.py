"""Training config schema: overrides and YAML files are checked against the dataclasses (types,
ranges, choices), errors name the source, the key and the allowed values, a single name for a
list field is a one-element list, a run's saved config.yaml loads back unchanged, and the
shipped configs load."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.models.registry import load_model
from holiclip.training.config import load_config, save_config

from tests.helpers.datasets import make_dataset


def test_one_name_for_a_list_field_is_a_one_element_list():
    cfg = load_config(None, ["model.branches=main", "data.slots=web"])
    assert cfg.model.branches == ["main"] and cfg.data.slots == ["web"] and cfg.branches == ["main"]
    cfg = load_config(None, ["data.slots=[web, detail]"])
    assert cfg.data.slots == ["web", "detail"] and cfg.branches == ["web", "detail"]


BAD = [  # override, the key, words of the allowed values that the message must give
    ("optim.betas=0.9", "optim.betas", "2 numbers"),
    ("optim.betas=[0.9,0.98,0.999]", "optim.betas", "2 numbers"),
    ("optim.betas=[0.9,1.5]", "optim.betas", "[0, 1)"),
    ("run.save_every=0", "run.save_every", ">= 1"),
    ("run.log_every=0", "run.log_every", ">= 1"),
    ("optim.steps=0", "optim.steps", ">= 1"),
    ("optim.batch_size=-8", "optim.batch_size", ">= 1"),
    ("optim.accum_steps=0", "optim.accum_steps", ">= 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps", ">= 0"),
    ("data.workers=-1", "data.workers", ">= 0"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints", ">= 0"),
    ("model.mlp_layers=0", "model.mlp_layers", ">= 1"),
    ("model.encoder=vit", "model.encoder", "cls|mlp"),
    ("data.missing_slot_policy=fill", "data.missing_slot_policy", "error|drop|fill:<slot>"),
    ("data.missing_slot_policy=fill:", "data.missing_slot_policy", "error|drop|fill:<slot>"),
    ("data.on_bad_row=skp", "data.on_bad_row", "error|skip"),
    ("data.text_cache=on", "data.text_cache", "auto|off"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction", "[0, 1]"),
    ("run.precision=fp16", "run.precision", "auto|fp32|bf16|amp"),
    ("run.device=gpu", "run.device", "auto|cpu|cuda|cuda:N"),
    ("loss.free_matching=exact", "loss.free_matching", "paired|research"),
    ("loss.fused_weight=1.5", "loss.fused_weight", "[0, 1]"),
    ("loss.fused_weight=-0.1", "loss.fused_weight", "[0, 1]"),
    ("optim.lr=fast", "optim.lr", "a number"),
    ("optim.lr=nan", "optim.lr", "> 0"),
    ("optim.steps=2.5", "optim.steps", "an integer"),
    ("run.tensorboard=maybe", "run.tensorboard", "true or false"),
    ("run.progress=2", "run.progress", "true or false"),
    ("data.slots=[web,web]", "data.slots", "distinct"),
    ("data.slots=[web, [detail]]", "data.slots", "a list of names"),
    ("data.train=[", "data.train", "quote it"),
]


@pytest.mark.parametrize("override, key, allowed", BAD, ids=[b[0] for b in BAD])
def test_bad_value_names_override_key_and_allowed_values(override, key, allowed):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert f"override {override!r}" in message and key in message and allowed in message, message


def test_values_that_must_still_parse():
    cfg = load_config(None, [
        "run.device=cuda:1", "data.missing_slot_policy=fill:web", "optim.steps=1e5", "optim.grad_clip=null",
        "run.out=1e3", "optim.lr=1e-6", "optim.betas=[0.9, 0.95]", "run.keep_checkpoints=0",
    ])
    assert (cfg.run.device, cfg.data.missing_slot_policy, cfg.optim.steps, cfg.optim.grad_clip) == (
        "cuda:1", "fill:web", 100000, None)
    assert cfg.run.out == "1e3"  # a folder name, not the number YAML reads (1000.0)
    assert cfg.optim.lr == 1e-6 and list(cfg.optim.betas) == [0.9, 0.95] and cfg.run.keep_checkpoints == 0


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(KeyError) as err:
        load_config(None, ["optim.stepz=3"])
    message = str(err.value)
    assert message.startswith("override 'optim.stepz=3': unknown config key 'optim.stepz'")
    assert "did you mean 'optim.steps'" in message and "optim.batch_size" in message and "optim.warmup_steps" in message
    with pytest.raises(KeyError, match="unknown config section 'optimz'.*valid: model, data, loss, optim, run"):
        load_config(None, ["optimz.steps=3"])


def test_yaml_errors_name_file_line_and_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  name: holi-tiny\ndata:\n  slots: web\n  on_bad_row: skp\n")
    with pytest.raises(ValueError, match=rf"^{path}:5: data.on_bad_row must be one of error\|skip, got 'skp'"):
        load_config(path)
    path.write_text("model:\n  name: holi-tiny\n  encodr: mlp\n")
    with pytest.raises(KeyError, match=rf"^{path}:3: unknown config key 'model.encodr' \(did you mean 'model.encoder'"):
        load_config(path)
    path.write_text("optim:\n  betas: 0.9\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: optim.betas must be a list of 2 numbers"):
        load_config(path)
    path.write_text("optim:\n  lr: 1e-3\n  lr: 1e-4\n")  # plain YAML would keep the last one silently
    with pytest.raises(ValueError, match=rf"^{path}:3: invalid YAML: found duplicate key lr"):
        load_config(path)
    path.write_text("optim:\n  lr: [1e-3\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: invalid YAML"):
        load_config(path)


def test_yaml_numbers_sections_and_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("demo:\n  label: ignored by training\noptim:\n  eps: 1e-6\n  lr: 5e-4\n  steps: 0\n"
                    "data:\n  slots: web\n")
    with pytest.raises(ValueError, match=rf"^{path}:6: optim.steps must be >= 1"):
        load_config(path)
    cfg = load_config(path, ["optim.steps=5"])  # an override fixes the file's value
    assert cfg.optim.eps == 1e-6 and isinstance(cfg.optim.eps, float) and cfg.optim.lr == 5e-4
    assert cfg.optim.steps == 5 and cfg.data.slots == ["web"]
    with pytest.raises(KeyError, match="unknown config section 'demo'"):
        load_config(None, ["demo.label=x"])  # only a file may carry the demo's notes
    with pytest.raises(ValueError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_branches_main_trains_one_branch_and_saved_config_loads_back(tmp_path):
    data = make_dataset(tmp_path, n=8)
    run = tmp_path / "run"
    overrides = [
        f"data.train={data}", "model.name=holi-tiny", "data.slots=[web,detail,main]", "model.branches=main",
        "optim.batch_size=4", "optim.steps=2", "optim.warmup_steps=1", "run.progress=false",
        "run.tensorboard=false", f"run.out={run}", f"run.cache_dir={tmp_path / 'cache'}",
    ]
    result = CliRunner().invoke(app, ["train", *overrides])
    assert result.exit_code == 0, result.output
    assert list(load_model(run / "model").branch_names) == ["main"]
    cfg = load_config(None, overrides)
    saved = load_config(run / "config.yaml")
    assert saved == cfg and saved.model.branches == ["main"]
    # the copy in the model folder is JSON: it must compare equal to a fresh config (the demo reuses
    # a finished run only when it does)
    train_config = json.loads((run / "model" / "holiclip_config.json").read_text())["train_config"]
    assert train_config == saved.to_dict() == cfg.to_dict()
    save_config(saved, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == (run / "config.yaml").read_text()


def test_unknown_config_key_is_named():
    with pytest.raises(KeyError, match="optim.stepz"):
        load_config(None, ["optim.stepz=3"])
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
EXPECTED_H = {"clip": 1, "o2m": 1, "holistic_cls": 5, "holistic_mlp": 5, "holistic_hybrid": 5, "smoke": 2}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert len(cfg.branches) == EXPECTED_H[path.stem]
    if path.stem == "clip":
        assert cfg.data.slots == ["web"]
    if path.stem == "holistic_hybrid":
        assert cfg.loss.fused_weight == 0.5
    if path.stem == "holistic_mlp":
        assert cfg.model.encoder == "mlp"

"""The command line answers at once: a config typo, `models list` / `models info` and `--version`
need no torch; help shows every option name whole at 80 columns; `holiclip train` without a
config says what it needs; only rank 0 prints the final line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

import holiclip
from holiclip.cli.app import app

HEAVY = ("torch", "torchvision", "open_clip", "transformers")


def fresh(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter; returns its last printed JSON line, with the heavy modules it imported."""
    probe = code + f"\nimport json, sys\nprint(json.dumps({{**out, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def cli_in_fresh_interpreter(*args: str) -> dict:
    return fresh(
        "import contextlib, io, sys\n"
        f"sys.argv = ['holiclip', *{list(args)!r}]\n"
        "from holiclip.cli.app import main\n"
        "stdout, stderr, code = io.StringIO(), io.StringIO(), 0\n"
        "try:\n"
        "    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):\n        main()\n"
        "except SystemExit as exit:\n    code = exit.code or 0\n"
        "out = {'stdout': stdout.getvalue(), 'stderr': stderr.getvalue(), 'code': code}"
    )


def test_config_typo_is_reported_without_importing_torch():
    got = fresh(
        "from holiclip.training.config import ConfigError, load_config\n"
        "try:\n    load_config('holistic_cls', ['optim.stpes=3'])\n    out = {'error': None}\n"
        "except ConfigError as err:\n    out = {'error': str(err)}\n"
        "load_config('holistic_cls', ['data.train=x.jsonl', 'model.encoder=mlp'])  # a valid one, validated too\n"
    )
    assert "did you mean 'optim.steps'" in got["error"]
    assert got["heavy"] == []


def test_train_cli_reports_a_typo_before_torch_loads():
    got = cli_in_fresh_interpreter("train", "holistic_cls", "optim.stpes=3")
    assert got["code"] == 2 and "did you mean 'optim.steps'" in got["stderr"]
    assert got["heavy"] == []


@pytest.mark.parametrize("args", [["models", "list"], ["models", "info", "holi-tiny", "--encoder", "mlp"],
                                  ["--version"], ["configs", "list"], ["configs", "show", "smoke"]])
def test_light_commands_import_no_torch(args):
    got = cli_in_fresh_interpreter(*args)
    assert got["code"] == 0, got["stderr"]
    assert got["heavy"] == []
    if args == ["--version"]:
        assert got["stdout"].strip() == f"holiclip {holiclip.__version__}"
    if args[:2] == ["models", "list"]:
        assert "holi-tiny" in got["stdout"] and "ViT-B-16" in got["stdout"]


@pytest.mark.parametrize("name", ["holi-tiny", "holi-small"])
@pytest.mark.parametrize("encoder", ["cls", "mlp"])
def test_models_info_counts_the_parameters_of_the_built_model(name, encoder, single_thread):
    from holiclip.cli.models import count_parameters
    from holiclip.models import builtin_configs
    from holiclip.models.registry import create_model

    def built(h: int) -> int:
        model = create_model(name, encoder=encoder, branches=[f"b{i}" for i in range(h)], pretrained_text=False)
        return sum(p.numel() for p in model.parameters())

    total, extra = count_parameters(builtin_configs()[name], encoder, 5)
    assert total == built(5) and extra == built(5) - built(1) > 0
    # a config beyond the modelled keys is built instead of miscounted
    assert count_parameters({**builtin_configs()[name], "quick_gelu": True}, encoder, 5) is None


def _commands(group, path=()):
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name)) if hasattr(sub, "commands") else [((*path, name), sub)]


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_help_shows_every_option_name_whole_at_80_columns(path, command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(app, [*path, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    names = ["--help", *(o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))]
    cut = [n for n in names if not re.search(re.escape(n) + r"(?![\w-])", res.output)]
    assert cut == []


def test_train_without_a_config_says_what_it_needs():
    res = CliRunner().invoke(app, ["train"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: holiclip train needs a config")
    assert "holistic_cls" in lines[0] and "clip" in lines[0] and "holiclip configs list" in lines[0]


def test_train_by_shipped_name_and_unknown_name(monkeypatch):
    import holiclip.training.trainer as trainer

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"] = cfg
        return {"step": 3, "last": {"loss": 1.5, "step": 3}, "out": cfg.run.out, "trained_steps": 3}

    monkeypatch.setattr(trainer, "train", fake_train)
    res = CliRunner().invoke(app, ["train", "holistic_mlp", "data.train=x.jsonl", "optim.steps=3"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].model.encoder == "mlp" and seen["cfg"].optim.steps == 3
    assert res.output.startswith("done: step 3, loss 1.5000")
    bad = CliRunner().invoke(app, ["train", "holistic_mpl"])
    assert bad.exit_code == 2 and "no shipped config of that name" in bad.output


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False), ("3", False)])
def test_only_rank_zero_prints_the_final_line(monkeypatch, rank, printed):
    import holiclip.training.trainer as trainer

    monkeypatch.setattr(trainer, "train", lambda cfg, **kwargs: {
        "step": 2, "last": {"loss": 0.5, "step": 2}, "out": "runs/x", "trained_steps": 2})
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    res = CliRunner().invoke(app, ["train", "smoke"])
    assert res.exit_code == 0, res.output
    assert ("done: step 2" in res.output) is printed
    if not printed:
        assert res.output == ""


def test_configs_show_prints_the_file_and_refuses_an_unknown_name():
    from holiclip.training.presets import shipped_configs

    res = CliRunner().invoke(app, ["configs", "show", "demo/o2m"])
    assert res.exit_code == 0 and res.output == shipped_configs()["demo/o2m"].read_text()
    bad = CliRunner().invoke(app, ["configs", "show", "nope"])
    assert bad.exit_code == 2 and bad.output.startswith("error: nope: no such config file")

"""`holiclip train` refuses a bad override or value before training, with one error line."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from holiclip.cli.app import app

from tests.helpers.datasets import make_dataset


@pytest.mark.parametrize("override, key", [
    ("optim.betas=0.9", "optim.betas"), ("run.save_every=0", "run.save_every"), ("run.log_every=0", "run.log_every"),
    ("data.on_bad_row=skp", "data.on_bad_row"),
])
def test_train_cli_refuses_bad_values_before_training(tmp_path, override, key):
    data = make_dataset(tmp_path, n=8)
    result = CliRunner().invoke(app, [
        "train", f"data.train={data}", "model.name=holi-tiny", "data.slots=[web,main]", "optim.batch_size=4",
        "optim.steps=2", "optim.warmup_steps=1", "run.progress=false", "run.tensorboard=false",
        f"run.out={tmp_path / 'run'}", f"run.cache_dir={tmp_path / 'cache'}", override,
    ])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and key in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_train_cli_reports_bad_override(tmp_path):
    result = CliRunner().invoke(app, ["train", "optim.nope=1"])
    assert result.exit_code == 2 and "optim.nope" in result.output


def test_a_text_cache_miss_during_training_is_one_error_line(tmp_path, monkeypatch):
    """A cache missing some training texts (files deleted in part) stops the command with the
    cache's message, not a traceback."""
    from holiclip.training import trainer
    from holiclip.training.text_cache import TextCacheMiss

    def miss(self):
        raise TextCacheMiss("1 text(s) not in the text cache /c (9 texts), first: 'a dog'")

    monkeypatch.setattr(trainer.Trainer, "train", miss)
    data = make_dataset(tmp_path, n=8)
    result = CliRunner().invoke(app, ["train", f"data.train={data}", "model.name=holi-tiny", "data.slots=[web,main]",
                                      f"run.out={tmp_path / 'run'}", "run.progress=false"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: 1 text(s) not in the text cache") and "Traceback" not in result.output

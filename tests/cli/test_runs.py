"""`holiclip runs RUN_DIR`: step / total, ETA, last metrics and evaluation, checkpoints; no torch imported."""
from __future__ import annotations

import json
import re

from tests.cli.test_answers_at_once import cli_in_fresh_interpreter
from tests.helpers.datasets import make_dataset
from tests.helpers.training import cfg_for


def test_runs_prints_step_eta_last_metrics_and_checkpoints_without_torch(tmp_path):
    from holiclip.training.trainer import train

    data = make_dataset(tmp_path, n=8)
    out = tmp_path / "run"
    train(cfg_for(tmp_path, data, out, "run.max_steps_this_run=3"))  # stopped half-way, as a run read while it trains
    with open(out / "metrics.jsonl", "a") as fh:  # an evaluation row, and a row being written
        fh.write(json.dumps({"step": 3, "eval/val/i2t_R@1": 0.625}) + "\n" + '{"step": 4, "lo')
    got = cli_in_fresh_interpreter("runs", str(out))
    assert got["code"] == 0, got["stderr"]
    assert got["heavy"] == []
    text = got["stdout"]
    assert f"{out}: step 3 / 6 (50%), ETA " in text and "samples/s" in text
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]][-2]
    assert re.search(rf"last \(step 3\): loss {last['loss']:.4g}, lr ", text), text
    assert "eval (step 3): val/i2t_R@1 0.625" in text
    assert "checkpoints: step_00000003.pt" in text and "model/" not in text
    assert "1 metrics row(s) unreadable" in text


def test_runs_eta_is_the_steps_left_over_the_recent_throughput(tmp_path):
    from holiclip.training.status import run_status

    (tmp_path / "config.yaml").write_text("optim: {steps: 100, batch_size: 8, accum_steps: 2}\n")
    rows = [{"step": s, "loss": 1.0, "samples_per_s": 64.0, "samples_per_s_per_device": 16.0} for s in (10, 20)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = run_status(tmp_path)
    assert status.step == 20 and status.total == 100
    assert status.eta_s == 80 * 16 / 16.0  # 80 steps of 16 samples per device at 16 samples/s per device


def test_runs_on_a_folder_that_is_no_run_exits_2(tmp_path):
    got = cli_in_fresh_interpreter("runs", str(tmp_path))
    assert got["code"] == 2 and "not a run folder" in got["stderr"]

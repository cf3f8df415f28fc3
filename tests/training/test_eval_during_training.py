"""eval.every: evaluation during training on 2 gloo ranks gives the numbers `holiclip eval` gives
on the saved model, fused and per branch, for retrieval and zero-shot."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from holiclip.cli.app import app
from holiclip.training.trainer import read_metrics
from tests.helpers.datasets import draw, make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import SLOTS

_EACH_RANK = """
import sys
from holiclip.training.config import load_config
from holiclip.training.trainer import train

train(load_config(None, sys.argv[1:]))
"""


def _image_folder(root):
    for i in range(6):  # two images of each of three colours
        (root / ["red", "green", "blue"][i % 3]).mkdir(parents=True, exist_ok=True)
        draw(i % 3 + 8 * (i // 3)).save(root / ["red", "green", "blue"][i % 3] / f"{i}.png")
    return root


def _torchrun(tmp_path, *overrides, timeout=300):
    script = tmp_path / "each_rank.py"
    script.write_text(_EACH_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), *overrides]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


def _base(tmp_path, data):
    return [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=2",
            "optim.warmup_steps=1", "optim.batch_size=4", "run.progress=false", "run.tensorboard=false",
            "run.dist_timeout=60", f"run.out={tmp_path}/run", f"run.cache_dir={tmp_path}/cache"]


def test_eval_during_training_on_two_ranks_matches_holiclip_eval_on_the_saved_model(tmp_path):
    data = make_dataset(tmp_path, n=8)
    val = make_dataset(tmp_path, n=7, name="val.jsonl")  # 7: the ranks' shares differ in size
    folder = _image_folder(tmp_path / "classes")
    sets = (f"eval.sets=[{{task: retrieval, data: '{val}', name: val}}, {{task: long-retrieval, data: '{val}', "
            f"name: long}}, {{task: zeroshot, data: '{folder}', name: colours, templates: simple}}]")
    proc = _torchrun(tmp_path, *_base(tmp_path, data), "eval.every=1", sets, "eval.fusion=[mean, max]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all("eval/val/mean(web+detail+main)/i2t_R@1" in r for r in rows)
    logged = rows[-1]

    runner = CliRunner()
    for task, name, options in [("retrieval", "val", [str(val)]), ("long-retrieval", "long", [str(val)]),
                                ("zeroshot", "colours", [str(folder), "--templates", "simple"])]:
        for fusion in ("mean", "max"):
            out = tmp_path / f"{name}-{fusion}.json"
            res = runner.invoke(app, ["eval", task, "-c", str(tmp_path / "run" / "model"), "--data", *options,
                                      "--per-branch", "--fusion", fusion, "--no-progress", "-o", str(out)])
            assert res.exit_code == 0, res.output
            result = json.loads(out.read_text())
            for row in result["rows"]:
                for col in result["columns"][1:]:
                    key = f"eval/{name}/{row['branches']}/{col}"
                    assert logged[key] == pytest.approx(row[col], abs=1e-9), key
    assert "eval/colours/web/acc1" in logged and "eval/long/max(web+detail+main)/t2i_R@10" in logged


def test_an_evaluation_error_stops_both_ranks_with_its_message(tmp_path):
    data = make_dataset(tmp_path, n=8)
    proc = _torchrun(tmp_path, *_base(tmp_path, data), "eval.every=1",
                     f"eval.sets=[{{task: zeroshot, data: '{tmp_path}/missing'}}]", timeout=200)
    assert proc.returncode != 0
    assert proc.stderr.count(f"{tmp_path}/missing") >= 2, proc.stderr[-3000:]  # each rank names the set

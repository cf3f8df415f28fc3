"""Each optional package, when missing, is one line naming the extra that installs it."""
import logging
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from holiclip._extras import MissingExtra, require
from holiclip.cli.app import app

runner = CliRunner()


def _hide(monkeypatch, *modules):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` -> ImportError


def _one_line(res, extra: str, module: str) -> str:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output  # typer.Exit(2), not the error
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: ") and lines[0].endswith(f"needs {module}: pip install 'holiclip[{extra}]'")
    return lines[0]


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", "x", "y") is sys.modules["json"]
    _hide(monkeypatch, "faiss")
    with pytest.raises(MissingExtra) as err:
        require("faiss", "search", "holiclip search")
    assert isinstance(err.value, ImportError)
    assert str(err.value) == "holiclip search needs faiss: pip install 'holiclip[search]'"
    assert err.value.__cause__ is None and err.value.__suppress_context__


# -- the command line: exit code 2, one line on stderr, no traceback --------------------------
def test_cli_search_without_faiss(monkeypatch, tmp_path):
    _hide(monkeypatch, "faiss")
    res = runner.invoke(app, ["search", str(tmp_path), "a red background"])
    assert _one_line(res, "search", "faiss") == "error: holiclip embed / search needs faiss: pip install 'holiclip[search]'"


def test_cli_clip_benchmark_without_it(monkeypatch, tmp_path):
    _hide(monkeypatch, "clip_benchmark", "clip_benchmark.cli", "clip_benchmark.models")
    res = runner.invoke(app, ["eval", "clip-benchmark", "-c", str(tmp_path), "--", "--dataset", "wds/x"])
    _one_line(res, "bench", "clip_benchmark")


def test_explain_without_matplotlib(monkeypatch, tmp_path):
    from holiclip.evaluation import explain

    _hide(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtra, match=r"holiclip explain needs matplotlib: pip install 'holiclip\[viz\]'"):
        explain.explain_image(None, None, tmp_path / "a.png")


@pytest.mark.parametrize("backend, module", [("openai", "httpx"), ("hf", "transformers")])
def test_caption_backends(monkeypatch, backend, module):
    from holiclip.captioning.backends import make_backend

    _hide(monkeypatch, module)
    with pytest.raises(MissingExtra, match=rf"the {backend} captioning backend needs {module}: "
                                           r"pip install 'holiclip\[caption\]'"):
        make_backend(backend, "some-model")


def test_openai_backend_module_is_not_imported_by_the_caption_package():
    """httpx is imported by the openai backend's module only, which only make_backend("openai") loads."""
    import subprocess

    code = ("import sys, holiclip.captioning.pipeline, holiclip.cli.caption; "
            "print('httpx' in sys.modules, 'holiclip.captioning.backends.openai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_webdataset_reader(monkeypatch):
    from holiclip.data.readers import read_webdataset

    _hide(monkeypatch, "webdataset")
    with pytest.raises(MissingExtra, match=r"needs webdataset: pip install 'holiclip\[train\]'"):
        next(read_webdataset("shard-0.tar"))


def test_webdataset_writer(monkeypatch):
    from holiclip.data import sharding

    _hide(monkeypatch, "webdataset")
    with pytest.raises(MissingExtra, match=r"writing webdataset shards needs webdataset: pip install 'holiclip\[train\]'"):
        sharding._pool(2)


def test_tensorboard_missing_is_a_warning_naming_the_extra(monkeypatch, tmp_path, caplog):
    from holiclip.training.logger import MetricLogger

    _hide(monkeypatch, "tensorboard")
    with caplog.at_level(logging.WARNING, logger="holiclip"):
        logger = MetricLogger(tmp_path, tensorboard=True, start_step=0)
    assert logger.writer is None  # training goes on with metrics.jsonl
    assert ("TensorBoard logging (run.tensorboard) needs tensorboard: pip install 'holiclip[train]'; "
            "or leave tensorboard out of run.report_to (run.tensorboard=false)") in caplog.text


def test_emoji_plots_and_svg(monkeypatch, tmp_path):
    from holiclip.benchmarks.emoji import report
    from holiclip.benchmarks.emoji.data import sprites

    _hide(monkeypatch, "matplotlib", "matplotlib.pyplot", "cairosvg")
    with pytest.raises(MissingExtra, match=r"needs matplotlib: pip install 'holiclip\[emoji\]'"):
        report.plot_bars({}, tmp_path / "a.png")
    with pytest.raises(MissingExtra, match=r"needs cairosvg: pip install 'holiclip\[emoji\]'"):
        sprites.render_svg(Path("x.svg"), 8)


def test_transformers_users(monkeypatch):
    import holiclip
    from holiclip.captioning.stats import MiniLMEmbedder

    _hide(monkeypatch, "transformers", "transformers.modeling_outputs")
    with pytest.raises(MissingExtra, match=r"text tower .* needs transformers: pip install 'holiclip\[minilm\]'"):
        holiclip.create_model("holi-small-minilm")
    with pytest.raises(MissingExtra, match=r"needs transformers: pip install 'holiclip\[caption\]'"):
        MiniLMEmbedder()
    monkeypatch.delitem(sys.modules, "holiclip.integrations.llava", raising=False)  # re-run its imports
    with pytest.raises(MissingExtra, match=r"holiclip.integrations.llava needs transformers: "
                                           r"pip install 'holiclip\[caption\]'"):
        import holiclip.integrations.llava  # noqa: F401

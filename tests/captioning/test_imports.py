"""Captioning stays light: importing it, and a whole openai-backend run, never import torch."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.captioning import make_images, read_jsonl
from tests.helpers.loopback import LoopbackServer

HEAVY = ("torch", "torchvision", "open_clip", "transformers")


def _heavy_modules_after(code: str) -> list[str]:
    """Runs ``code`` in a fresh interpreter; returns the heavy modules it left imported."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_captioning_and_its_cli_imports_no_torch():
    modules = ["holiclip", "holiclip.captioning", "holiclip.captioning.pipeline", "holiclip.captioning.merge",
               "holiclip.captioning.stats", "holiclip.captioning.backends", "holiclip.captioning.backends.openai",
               "holiclip.captioning.backends.hf", "holiclip.cli.caption"]
    assert _heavy_modules_after("\n".join(f"import {m}" for m in modules)) == []


@pytest.mark.parametrize("module, command", [("holiclip.cli.app", ["caption", "run"]),  # `holiclip caption run`
                                             ("holiclip.cli.caption", ["run"])])  # as torchrun starts it
def test_openai_run_imports_no_torch(tmp_path: Path, module: str, command: list[str]):
    make_images(tmp_path / "imgs", 3)
    argv = ["holiclip", *command, "--images", str(tmp_path / "imgs"), "--backend", "openai", "--model", "m",
            "--perspectives", "detail", "--out", str(tmp_path / "out"), "--no-progress"]
    with LoopbackServer(lifetime_s=60) as srv:
        code = (f"import runpy, sys\nsys.argv = {argv + ['--base-url', srv.url]!r}\n"
                f"try:\n    runpy.run_module({module!r}, run_name='__main__')\n"
                "except SystemExit as exit:\n    assert not exit.code, exit.code")
        assert _heavy_modules_after(code) == []
    assert len(read_jsonl(tmp_path / "out" / "captions.jsonl")) == 3  # the run really happened

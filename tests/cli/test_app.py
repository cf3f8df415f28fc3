"""The command line lists its commands and starts light: help screens import no torch, open_clip or transformers."""
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from holiclip.cli.app import app

HEAVY = ("torch", "torchvision", "open_clip", "transformers")


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["caption"], ["demo"], ["data"], ["models"]])
def test_help_imports_no_torch(command: list[str]):
    # what the `holiclip` entry point runs, in a fresh interpreter
    probe = (
        "import contextlib, io, json, sys\n"
        f"sys.argv = ['holiclip', *{command!r}, '--help']\n"
        "from holiclip.cli.app import main\n"
        "out = io.StringIO()\n"
        "try:\n    with contextlib.redirect_stdout(out):\n        main()\n"
        "except SystemExit as exit:\n    assert not exit.code, exit.code\n"
        f"print(json.dumps({{'help': out.getvalue(), 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert "Usage" in got["help"] and got["heavy"] == []


def test_cli_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "caption", "eval", "explain", "data", "demo", "models"):
        assert command in result.output

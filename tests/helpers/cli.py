"""Running the `holiclip` command line in a test, and what a bad input must give: exit code 2 and
one line, no traceback."""
from __future__ import annotations

from typer.testing import CliRunner

from holiclip.cli.app import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The one ``error: ...`` line of a command that refused its input (exit code 2)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]

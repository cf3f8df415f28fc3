"""Running the `holiclip` command line in a test, and what a bad input must give: exit code 2 and
one line, no traceback."""
from __future__ import annotations

from typer.testing import CliRunner

from holiclip.cli.app import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The one ``error: ...`` line a command that refused its input ends with (exit code 2; what it
    logged of its progress before may come first)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert errors == lines[-1:] and lines[-1].startswith("error: "), result.output
    return lines[-1]

"""`holiclip explain`: the attention-map PNG and its JSON."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from holiclip.cli.app import app


runner = CliRunner()


def test_explain_command(tmp_path, tiny_checkpoint, solid_image):
    img = solid_image(tmp_path / "x.png", (10, 100, 200))
    res = runner.invoke(app, ["explain", img, "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "m.json").read_text())
    assert [b["branch"] for b in doc["branches"]] == ["web", "detail", "main"]
    grid = doc["branches"][0]["map"]
    assert len(grid) == 4 and len(grid[0]) == 4  # holi-tiny: 64 px / 16 px patches
    assert 0.0 <= doc["branches"][0]["entropy"] <= 1.0 and "entropy" in res.output

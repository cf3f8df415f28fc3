"""The attention-map PNG."""
from __future__ import annotations

import pytest
from PIL import Image

from holiclip.evaluation import explain_image


def test_explain_writes_png(tmp_path, eval_model, solid_image):
    img = solid_image(tmp_path / "in.png", (120, 60, 30), size=(50, 70))
    out = explain_image(eval_model.model, img, tmp_path / "sub" / "maps.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 3 * im.height  # image + 3 branch panels side by side
    two = explain_image(eval_model.model, img, tmp_path / "two.png", branches=["main", "web"])
    with Image.open(two) as im2, Image.open(out) as im:
        assert im2.width < im.width
    with pytest.raises(KeyError, match="style"):
        explain_image(eval_model.model, img, tmp_path / "x.png", branches=["style"])

"""The torchvision import shim: holiclip, torchvision and open_clip import together in any order."""
from __future__ import annotations

import subprocess
import sys


def test_import_holiclip_then_torchvision_and_open_clip():
    code = (
        "import holiclip, torchvision, open_clip, torchvision.transforms as T;"
        "from holiclip import _compat;"
        "assert _compat.ensure_torchvision_importable() is False;"  # idempotent once imported
        "print(open_clip.__version__, T.Resize(8))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Resize" in result.stdout

"""The scene-backend tests reuse the captioning tests' helpers (tests/captioning/cap_helpers.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "captioning"))

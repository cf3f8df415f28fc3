"""Backgrounds stay within their family's two shades."""
from __future__ import annotations

import json

import numpy as np
import pytest

from holiclip.benchmarks.emoji.data import backgrounds as bgs


@pytest.mark.parametrize("pattern", bgs.PATTERNS)
def test_backgrounds_stay_within_their_two_shades(pattern):
    rng = np.random.default_rng(0)
    for fam in range(len(bgs.FAMILIES)):
        spec = bgs.sample_background(rng, fam)
        spec["pattern"] = pattern
        img = bgs.render_background(spec, 32)
        lo = np.minimum(spec["colors"][0], spec["colors"][1]) / 255.0
        hi = np.maximum(spec["colors"][0], spec["colors"][1]) / 255.0
        assert img.shape == (32, 32, 3)
        assert (img >= lo - 1e-5).all() and (img <= hi + 1e-5).all()
        assert json.loads(json.dumps(spec)) == spec  # stored in JSONL rows

"""The sample schema's missing-slot policy."""
from __future__ import annotations

import pytest

from holiclip.data.records import DataError, apply_missing_slot_policy


def test_missing_slot_policies(tmp_path):
    caps = {"web": "a dog", "detail": ""}
    with pytest.raises(DataError, match=r"x.jsonl:7: caption slot 'detail' is empty"):
        apply_missing_slot_policy(caps, ["web", "detail"], "error", "x.jsonl:7")
    with pytest.raises(DataError, match=r"slot 'main' is missing"):
        apply_missing_slot_policy(caps, ["main"], "error", "x.jsonl:7")
    assert apply_missing_slot_policy(caps, ["web", "detail"], "drop") is None
    assert apply_missing_slot_policy(caps, ["web", "detail"], "fill:web") == ["a dog", "a dog"]
    with pytest.raises(ValueError, match="policy"):
        apply_missing_slot_policy(caps, ["web"], "ignore")

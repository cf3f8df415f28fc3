"""Quality flags of a caption (empty, refused, truncated) and duplicate slots of an image."""
import pytest

from holiclip.captioning.quality import caption_flags, duplicate_slots


@pytest.mark.parametrize("text, finish, flags", [
    ("A red car parked on a street.", "stop", []),
    ("   ", "stop", ["empty"]),
    ("...", None, ["empty"]),
    ("I'm sorry, but I can't help with that.", "stop", ["refused"]),
    ("I cannot describe people in images.", "stop", ["refused"]),
    ("As an AI language model, I do not see images.", "stop", ["refused"]),
    ("Sorry, I am unable to view images.", "stop", ["refused"]),
    ("A sorry-looking dog sits in the rain.", "stop", []),  # 'sorry' but not a refusal
    ("The cat I cannot forget sits on a mat", "length", ["truncated"]),
])
def test_caption_flags(text, finish, flags):
    assert caption_flags(text, finish) == flags


def test_duplicate_slots():
    assert duplicate_slots({"web": "A cat.", "detail": "a  cat", "style": "Calm.", "main": ""}) == {"web", "detail"}

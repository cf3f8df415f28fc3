"""Caption quality flags: empty, refused, truncated, duplicate.

- ``empty``: nothing but whitespace/punctuation;
- ``refused``: the model declined ("I'm sorry, ...", "I cannot ...", "As an AI ...");
- ``truncated``: generation stopped at the token limit (``finish_reason == "length"``); the
  text is usable but cut mid-sentence;
- ``duplicate``: the same text (after normalising case, spaces and end punctuation) as
  another slot of the same image, so it adds no new perspective.

Empty and refused answers are no caption at all (they would train a branch on noise): ``caption
run`` retries them (``--retry-refusals``), records the ones still refused as failures and sends
them again on a re-run; ``merge`` and ``stats`` count them as missing (:func:`is_caption` is the
one test all three use). ``stats`` counts every flag.
"""
from __future__ import annotations

import re
from typing import Mapping

FLAGS = ("empty", "refused", "truncated", "duplicate")
MISSING_FLAGS = frozenset({"empty", "refused"})  # what merge treats as no caption at all

# Openings of refusals seen from common VLMs; anchored at the start so that a caption that
# merely mentions "sorry" (a sign in the picture) is not flagged.
_REFUSAL = re.compile(
    r"^\W*(?:i['’]?m\s+(?:sorry|unable|not\s+able)|i\s+am\s+(?:sorry|unable|not\s+able)|sorry\b|"
    r"i\s+apologi[sz]e|i\s+(?:cannot|can['’]?t|can\s+not|won['’]?t)\s+(?:help|assist|provide|describe|"
    r"see|view|identify|answer|comply|do)|as\s+an\s+ai\b|unfortunately,?\s+i\s+(?:cannot|can['’]?t|am\s+unable))",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w", re.UNICODE)


def normalise(text: str) -> str:
    """Lower case, single spaces, no leading/trailing punctuation: the duplicate key."""
    return re.sub(r"\s+", " ", text.replace("’", "'")).strip().strip(".,;:!?\"' ").lower()


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text))


def caption_flags(text: str | None, finish_reason: str | None = None) -> list[str]:
    """Flags of one caption on its own (``duplicate`` needs the image's other texts)."""
    flags = []
    if text is None or not _WORD.search(text):
        flags.append("empty")
    elif is_refusal(text):
        flags.append("refused")
    if finish_reason == "length":
        flags.append("truncated")
    return flags


def duplicate_slots(texts: Mapping[str, str]) -> set[str]:
    """Slots whose normalised text equals another slot's of the same image (all of them)."""
    seen: dict[str, list[str]] = {}
    for slot, text in texts.items():
        key = normalise(text or "")
        if key:
            seen.setdefault(key, []).append(slot)
    return {s for slots in seen.values() if len(slots) > 1 for s in slots}


def missing_flag(text: str | None) -> str | None:
    """``"empty"`` or ``"refused"`` when the text is no caption; None for a caption."""
    return next((f for f in caption_flags(text) if f in MISSING_FLAGS), None)


def is_caption(text: str | None) -> bool:
    """What ``caption run``, ``merge`` and ``stats`` count as captioned: not empty, not a refusal."""
    return missing_flag(text) is None

"""The sample schema: one image and its texts in named slots, plus the missing-slot policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

MISSING_POLICIES = ("error", "drop", "fill:<slot>")


class DataError(ValueError):
    """Bad input; the message names the file, line and field."""


@dataclass
class Sample:
    image: Any  # a path (str) or raw bytes (webdataset)
    captions: dict[str, str]
    where: str = ""  # "file:line" or "shard:key", for messages
    meta: dict = field(default_factory=dict)


def captions_from_row(row: dict, where: str, list_slots: Sequence[str] | None = None) -> dict[str, str]:
    """Named slots from ``captions: {...}``, or the research format ``caption: [...]``/str."""
    if "captions" in row:
        caps = row["captions"]
        if not isinstance(caps, dict):
            raise DataError(f"{where}: field 'captions' must be an object of slot -> text")
        return {str(k): v for k, v in caps.items()}
    if "caption" in row:
        caps = row["caption"]
        if isinstance(caps, str):
            caps = [caps]
        if not isinstance(caps, list):
            raise DataError(f"{where}: field 'caption' must be a string or a list of strings")
        names = list(list_slots) if list_slots else [f"text{i}" for i in range(len(caps))]
        if len(caps) > len(names):
            raise DataError(
                f"{where}: {len(caps)} captions but only {len(names)} slot names {names} for the list format"
            )
        return dict(zip(names, caps))
    raise DataError(f"{where}: no 'captions' (named slots) or 'caption' (list) field")


def parse_policy(policy: str) -> tuple[str, str | None]:
    if policy in ("error", "drop"):
        return policy, None
    if policy.startswith("fill:") and len(policy) > 5:
        return "fill", policy[5:]
    raise ValueError(f"missing-slot policy must be one of {MISSING_POLICIES}, got {policy!r}")


def has_text(value: Any) -> bool:
    """A caption slot is present when it holds a non-blank string."""
    return isinstance(value, str) and bool(value.strip())


def missing_slots(captions: dict[str, Any], slots: Sequence[str]) -> list[str]:
    return [slot for slot in slots if not has_text(captions.get(slot))]


def apply_missing_slot_policy(
    captions: dict[str, Any], slots: Sequence[str], policy: str = "error", where: str = ""
) -> list[str] | None:
    """Texts for ``slots`` in order, or None when the policy drops the sample.

    A slot counts as missing when absent, not a string, or blank. ``error`` raises a
    :class:`DataError` naming the place and slot; ``drop`` returns None; ``fill:<slot>`` copies
    another slot's text (which must itself be present).
    """
    kind, source = parse_policy(policy)
    texts = []
    for slot in slots:
        text = captions.get(slot)
        if not has_text(text):
            if kind == "error":
                got = "empty" if isinstance(text, str) else ("missing" if text is None else f"not a string ({type(text).__name__})")
                raise DataError(
                    f"{where}: caption slot {slot!r} is {got} (slots present: {sorted(captions)}); "
                    f"set missing_slot_policy to 'drop' or 'fill:<slot>' to continue past such samples"
                )
            if kind == "drop":
                return None
            text = captions.get(source)
            if not has_text(text):
                raise DataError(f"{where}: slot {slot!r} missing and fill source {source!r} missing too")
        texts.append(text)
    return texts

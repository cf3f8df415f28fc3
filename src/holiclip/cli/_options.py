"""Option values shared by the commands."""
from __future__ import annotations


def comma_list(text: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None when the option names nothing."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    return names or None

"""Option values shared by the commands."""
from __future__ import annotations


def comma_list(text: str | None) -> list[str] | None:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None when the option names nothing."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    return names or None


def model_tokenizer(name: str | None):
    """The tokenizer of model ``name`` (``--tokenizer``), None when not given; an unknown model is a ValueError."""
    if name is None:
        return None
    from holiclip.models.registry import get_tokenizer

    try:
        return get_tokenizer(name)
    except KeyError as err:
        raise ValueError(f"--tokenizer: {err.args[0]}") from None

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


def train_config(config, overrides: list[str] | None, *extra: str):
    """The TrainConfig of ``CONFIG [section.key=value ...]``; a first argument that is an override
    (``a.b=c``, no such file) is taken as one."""
    from pathlib import Path

    from holiclip.training.config import load_config

    items = list(overrides or [])
    if config is not None and "=" in str(config) and not Path(config).exists():
        items.insert(0, str(config))
        config = None
    return load_config(config, [*items, *extra])

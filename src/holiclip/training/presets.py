"""The training configs that ship with the package: ``holiclip train holistic_cls`` by name.

They are the YAML files under ``configs/`` beside this module (in a checkout, the top-level
``configs/`` folder is a link to it): the baselines by file name (``clip``, ``o2m``,
``holistic_cls``, ...), the demo's variants as ``demo/<name>`` and the ablations' as
``ablations/<name>``. Torch-free, like :mod:`holiclip.training.config`.
"""
from __future__ import annotations

from pathlib import Path

from .config import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """Name (``holistic_cls``, ``demo/clip``) -> YAML file; baselines first, then the sub-folders."""
    files = sorted(CONFIG_DIR.rglob("*.yaml"), key=lambda p: (len(p.relative_to(CONFIG_DIR).parts), str(p)))
    return {p.relative_to(CONFIG_DIR).with_suffix("").as_posix(): p for p in files}


def describe(path: Path) -> str:
    """The first line of the file's leading comment: what the config is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            first = line.lstrip("# ").strip()
            return first.split(". ", 1)[0].rstrip(".,") + "."
        if line.strip():
            break
    return ""


def find_config(name_or_path: str | Path) -> Path:
    """A YAML file that exists, else a shipped config by name (``holistic_cls`` or ``holistic_cls.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    if name.startswith("configs/"):  # a checkout's path, asked from another folder
        name = name[len("configs/"):]
    if name in shipped:
        return shipped[name]
    raise ConfigError(f"{name_or_path}: no such config file, and no shipped config of that name; "
                      f"shipped: {names_hint()}")


def names_hint() -> str:
    """The baselines' names and where the rest are listed, for messages."""
    top = [name for name in shipped_configs() if "/" not in name]
    return f"{', '.join(top)}, demo/<variant>, ablations/<variant> (all: holiclip configs list)"

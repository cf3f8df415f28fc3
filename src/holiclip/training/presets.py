"""The training configs that ship with the package: ``holiclip train holistic_cls`` by name.

They are the YAML files under ``configs/`` beside this module (in a checkout, the top-level
``configs/`` folder is a link to it): the baselines by file name (``clip``, ``o2m``,
``holistic_cls``, ...), the demo's variants as ``demo/<name>`` and the ablations' as
``ablations/<name>``. Torch-free; :func:`holiclip.training.config.find_config` turns a miss into a ConfigError.
"""
from __future__ import annotations

from pathlib import Path

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


def shipped_path(name_or_path: str | Path) -> Path | None:
    """A YAML file that exists, else the shipped config of that name (``holistic_cls`` or
    ``holistic_cls.yaml``, ``configs/demo/clip.yaml`` from another folder), else None."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    if name.startswith("configs/"):  # a checkout's path, asked from another folder
        name = name[len("configs/"):]
    return shipped_configs().get(name)


def names_hint() -> str:
    """The baselines' names and where the rest are listed, for messages."""
    top = [name for name in shipped_configs() if "/" not in name]
    return f"{', '.join(top)}, demo/<variant>, ablations/<variant> (all: holiclip configs list)"

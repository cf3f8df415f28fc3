"""Training-state checkpoints: atomic writes (temp file + rename), ``latest`` lookup, safe loads."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"step_(\d+)\.pt$")


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), *n[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def list_checkpoints(directory: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*.pt") if (m := CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    atomic_save(state, path)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(resume: str | None, directory: Path) -> Path | None:
    """``latest`` -> newest checkpoint in the run (None if there is none); else a path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)

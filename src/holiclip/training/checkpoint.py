"""Training-state checkpoints: atomic writes (temp file + rename), ``latest`` lookup, safe loads,
and the run folder's guard (a new run never mixes with the run already there)."""
from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..io import atomic_path, unfinished_writes
from ..models.sources import CKPT_RE, list_checkpoints, read_torch
from .config import with_defaults
from .distributed import portable

# what a training run writes into run.out (``--overwrite`` deletes exactly these)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "model", "config.yaml", "wandb", "wandb-run-id")
TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "counters", "rng")

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


class RunFolderError(ValueError):
    """run.out holds a run that the new one would be mixed with."""


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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_checkpoint(directory: Path, step: int, state: dict, keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    atomic_save(state, path)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """A training state, or a CheckpointError naming the file (empty, truncated, not a torch file, not a state)."""
    path = Path(path)
    # mapped, not read into memory: the tensors are paged in as the model and optimiser copy them
    state = read_torch(path, CheckpointError, "checkpoint", mmap=True)
    missing = [k for k in TRAINING_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a holiclip training checkpoint (no {', '.join(missing)})")
    return state


def _step_of(path: Path) -> int:
    return int(CKPT_RE.search(path.name).group(1))


def _in_folder(path: Path, directory: Path) -> bool:
    return Path(path).resolve().parent == Path(directory).resolve()


def _set_aside(path: Path, suffix: str) -> Path:
    """Renames a checkpoint out of the rotation (``latest`` and pruning see only ``step_*.pt``), keeping it."""
    target = path.with_name(f"{path.name}.{suffix}")
    os.replace(path, target)
    return target


def find_resume(resume: str | None, directory: Path) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state, (None, None) for a fresh start.

    ``latest``: the newest readable checkpoint in ``directory``; damaged newer ones are named and set
    aside as ``*.unreadable``; none readable is an error, never a silent fresh start. A path: that
    checkpoint or an error naming it; newer checkpoints of the same folder belong to the line of
    training being abandoned and are set aside as ``*.superseded`` (a later ``latest`` must not pick them).
    """
    if not resume:
        return None, None
    directory = Path(directory)
    if resume != "latest":
        path = Path(resume)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        state = load_checkpoint(path)
        if _in_folder(path, directory):
            for newer in [p for p in list_checkpoints(directory) if _step_of(p) > int(state["step"])]:
                log.warning("warning: %s is newer than %s, the checkpoint resumed from; set aside as %s",
                            newer, path, _set_aside(newer, "superseded").name)
        return path, state
    damaged: list[tuple[Path, CheckpointError]] = []
    for path in reversed(list_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            log.warning("warning: %s", err)
            damaged.append((path, err))
            continue
        if damaged:
            aside = ", ".join(_set_aside(p, "unreadable").name for p, _ in damaged)
            log.warning("warning: resuming from %s, the newest readable checkpoint (set aside: %s)", path, aside)
        return path, state
    if damaged:
        raise CheckpointError(f"no readable checkpoint in {directory} to resume from: "
                              + "; ".join(str(err) for _, err in damaged))
    return None, None


def on_main(fn: Callable, is_main: bool):
    """``fn()`` on rank 0 alone (the only rank that touches the run folder); its result, or its error,
    reaches every rank under torchrun, so that all ranks go on or fail alike instead of hanging."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except Exception as err:  # handed to the other ranks, then raised everywhere
            error = err
    if dist.is_available() and dist.is_initialized():
        box = [(result, portable(error) if error is not None else None)]  # an unpicklable one as its text
        dist.broadcast_object_list(box, src=0)
        if not is_main:
            result, error = box[0]
    if error is not None:
        raise error
    return result


def remove_partial_writes(directory: Path) -> None:
    """Deletes the temporary files of checkpoint writes killed before their rename
    (``step_N.pt.<pid>.<hex>.tmp``; the run folder is this run's alone, so no live writer owns them),
    counted in the log."""
    partial = unfinished_writes(directory, lambda name: bool(CKPT_RE.fullmatch(name)))
    if not partial:
        return
    size = 0
    for path in partial:
        try:
            size += path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
    log.warning("removed %d partial checkpoint write%s (%.1f MB) left in %s by an interrupted run: %s",
                len(partial), "s" if len(partial) > 1 else "", size / 1e6, directory,
                ", ".join(sorted(p.name for p in partial)))


def resume_state(resume: str | None, directory: Path, is_main: bool) -> tuple[Path | None, dict | None]:
    """``find_resume`` on rank 0 (after removing partial writes); the other ranks load the checkpoint it chose."""
    loaded: dict = {}

    def choose():
        remove_partial_writes(directory)
        path, loaded["state"] = find_resume(resume, directory)
        return path

    path = on_main(choose, is_main)
    if path is None:
        return None, None
    return path, loaded["state"] if is_main else load_checkpoint(path)


# settings that change how a run is watched or stored, not what it trains: free to change on resume
OPERATIONAL_KEYS = frozenset({
    "run.out", "run.progress", "run.tensorboard", "run.log_every", "run.save_every", "run.keep_checkpoints",
    "run.max_steps_this_run", "run.cache_dir", "run.device", "data.workers", "run.dist_timeout",
    "run.compile",  # the same computation, compiled or eager (losses equal within float tolerance)
    "run.report_to", "run.name", "run.wandb_project",  # where metrics go, and what evaluates the run
    "eval.every", "eval.sets", "eval.fusion", "eval.per_branch", "eval.batch_size",
})


# a longer or shorter run of the same training (the schedule is re-stretched): listed, not refused
EXTENDABLE_KEYS = ("optim.steps:",)


def config_changes(saved: dict | None, current: dict) -> list[str]:
    """``key: old -> new`` for each training setting that differs from the checkpoint's."""
    if not saved:  # a checkpoint written before configs were stored in it
        return []
    saved = with_defaults(saved)  # a key added since the checkpoint was written compares as its default
    changes = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            name = f"{section}.{key}"
            if name not in OPERATIONAL_KEYS and old.get(key) != new.get(key):
                changes.append(f"{name}: {old.get(key)!r} -> {new.get(key)!r}")
    return changes


def check_resume_config(path: Path, saved: dict | None, current: dict, resume: str | None,
                        warn: bool = True) -> None:
    """``--resume latest`` continues the run in the folder: other training settings would silently
    mix two runs, so they stop the run. An explicit checkpoint path is a deliberate start from
    those weights: the changes are listed (unless ``warn`` is false: torchrun's other ranks) and
    the run goes on."""
    changes = config_changes(saved, current)
    if not changes:
        return
    listing = "\n  ".join(changes)
    if resume == "latest" and not all(c.startswith(EXTENDABLE_KEYS) for c in changes):
        raise RunFolderError(
            f"the run in {path.parent.parent} was trained with other settings than this one:\n  {listing}\n"
            "resume it with its own settings (see its config.yaml), start over with --overwrite, "
            f"or start from this checkpoint in a new run.out with --resume {path}")
    if warn:
        log.warning("warning: resuming from %s, trained with other settings:\n  %s", path, listing)


def saved_world_size(state: dict) -> int | None:
    """The ranks a checkpoint was trained on; None when it does not say (written before it was stored;
    a shard stream's state held it already)."""
    found = state.get("world_size", (state.get("data_stream") or {}).get("world_size"))
    return None if found is None else int(found)


def saved_global_batch(state: dict) -> int | None:
    """The global batch (per-rank batch x accumulation x ranks) a checkpoint was trained with, None if unknown."""
    if state.get("global_batch") is not None:
        return int(state["global_batch"])
    optim, world = (state.get("config") or {}).get("optim") or {}, saved_world_size(state)
    if world is None or "batch_size" not in optim:
        return None
    return int(optim["batch_size"]) * int(optim.get("accum_steps", 1)) * world


def check_resume_world(path: Path, state: dict, world_size: int, global_batch: int, resume: str | None,
                       allow: bool = False, warn: bool = True) -> None:
    """``--resume latest`` continues the run in the folder exactly, which only its own number of ranks
    does: on another the global batch changes (optim.batch_size is per rank) and the rest of the epoch
    is re-cut over the new ranks, so it stops unless ``allow`` (``--allow-world-size-change``). An
    explicit checkpoint path is a deliberate start from it and goes on. A checkpoint that does not say
    its ranks is taken as trained on this run's (said once, unless ``warn`` is false: the other ranks)."""
    saved = saved_world_size(state)
    if saved is None:
        if warn and state.get("batch_in_epoch"):
            log.warning("warning: %s does not record the number of ranks it was trained on (written by an older "
                        "holiclip); taken as this run's %d: if it was another, the rest of epoch %d is not its exact "
                        "continuation", path, world_size, state["epoch"])
        return
    if saved == world_size or allow or resume != "latest":
        return
    old_batch = saved_global_batch(state)
    raise CheckpointError(
        f"{path} was trained on {ranks(saved)} (global batch {old_batch if old_batch is not None else '?'}); this "
        f"run has {ranks(world_size)} (global batch {global_batch}, optim.batch_size being per rank): --resume "
        f"latest continues a run exactly on its own {ranks(saved)} only. Launch it on {saved}, or pass "
        "--allow-world-size-change (from Python: train(cfg, resume='latest', allow_world_size_change=True)) to go "
        f"on over {ranks(world_size)} with the samples of the epoch not yet trained")


def ranks(n: int) -> str:
    return f"{n} rank{'' if n == 1 else 's'}"


def prepare_run_folder(out: Path, resume: str | None, overwrite: bool) -> None:
    """Stops a run that would mix with the run already in ``out``; with ``overwrite`` deletes that run's
    outputs (RUN_OUTPUTS) first. Run on rank 0 only."""
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    own = resume and resume != "latest" and _in_folder(Path(resume), ckpt_dir)
    if overwrite:
        if resume == "latest":
            raise RunFolderError(f"--overwrite starts the run in {out} over and --resume latest continues it: "
                                 "pass one of them")
        if own:
            raise RunFolderError(f"--overwrite would delete {resume}, the checkpoint to resume from: "
                                 f"copy it out of {ckpt_dir} first, or leave out --overwrite")
        removed = []
        for name in RUN_OUTPUTS:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        if removed:
            log.warning("--overwrite: deleted the previous run's %s in %s", ", ".join(removed), out)
        return
    found = list_checkpoints(ckpt_dir)
    held = [f"checkpoints up to step {_step_of(found[-1])}"] if found else []
    if (out / "model").exists():
        held.append("a trained model in model/")
    if not held or (resume == "latest" and found) or own:
        return
    ways = "Train into another folder (run.out=...)" if resume == "latest" else (
        "Continue it with --resume latest (from Python: train(cfg, resume='latest')), train into another folder "
        "(run.out=...)")
    raise RunFolderError(
        f"run folder {out} already holds a run ({', '.join(held)}); a new run there would be mixed with it. "
        f"{ways}, or pass --overwrite (overwrite=True) to delete that run's checkpoints, metrics, TensorBoard "
        "logs and model first"
    )

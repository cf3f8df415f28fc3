"""Metrics to ``metrics.jsonl``, TensorBoard and Weights & Biases (``run.report_to``), plus a tqdm progress bar."""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from tqdm import tqdm

from ..io import atomic_path, jsonl_rows

log = logging.getLogger(__name__)


def _with_step(row: dict, where: str) -> tuple[int, dict]:
    try:
        return int(row["step"]), row
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{where}: no integer 'step'") from None


WANDB_ID_FILE = "wandb-run-id"  # in the run folder: a resumed run goes on in the same wandb run


def open_wandb(out: Path, project: str, name: str | None, config: dict, start_step: int):
    """A wandb run for the run folder ``out``: a new one (its id kept in ``out/wandb-run-id``), or,
    when the folder holds an id (a resumed run), that run continued. Its files go to $WANDB_DIR,
    else ``out/wandb``; WANDB_MODE=offline works without a network (``wandb sync`` uploads later)."""
    from holiclip._extras import require

    require("wandb", "wandb", "Weights & Biases logging (run.report_to=[wandb])")
    import wandb

    out = Path(out)
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() and start_step > 0 else None
    if run_id is None:
        run_id = uuid.uuid4().hex[:12]  # wandb ids: letters and digits
        id_file.write_text(run_id + "\n")
    where = None if os.environ.get("WANDB_DIR") else str(out)
    if where:
        (out / "wandb").mkdir(exist_ok=True)
    return wandb.init(project=project, name=name or out.resolve().name, id=run_id, resume="allow", config=config,
                      dir=where)


class MetricLogger:
    """``start_step``: the step the run starts (or resumes) at. Rows and TensorBoard events after it
    were logged by an interrupted run after its last checkpoint; they are dropped, since this run
    logs those steps again (each step once in ``metrics.jsonl``). ``wandb``: the settings of
    :func:`open_wandb` (project, name, config), or None for no wandb run."""

    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True, start_step: int = 0,
                 wandb: dict | None = None):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.writer = None
        self.wandb = None
        self.last_row = self._keep_until(start_step) if enabled else None
        if enabled and wandb is not None:
            self.wandb = open_wandb(Path(out), start_step=start_step, **wandb)
        if enabled and tensorboard:
            from holiclip._extras import MissingExtra, require

            try:
                require("tensorboard", "train", "TensorBoard logging (run.tensorboard)")
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the earlier run's events from step start_step + 1 on
                self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1)
            except MissingExtra as err:  # optional: metrics.jsonl is still written
                log.warning("%s; or leave tensorboard out of run.report_to (run.tensorboard=false)", err)

    def _keep_until(self, step: int) -> dict | None:
        """Rewrites metrics.jsonl (atomically) without rows after ``step``; returns the last row kept."""
        if not self.path.exists():
            return None
        rows: dict[int, dict] = {}
        unreadable: list[str] = []  # e.g. a row cut short when the run was killed
        read = later = 0
        for _, (row_step, row) in jsonl_rows(self.path, _with_step, on_error="skip", skipped=unreadable.append):
            read += 1
            if row_step > step:
                later += 1
            else:
                rows[row_step] = row  # a step logged twice (older versions): the later row stands
        torn = len(unreadable)
        if len(rows) != read + torn:
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for _, r in sorted(rows.items())), encoding="utf-8")
            repeated = read - len(rows) - later
            parts = {f"{later} row(s) after step {step} (logged after the checkpoint this run starts from)": later,
                     f"{torn} unreadable row(s)": torn, f"{repeated} repeated step(s)": repeated}
            log.warning("%s: dropped %s", self.path, ", ".join(k for k, n in parts.items() if n))
        return rows[max(rows)] if rows else None

    def progress(self, total: int, initial: int = 0, disable: bool = False):
        return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable or not self.enabled,
                    dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

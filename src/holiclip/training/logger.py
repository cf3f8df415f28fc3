"""Metrics to ``metrics.jsonl`` (and TensorBoard when installed) plus a tqdm progress bar."""
from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


class MetricLogger:
    def __init__(self, out: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def progress(self, total: int, initial: int = 0, disable: bool = False):
        return tqdm(total=total, initial=initial, desc="train", unit="step", disable=disable or not self.enabled,
                    dynamic_ncols=True)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

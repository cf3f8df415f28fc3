"""Where a run stands, read from its folder while it trains: metrics.jsonl, config.yaml and
checkpoints/ only (no torch: ``holiclip runs`` answers at once, beside a running job)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..io import jsonl_rows

RECENT_ROWS = 5  # the logged rows whose throughput the ETA averages


@dataclass
class RunStatus:
    path: Path
    step: int = 0
    total: int | None = None  # optim.steps
    eta_s: float | None = None  # from the recent rows' samples_per_s_per_device
    samples_per_s: float | None = None
    last: dict = field(default_factory=dict)  # the last logged row's training metrics
    last_eval: dict = field(default_factory=dict)  # the last row with eval/... metrics
    checkpoints: list[str] = field(default_factory=list)
    model: bool = False  # model/ written: the run finished
    updated_s: float | None = None  # seconds since metrics.jsonl was last written
    skipped_rows: int = 0  # rows that did not parse (one being written, a torn tail)


def _eta(rows: list[dict], step: int, total: int, cfg: dict) -> tuple[float | None, float | None]:
    """Seconds left: the steps left times the samples of a step per device, over the recent rows'
    mean samples/s per device (the ranks drop out: each trains its share of a global batch)."""
    recent = [r for r in rows if isinstance(r.get("samples_per_s_per_device"), (int, float))][-RECENT_ROWS:]
    rates = [r["samples_per_s_per_device"] for r in recent if r["samples_per_s_per_device"] > 0]
    if not rates:
        return None, None
    optim = cfg.get("optim") or {}
    per_device_step = int(optim.get("batch_size", 1)) * int(optim.get("accum_steps", 1))
    rate = sum(rates) / len(rates)
    overall = sum(r.get("samples_per_s", 0.0) for r in recent) / len(recent)
    return max(0, total - step) * per_device_step / rate, overall


def run_status(run_dir: str | Path) -> RunStatus:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run folder")
    config_path, metrics_path = path / "config.yaml", path / "metrics.jsonl"
    if not config_path.exists() and not metrics_path.exists():
        raise FileNotFoundError(f"{path}: not a run folder (no config.yaml or metrics.jsonl)")
    try:
        cfg = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    except yaml.YAMLError as err:
        raise ValueError(f"{config_path}: not readable YAML ({err})") from None
    cfg = cfg if isinstance(cfg, dict) else {}
    status = RunStatus(path, total=(cfg.get("optim") or {}).get("steps"))
    skipped: list[str] = []
    rows = [row for _, row in jsonl_rows(metrics_path, on_error="skip", skipped=skipped.append)] \
        if metrics_path.exists() else []
    rows = [r for r in rows if isinstance(r.get("step"), int)]
    status.skipped_rows = len(skipped)
    if rows:
        status.step = rows[-1]["step"]
        trained = [r for r in rows if any(k != "step" and not k.startswith("eval/") for k in r)]
        status.last = {k: v for k, v in (trained or rows)[-1].items() if not k.startswith("eval/")}
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        if evals:
            status.last_eval = {"step": evals[-1]["step"],
                                **{k: v for k, v in evals[-1].items() if k.startswith("eval/")}}
        status.updated_s = time.time() - metrics_path.stat().st_mtime
    if status.total:
        status.eta_s, status.samples_per_s = _eta(rows, status.step, int(status.total), cfg)
    status.checkpoints = sorted(p.name for p in (path / "checkpoints").glob("step_*.pt"))
    status.model = (path / "model").is_dir()
    return status


def duration(seconds: float) -> str:
    """``3d 4h``, ``2h 05m``, ``4m 10s``, ``12s``."""
    s = int(round(seconds))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {s % 60:02d}s" if m else f"{s}s"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe(status: RunStatus) -> list[str]:
    """The lines ``holiclip runs`` prints for one run."""
    s = status
    total = f" / {s.total}" + (f" ({100 * s.step / s.total:.0f}%)" if s.total else "") if s.total else ""
    if s.model and s.total and s.step >= s.total:
        where = "finished"
    elif s.eta_s is not None:
        where = f"ETA {duration(s.eta_s)} at {s.samples_per_s:.0f} samples/s"
    else:
        where = "ETA unknown (no throughput logged yet)"
    updated = f", metrics written {duration(s.updated_s)} ago" if s.updated_s is not None else ""
    lines = [f"{s.path}: step {s.step}{total}, {where}{updated}"]
    keys = ("loss", "lr", "logit_scale", "samples_per_s", "data_wait", "epoch")
    shown = [f"{k} {_value(s.last[k])}" for k in keys if k in s.last]
    if shown:
        lines.append(f"  last (step {s.last['step']}): " + ", ".join(shown))
    if s.last_eval:
        items = [f"{k.removeprefix('eval/')} {_value(v)}" for k, v in s.last_eval.items() if k != "step"]
        lines.append(f"  eval (step {s.last_eval['step']}): " + ", ".join(items))
    ckpts = ", ".join(s.checkpoints) if s.checkpoints else "none"
    lines.append(f"  checkpoints: {ckpts}" + ("; model/ written" if s.model else ""))
    if s.skipped_rows:
        lines.append(f"  ({s.skipped_rows} metrics row(s) unreadable, skipped)")
    return lines


def find_runs(root: str | Path = "runs") -> list[Path]:
    """The run folders under ``root`` (any depth): those holding a config.yaml or metrics.jsonl."""
    root = Path(root)
    return sorted({p.parent for name in ("config.yaml", "metrics.jsonl") for p in root.rglob(name)})

"""Training configuration: a YAML file plus ``section.key=value`` overrides.

Baselines are configurations, not code: CLIP is ``model.branches=[global]`` with
``data.slots=[web]``; O2M is one branch with all slots; Holistic CLIP is one branch per slot.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelCfg:
    name: str = "holi-tiny"
    encoder: str = "cls"  # cls (Psi_CLS) | mlp (Psi_MLP)
    branches: list[str] | None = None  # None: one branch per text slot (H = M)
    mlp_layers: int | None = None
    pretrained: str | None = None
    lock_text: bool = False
    grad_checkpointing: bool = False


@dataclass
class DataCfg:
    train: str = ""  # JSONL / CSV / webdataset shards
    slots: list[str] = field(default_factory=lambda: ["web"])  # text slots, in branch order
    list_slots: list[str] | None = None  # names for the research format's caption list
    missing_slot_policy: str = "error"  # error | drop | fill:<slot>
    on_bad_row: str = "error"  # error | skip (malformed manifest lines)
    max_bad_fraction: float = 0.01  # unreadable images tolerated before the run stops
    workers: int = 0
    cache_images: bool = False  # decode all images once (small datasets)
    text_cache: str = "auto"  # auto | off: cache a frozen text trunk's outputs per unique text
    augment: bool = True  # open_clip's training transform (RandomResizedCrop, scale 0.9-1.0), as the research code
    max_image_pixels: int = 89_478_485  # larger images are skipped and counted (PIL's own bomb limit)


@dataclass
class LossCfg:
    fused_weight: float = 0.0  # ours: hybrid with O2M on the fused embedding
    free_matching: str = "paired"  # paired | research: text-to-image logits of free-matched slots
    diversity_margin: float | None = None  # research-code regulariser (e.g. 0.7)
    diversity_weight: float = 1.0
    local_loss: bool = True
    gather_with_grad: bool = True


@dataclass
class OptimCfg:
    batch_size: int = 32  # per rank
    steps: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    accum_steps: int = 1


@dataclass
class RunCfg:
    out: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16 | amp
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    max_steps_this_run: int | None = None  # stop early (tests simulate an interruption)
    cache_dir: str = ".cache/holiclip"  # text-feature caches shared between runs


@dataclass
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)

    @property
    def branches(self) -> list[str]:
        return list(self.model.branches) if self.model.branches else list(self.data.slots)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set(cfg: Any, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key or not hasattr(cfg, section) or not hasattr(getattr(cfg, section), key):
        valid = [f"{s.name}.{k.name}" for s in dataclasses.fields(cfg) for k in dataclasses.fields(getattr(cfg, s.name))]
        raise KeyError(f"unknown config key {dotted!r}; valid keys: {', '.join(valid)}")
    target = getattr(cfg, section)
    annotation = str(next(f.type for f in dataclasses.fields(target) if f.name == key))
    setattr(target, key, _coerce(value, annotation, dotted))


def _coerce(value: Any, annotation: str, dotted: str) -> Any:
    """YAML reads 1e-6 as a string and users type numbers on the command line: fix by field type."""
    if value is None:
        return None
    try:
        if annotation.startswith("float") and not isinstance(value, bool):
            return float(value)
        if annotation.startswith("int") and not isinstance(value, bool):
            if float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if annotation.startswith("tuple") and isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {dotted!r}: {value!r} is not a valid {annotation}") from None
    if annotation == "bool" and not isinstance(value, bool):
        raise ValueError(f"config key {dotted!r}: {value!r} is not true/false")
    return value


def from_dict(data: dict, origin: str = "<dict>") -> TrainConfig:
    cfg = TrainConfig()
    for section, values in (data or {}).items():
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: section {section!r} must be a mapping")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) then ``section.key=value`` overrides (values parsed as YAML)."""
    data = {}
    if path:
        data = yaml.safe_load(Path(path).read_text()) or {}
    cfg = from_dict(data, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, _, raw = item.partition("=")
        _set(cfg, key.strip(), yaml.safe_load(raw))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.model.encoder not in ("cls", "mlp"):
        raise ValueError(f"model.encoder must be cls or mlp, got {cfg.model.encoder!r}")
    if not cfg.data.slots:
        raise ValueError("data.slots must name at least one text slot")
    if cfg.run.precision not in ("auto", "fp32", "bf16", "amp"):
        raise ValueError(f"run.precision must be auto|fp32|bf16|amp, got {cfg.run.precision!r}")
    if cfg.optim.accum_steps < 1 or cfg.optim.batch_size < 1 or cfg.optim.steps < 1:
        raise ValueError("optim.accum_steps, optim.batch_size and optim.steps must be >= 1")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    data = cfg.to_dict()
    data["optim"]["betas"] = list(data["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))

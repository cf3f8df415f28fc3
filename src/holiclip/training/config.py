"""Training configuration: a YAML file plus ``section.key=value`` overrides.

The dataclasses below are the schema: OmegaConf checks every value's type against them, and
:func:`validate` checks ranges and choices, so a typo stops the run with a message naming the
file:line or override and the key instead of training something else.

Baselines are configurations, not code: CLIP is ``model.branches=[global]`` with
``data.slots=[web]``; O2M is one branch with all slots; Holistic CLIP is one branch per slot.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..io import cache_root
from .presets import names_hint, shipped_path



def _cache_path(sub: str = "") -> str:
    """``${cache:emoji-default/train.jsonl}`` in a config: a path under holiclip's cache root (the
    shipped demo configs name the benchmark data the demo builds there)."""
    return str(cache_root() / sub)


# OmegaConf 2.4 renamed register_new_resolver (2.3) to register_resolver
_new_api = "annotation_validation" in inspect.signature(OmegaConf.register_resolver).parameters
(OmegaConf.register_resolver if _new_api else OmegaConf.register_new_resolver)("cache", _cache_path, replace=True)


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
    train: str = ""  # JSONL / CSV, or webdataset shards (a pattern, folder, "::" or YAML list, URL): streamed
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
    # streamed webdataset shards (data.train a .tar pattern, folder of .tar files, list or URL)
    shuffle_buffer: int = 5000  # samples each stream shuffles through (seeded per epoch, rank, worker)
    train_num_samples: int | None = None  # samples per epoch, as open_clip's --train-num-samples (null: all)
    resampled: bool = False  # draw shards with replacement from a seeded generator (epoch: train_num_samples)


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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16 | amp
    log_every: int = 10
    save_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = True  # the default of report_to (null): [tensorboard] when true, [] when false
    # where metrics go besides metrics.jsonl (as open_clip's --report-to): tensorboard, wandb
    report_to: list[str] | None = None
    name: str | None = None  # the tracker's run name (default: the run folder's name)
    wandb_project: str = "holiclip"
    progress: bool = True
    max_steps_this_run: int | None = None  # stop early (tests simulate an interruption)
    # text-feature caches shared between runs: <cache root>/text-features (holiclip.io.cache_root)
    cache_dir: str = field(default_factory=lambda: str(cache_root() / "text-features"))
    compile: bool = False  # torch.compile the model (on CPU inductor needs a C++ compiler, g++ or $CXX)
    dist_timeout: int = 1800  # seconds a collective may wait under torchrun before the run fails


@dataclass
class EvalSetCfg:
    """One evaluation set (the options of ``holiclip eval TASK``)."""
    task: str = "retrieval"  # retrieval | long-retrieval | zeroshot
    # retrieval: our JSONL / CSV / shards, COCO, Karpathy, long captions; zeroshot: an ImageFolder;
    # both: a CLIP_benchmark webdataset folder (test/ or train/ of shards, classnames.txt ...)
    data: str = ""
    name: str | None = None  # the metrics' prefix eval/<name>/ (default: <task>-<data file stem>)
    fmt: str = "auto"  # retrieval formats, as --format
    image_root: str | None = None
    split: str = "test"  # Karpathy split; CLIP_benchmark webdataset: the split folder
    slots: list[str] | None = None
    text_field: str | None = None
    long_text: str = "truncate"
    classnames: str | None = None  # zeroshot: imagenet | a .txt/.json file (default: folder names)
    templates: str | None = None  # openai | simple | a file (default: the set's own templates file, else openai)
    limit: int | None = None


@dataclass
class EvalCfg:
    """Evaluation during training (as open_clip's --val-data / --zeroshot-frequency): every ``every``
    steps and at the end, each set fused (each mode of ``fusion``) and, with ``per_branch``, per branch."""
    every: int | None = None  # null: no evaluation during training
    sets: list[EvalSetCfg] = field(default_factory=list)
    fusion: list[str] = field(default_factory=lambda: ["mean"])
    per_branch: bool = True
    batch_size: int = 64  # images per forward pass on each rank


@dataclass
class TrainConfig:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    run: RunCfg = field(default_factory=RunCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)

    @property
    def branches(self) -> list[str]:
        return list(self.model.branches) if self.model.branches else list(self.data.slots)

    def to_dict(self) -> dict:
        """Plain JSON/YAML types (tuples as lists), so a saved copy compares equal to a fresh one."""
        return {
            section: {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
            for section, values in dataclasses.asdict(self).items()
        }


class ConfigError(ValueError):
    """A bad config value or key; the message names the file:line or override and the key."""


class UnknownKeyError(ConfigError, KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


# Top-level sections a config file may carry for other tools (the demo's label); training ignores them.
EXTRA_SECTIONS = ("demo",)

_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
_HINTS = {name: typing.get_type_hints(cls) for name, cls in _SECTIONS.items()}
_SET_HINTS = typing.get_type_hints(EvalSetCfg)
EVAL_TASKS = ("retrieval", "long-retrieval", "zeroshot")
REPORT_TO = ("tensorboard", "wandb")

ON_BAD_ROW = ("error", "skip")
TEXT_CACHE = ("auto", "off")
PRECISIONS = ("auto", "fp32", "bf16", "amp")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
FREE_MATCHING = ("paired", "research")


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _describe(hint: Any) -> str:
    base, optional = _unwrap(hint)
    origin = typing.get_origin(base)
    if origin is tuple:
        text = f"a list of {len(typing.get_args(base))} numbers"
    elif origin is list:
        text = "a list of names (or one name)"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]
    return text + (" or null" if optional else "")


def _eval_sets(value: Any, where: str) -> list[dict]:
    """``eval.sets``: a list of mappings, each with EvalSetCfg's keys (checked one by one, as sections' keys)."""
    value = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(value):
        example = f"a mapping with at least data (and task: {'|'.join(EVAL_TASKS)}), e.g. {{task: retrieval, data: val.jsonl}}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: eval.sets[{i}] must be {example}; got {item!r}")
        for key, sub in item.items():
            if key not in _SET_HINTS:
                raise _unknown(where, f"eval.sets[{i}].{key}", [f"eval.sets[{i}].{k}" for k in _SET_HINTS], "key")
            dotted, hint = f"eval.sets[{i}].{key}", _SET_HINTS[key]
            node = OmegaConf.structured(EvalSetCfg)
            try:
                OmegaConf.update(node, key, _normalise(dotted, hint, sub, None, where), merge=False)
            except OmegaConfBaseException:
                raise ConfigError(f"{where}: {dotted} must be {_describe(hint)}, got {sub!r}") from None
            item[key] = node[key]
        if not item.get("data"):
            raise ConfigError(f"{where}: eval.sets[{i}] must be {example}; got {item!r}")
        if item.get("task", "retrieval") not in EVAL_TASKS:
            raise ConfigError(f"{where}: eval.sets[{i}].task must be one of {'|'.join(EVAL_TASKS)}, got {item['task']!r}")
        out.append(OmegaConf.merge(OmegaConf.structured(EvalSetCfg), item))
    return out


def _normalise(dotted: str, hint: Any, value: Any, raw: str | None, where: str) -> Any:
    """What OmegaConf's type check does not cover: one name for a list field, fixed tuple lengths,
    integral floats (``1e5`` steps), strict booleans, and text that YAML read as a number."""
    base, _ = _unwrap(hint)
    origin = typing.get_origin(base)
    if value is None:
        return None
    if dotted == "eval.sets":
        return _eval_sets(value, where)
    if dotted == "data.train" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "::".join(value)  # a list of shards or shard patterns, written as webdataset's "::" list
    bad = ConfigError(f"{where}: {dotted} must be {_describe(hint)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            value = [value]  # data.slots=web means [web], not the letters w, e, b
        if any(isinstance(v, (list, dict)) or v is None for v in value):
            raise bad
        if origin is tuple and len(value) != len(typing.get_args(base)):
            raise bad
    elif base is bool and not isinstance(value, bool):
        raise bad
    elif base is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    elif base is str and raw is not None and not isinstance(value, (str, list)) and not raw.lstrip().startswith("{"):
        value = raw.strip()  # run.out=1e3 is the folder "1e3", not "1000.0"; fill: is not a mapping
    return value


def _unknown(where: str, dotted: str, choices: list[str], what: str) -> UnknownKeyError:
    close = difflib.get_close_matches(dotted, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UnknownKeyError(f"{where}: unknown config {what} {dotted!r}{hint}; valid: {', '.join(choices)}")


def _apply(cfg: DictConfig, data: Any, where, origins: dict[str, str], raw: str | None = None) -> None:
    """Sets ``{section: {key: value}}`` on the typed config; ``where(dotted)`` names the source."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where('')}: a config must be a mapping of sections ({', '.join(_SECTIONS)})")
    for section, values in data.items():
        if section in EXTRA_SECTIONS and raw is None:
            continue
        if section not in _SECTIONS:
            raise _unknown(where(str(section)), str(section), list(_SECTIONS), "section")
        if not isinstance(values, dict):
            raise ConfigError(f"{where(section)}: {section} is a section: give its keys "
                              f"(e.g. {section}.{next(iter(_HINTS[section]))}=...), got {values!r}")
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in _HINTS[section]:
                raise _unknown(where(dotted), dotted, [f"{section}.{k}" for k in _HINTS[section]], "key")
            hint = _HINTS[section][key]
            value = _normalise(dotted, hint, value, raw, where(dotted))
            try:
                OmegaConf.update(cfg, dotted, value, merge=False)
            except OmegaConfBaseException:
                raise ConfigError(f"{where(dotted)}: {dotted} must be {_describe(hint)}, got {value!r}") from None
            origins[dotted] = where(dotted)


def _yaml_lines(text: str) -> dict[str, int]:
    """``section.key`` -> line number in a YAML file, for messages."""
    lines = {}
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            lines[str(key.value)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for sub, _ in value.value:
                    lines[f"{key.value}.{sub.value}"] = sub.start_mark.line + 1
    return lines


def _finish(cfg: DictConfig, origins: dict[str, str]) -> TrainConfig:
    try:
        out = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. a ${...} interpolation that does not resolve
        key = str(err.full_key)
        raise ConfigError(f"{origins.get(key, 'config')}: {key}: {str(err).splitlines()[0]}") from None
    validate(out, origins)
    return out


def from_dict(data: dict, origin: str = "<dict>") -> TrainConfig:
    cfg, origins = OmegaConf.structured(TrainConfig), {}
    _apply(cfg, data or {}, lambda _: origin, origins)
    return _finish(cfg, origins)


def find_config(name_or_path: str | Path) -> Path:
    """A YAML file that exists, else a shipped config by name (training/presets.py)."""
    path = shipped_path(name_or_path)
    if path is None:
        raise ConfigError(f"{name_or_path}: no such config file, and no shipped config of that name; "
                          f"shipped: {names_hint()}")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file or shipped config name (optional), then ``section.key=value`` overrides, checked
    against the dataclasses above."""
    cfg, origins = OmegaConf.structured(TrainConfig), {}
    if path:
        path = find_config(path)
        try:
            data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            lines = _yaml_lines(Path(path).read_text())
        except yaml.MarkedYAMLError as err:  # syntax error or duplicate key
            context = f" ({err.context})" if err.context else ""
            raise ConfigError(f"{path}:{err.problem_mark.line + 1}: invalid YAML: {err.problem}{context}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not a YAML text file: {err}") from None
        _apply(cfg, data, lambda key: f"{path}:{lines[key]}" if key in lines else str(path), origins)
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            data = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key.strip()}={raw}"]), resolve=False)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(err, 'problem', err)}); "
                              f"YAML-quote it inside the shell's quotes: \"{key.strip()}='...'\"") from None
        _apply(cfg, data, lambda _: f"override {item!r}", origins, raw=raw)
    return _finish(cfg, origins)


def validate(cfg: TrainConfig, origins: dict[str, str] | None = None) -> None:
    """Value checks the types cannot express; each error names the key, the allowed values and
    where the value came from."""
    origins = origins or {}

    def check(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            section, _, name = key.partition(".")
            value = getattr(getattr(cfg, section), name)
            where = f"{origins[key]}: " if key in origins else ""
            raise ConfigError(f"{where}{key} must be {allowed}, got {value!r}")

    def one_of(key: str, choices: tuple[str, ...], value: str) -> None:
        check(value in choices, key, "one of " + "|".join(choices))

    def names(key: str, values: list[str] | None, optional: bool) -> None:
        check((optional and values is None) or bool(values) and all(v.strip() for v in values)
              and len(set(values)) == len(values), key, "a list of distinct, non-empty names"
              + (" (or null)" if optional else ""))

    def finite(x: float | None) -> bool:
        return x is None or math.isfinite(x)

    m, d, lo, o, r = cfg.model, cfg.data, cfg.loss, cfg.optim, cfg.run
    from ..models import ENCODERS, FUSION_MODES  # not models.branches: checking a config stays free of torch

    one_of("model.encoder", ENCODERS, m.encoder)
    names("model.branches", m.branches, optional=True)
    check(m.mlp_layers is None or m.mlp_layers >= 1, "model.mlp_layers", ">= 1 (or null for the default)")
    names("data.slots", d.slots, optional=False)
    names("data.list_slots", d.list_slots, optional=True)
    policy = d.missing_slot_policy
    check(policy in ("error", "drop") or policy.startswith("fill:") and len(policy) > 5,
          "data.missing_slot_policy", "one of error|drop|fill:<slot>")
    one_of("data.on_bad_row", ON_BAD_ROW, d.on_bad_row)
    check(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "in [0, 1]")
    check(d.workers >= 0, "data.workers", ">= 0")
    one_of("data.text_cache", TEXT_CACHE, d.text_cache)
    check(d.max_image_pixels >= 1, "data.max_image_pixels", ">= 1")
    check(d.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0 (0 or 1: no shuffling within a stream)")
    check(d.train_num_samples is None or d.train_num_samples >= 1, "data.train_num_samples", ">= 1 (or null: all)")
    check(0.0 <= lo.fused_weight <= 1.0, "loss.fused_weight", "in [0, 1]")
    one_of("loss.free_matching", FREE_MATCHING, lo.free_matching)
    check(finite(lo.diversity_margin), "loss.diversity_margin", "a finite number or null")
    check(lo.diversity_weight >= 0.0 and finite(lo.diversity_weight), "loss.diversity_weight", ">= 0")
    for key in ("batch_size", "steps", "accum_steps"):
        check(getattr(o, key) >= 1, f"optim.{key}", ">= 1")
    check(o.lr > 0.0 and finite(o.lr), "optim.lr", "> 0")
    check(o.weight_decay >= 0.0 and finite(o.weight_decay), "optim.weight_decay", ">= 0")
    check(all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", "two numbers in [0, 1), e.g. [0.9, 0.98]")
    check(o.eps > 0.0 and finite(o.eps), "optim.eps", "> 0")
    check(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "in [0, 1]")
    check(o.grad_clip is None or o.grad_clip > 0.0 and finite(o.grad_clip), "optim.grad_clip",
          "> 0 (or null: no clipping)")
    check(bool(r.out.strip()), "run.out", "a folder name")
    check(0 <= r.seed < 2**32, "run.seed", "in [0, 2**32)")
    check(r.device in DEVICES[:3] or re.fullmatch(r"cuda:\d+", r.device) is not None, "run.device",
          "one of " + "|".join(DEVICES))
    one_of("run.precision", PRECISIONS, r.precision)
    check(r.log_every >= 1, "run.log_every", ">= 1")
    check(r.save_every >= 1, "run.save_every", ">= 1")
    check(r.keep_checkpoints >= 0, "run.keep_checkpoints", ">= 0 (0 keeps all)")
    check(r.max_steps_this_run is None or r.max_steps_this_run >= 1, "run.max_steps_this_run", ">= 1 (or null)")
    check(r.dist_timeout >= 1, "run.dist_timeout", ">= 1 (seconds)")
    check(r.report_to is None or all(t in REPORT_TO for t in r.report_to), "run.report_to",
          "a list of " + "|".join(REPORT_TO) + " (or [] for metrics.jsonl only, null for [tensorboard])")
    check(r.report_to is None or r.tensorboard or "tensorboard" not in r.report_to, "run.report_to",
          "without tensorboard when run.tensorboard=false (run.report_to decides; leave run.tensorboard out)")
    e = cfg.eval
    check(e.every is None or e.every >= 1, "eval.every", ">= 1 (or null: no evaluation during training)")
    check(e.every is None or bool(e.sets), "eval.every", "null when eval.sets is empty (nothing to evaluate)")
    check(all(f in FUSION_MODES for f in e.fusion) and bool(e.fusion), "eval.fusion", "a list of "
          + "|".join(FUSION_MODES))
    check(e.batch_size >= 1, "eval.batch_size", ">= 1")
    labels = eval_set_names(cfg)
    check(len(set(labels)) == len(labels), "eval.sets", f"sets of distinct names (give each a name:), got {labels}")


def reporters(cfg: TrainConfig) -> list[str]:
    """Where metrics go besides metrics.jsonl: run.report_to, else [tensorboard] when run.tensorboard."""
    if cfg.run.report_to is not None:
        return list(cfg.run.report_to)
    return ["tensorboard"] if cfg.run.tensorboard else []


def eval_set_names(cfg: TrainConfig) -> list[str]:
    """Each evaluation set's name, the prefix of its metrics (``eval/<name>/...``)."""
    return [s.name or f"{s.task}-{Path(s.data.rstrip('/')).stem}" for s in cfg.eval.sets]


def with_defaults(saved: dict) -> dict:
    """A saved config dict with the keys it lacks (settings added since it was written) at their
    defaults, so that an older run compares equal to the same run configured today."""
    defaults = TrainConfig().to_dict()
    out = {section: dict(values) for section, values in defaults.items()}
    for section, values in saved.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """The resolved config; ``load_config`` reads it back unchanged."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

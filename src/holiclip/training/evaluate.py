"""Evaluation during training (``eval.every``, as open_clip's --val-data / --zeroshot-frequency): the
tasks of ``holiclip eval`` on the model being trained, spread over the ranks.

Every rank encodes its share of each set's images, texts and class prompts; the features are
gathered, and every rank computes the same metrics from them, so no rank waits on a rank-0 pass.
Each gather is preceded by the host exchange of stop flags (training/distributed.py), and the
evaluation ends with one more: an error on one rank (an unreadable set, a failed forward) stops
every rank with its message, wherever in the evaluation it happened."""
from __future__ import annotations

import torch

from ..evaluation.features import Shard
from ..evaluation.loading import EvalModel
from ..evaluation.tasks import run_task
from ..models.registry import get_transforms
from .config import EvalSetCfg, TrainConfig, eval_set_names
from .distributed import DistInfo, all_gather_objects, exchange

RETRIEVAL_OPTIONS = ("fmt", "image_root", "split", "slots", "text_field", "long_text", "limit")
ZEROSHOT_OPTIONS = ("classnames", "templates", "limit", "split")


def shard_for(dist: DistInfo) -> Shard | None:
    if not dist.enabled:
        return None

    def gather(obj, error):
        exchange(dist, [], error)  # a failed rank stops every rank here, before the gather it would miss
        return all_gather_objects(dist, obj)

    return Shard(dist.rank, dist.world_size, gather)


def set_options(s: EvalSetCfg) -> dict:
    """The options of ``holiclip eval TASK`` an evaluation set gives."""
    names = ZEROSHOT_OPTIONS if s.task == "zeroshot" else RETRIEVAL_OPTIONS
    return {k: getattr(s, k) for k in names}


def metric_names(name: str, result: dict) -> dict[str, float]:
    """``eval/<set>/<row label>/<column>``: the rows ``holiclip eval`` prints (per branch, then each fusion)."""
    return {f"eval/{name}/{row['branches']}/{col}": row[col] for row in result["rows"] for col in result["columns"][1:]}


def evaluate(model, tokenizer, cfg: TrainConfig, dist: DistInfo, device: str) -> dict[str, float]:
    """Every evaluation set of ``cfg.eval`` on ``model`` (the unwrapped module, no DDP or compile),
    fused with each of ``eval.fusion`` and, with ``eval.per_branch``, per branch; in fp32, as
    ``holiclip eval`` computes them. Called on every rank; every rank returns the same metrics."""
    shard = shard_for(dist)
    em = EvalModel(model, tokenizer, get_transforms(model), cfg.model.name, "training", torch.device(device))
    was_training, out, error = model.training, {}, None
    model.eval()
    try:
        for name, s in zip(eval_set_names(cfg), cfg.eval.sets):
            result = run_task(s.task, em, s.data, fusion=list(cfg.eval.fusion), per_branch=cfg.eval.per_branch,
                              batch_size=cfg.eval.batch_size, progress=False, shard=shard, **set_options(s))
            out |= metric_names(name, result)
    except Exception as err:
        if shard is None or shard.shared:  # raised on every rank alike already
            raise
        error = RuntimeError(f"evaluation during training (eval.sets): {type(err).__name__}: {err}")
    finally:
        model.train(was_training)
    if shard is not None:  # the evaluation's last collective: an error after its last gather stops every rank
        exchange(dist, [], error)
    return out

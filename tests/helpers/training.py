"""Training configs for the trainer tests: a tiny model on a tiny dataset, a few steps."""
from __future__ import annotations

from safetensors.torch import load_file

from holiclip.training.config import load_config

SLOTS = "[web,detail,main]"


def cfg_for(tmp_path, data, out, *extra):
    return load_config(None, [
        f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.batch_size=8",
        "optim.steps=6", "optim.warmup_steps=2", "optim.lr=1e-3", f"run.out={out}", "run.log_every=1",
        "run.progress=false", "run.tensorboard=false", "run.save_every=3", f"run.cache_dir={tmp_path}/cache",
        *extra,
    ])


def weights(run):
    return load_file(str(run / "model" / "model.safetensors"))

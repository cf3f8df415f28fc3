"""run.compile: torch.compile of the model trains as eager does, and the saved model is the same;
one graph for repeated calls; compiled DDP with gradient checkpointing on 2 gloo ranks."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

import holiclip
from holiclip.training.trainer import Trainer, read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import cfg_for, weights


# inductor builds each CPU kernel with the C++ compiler: ~20 s with its cache warm (/tmp/torchinductor_*),
# minutes on a cold cache on a loaded 2-core machine
@pytest.mark.timeout(900)
def test_compiled_model_trains_as_eager(tmp_path):
    data = make_dataset(tmp_path, n=16)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile_{compiled}"
        trainer = Trainer(cfg_for(tmp_path, data, out, "optim.steps=2", "optim.warmup_steps=1",
                                  "run.save_every=2", f"run.compile={str(compiled).lower()}"))
        trainer.train()
        # the forward ran through the compiled module; the model it wraps is the one saved
        assert (getattr(trainer.net, "_orig_mod", None) is trainer.model) == compiled
        runs[compiled] = out
    eager, compiled = (read_metrics(runs[c]) for c in (False, True))
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    a, b = weights(runs[False]), weights(runs[True])
    assert a.keys() == b.keys()  # no "_orig_mod." prefix in saved models
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4, msg=k)
    ckpts = [torch.load(r / "checkpoints" / "step_00000002.pt", weights_only=True)["model"].keys() for r in runs.values()]
    assert ckpts[0] == ckpts[1]


def test_compile_without_a_cxx_compiler_says_so(tmp_path):
    cfg = cfg_for(tmp_path, make_dataset(tmp_path, n=8), tmp_path / "run", "run.compile=true", "run.device=cpu")
    # inductor's own patch: monkeypatch's undo leaves config.cpp.cxx missing for later tests
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}):
        with pytest.raises(ValueError, match=r"run.compile=true on CPU: torch.compile needs a C\+\+ compiler"):
            train(cfg)


def test_repeated_calls_compile_one_graph():
    """The Psi_CLS mask is a buffer built with the model: a mask cached in forward made the second
    call recompile."""
    torch.manual_seed(0)
    model = holiclip.create_model("holi-tiny", encoder="cls", branches=["a", "b", "c"]).train()
    size = model.image_size[0] if isinstance(model.image_size, tuple) else model.image_size
    images = torch.randn(2, 3, size, size)
    texts = holiclip.get_tokenizer("holi-tiny")(["a dog"] * 6).view(2, 3, -1)
    torch._dynamo.reset()
    counters.clear()
    net = torch.compile(model, backend="eager")  # dynamo's graphs are what is counted: no code generated
    for _ in range(3):
        net(images=images, texts=texts)["image_features"].sum().backward()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _compiled_ranks(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # AOTAutograd traces forward and backward (checkpointed regions, DDP's graph split) as inductor
    # would, without its C++ builds (minutes here); the trainer's own compile_for is what runs
    real_compile = torch.compile
    torch.compile = lambda net: real_compile(net, backend="aot_eager")
    root, losses = Path(out), {}
    for compiled in (False, True):
        cfg = cfg_for(root, data, root / f"compile_{compiled}", "optim.batch_size=4", "optim.steps=2",
                      "optim.warmup_steps=1", "model.grad_checkpointing=true", "run.dist_timeout=300",
                      f"run.compile={str(compiled).lower()}")
        Trainer(cfg).train()
        losses[compiled] = [m["loss"] for m in read_metrics(root / f"compile_{compiled}")]
    losses["optimize_ddp"] = torch._dynamo.config.optimize_ddp
    (root / f"rank{rank}.json").write_text(json.dumps(losses))
    dist.destroy_process_group()


def test_compiled_ddp_with_gradient_checkpointing_trains_as_eager(tmp_path):
    data = make_dataset(tmp_path, n=16)
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_compiled_ranks, args=(free_port(), str(data), out), nprocs=2, join=True,
                           start_method="fork")
        rank0 = json.loads((Path(out) / "rank0.json").read_text())
    assert rank0["optimize_ddp"] is False  # as open_clip: no graph split at DDP's buckets under checkpointing
    assert len(rank0["true"]) == 2
    assert rank0["true"] == pytest.approx(rank0["false"], rel=1e-4, abs=1e-5)

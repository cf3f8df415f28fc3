"""run.compile: torch.compile of the model trains as eager does, and the saved model is the same."""
from __future__ import annotations

import pytest
import torch
from torch._inductor import config as inductor_config

from holiclip.training.trainer import Trainer, read_metrics, train

from tests.helpers.datasets import make_dataset
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


def test_compile_without_a_cxx_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(inductor_config.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    cfg = cfg_for(tmp_path, make_dataset(tmp_path, n=8), tmp_path / "run", "run.compile=true", "run.device=cpu")
    with pytest.raises(ValueError, match=r"run.compile=true on CPU: torch.compile needs a C\+\+ compiler"):
        train(cfg)

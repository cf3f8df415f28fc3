"""Trainer: overfitting, exact resume, torchrun equivalence, bad inputs, non-finite loss."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from holiclip.data.records import DataError
from holiclip.training import trainer as trainer_mod
from holiclip.training.config import load_config
from holiclip.training.trainer import NonFiniteLoss, read_metrics, train

from tests.helpers.datasets import make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.training import SLOTS, cfg_for, weights


def test_tiny_model_overfits(tmp_path):
    data = make_dataset(tmp_path, n=8)
    cfg = cfg_for(tmp_path, data, tmp_path / "run", "optim.steps=80", "optim.lr=2e-3", "optim.warmup_steps=5",
                  "data.cache_images=true", "optim.weight_decay=0.0")
    train(cfg)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[0] > 1.5  # ~ln(8) at the start
    assert sum(losses[-5:]) / 5 < losses[0] / 10, losses


@pytest.mark.parametrize("encoder", ["cls", "mlp"])
def test_resume_is_bit_identical(tmp_path, encoder):
    data = make_dataset(tmp_path, n=20)  # 2 batches per epoch: resume crosses epochs
    full = cfg_for(tmp_path, data, tmp_path / "full", f"model.encoder={encoder}")
    train(full)
    part = cfg_for(tmp_path, data, tmp_path / "part", f"model.encoder={encoder}", "run.max_steps_this_run=3")
    result = train(part)
    assert result["step"] == 3 and not (tmp_path / "part" / "model").exists()
    resumed = cfg_for(tmp_path, data, tmp_path / "part", f"model.encoder={encoder}")
    assert train(resumed, resume="latest")["step"] == 6
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_images_skipped_then_fail_above_fraction(tmp_path, capsys):
    data = make_dataset(tmp_path, n=16)
    (tmp_path / "img" / "3.png").write_bytes(b"\x89PNG garbage")
    ok = cfg_for(tmp_path, data, tmp_path / "ok", "optim.steps=2", "data.max_bad_fraction=0.2")
    result = train(ok)
    assert result["counters"]["bad"] == 1 and result["counters"]["seen"] == 17
    assert "1 unreadable images skipped" in capsys.readouterr().out
    strict = cfg_for(tmp_path, data, tmp_path / "strict", "optim.steps=2", "data.max_bad_fraction=0.001")
    with pytest.raises(DataError, match=r"(?s)unreadable .*3.png"):
        train(strict)


def test_non_finite_loss_stops_with_message(tmp_path, monkeypatch):
    data = make_dataset(tmp_path, n=8)
    real = trainer_mod.Trainer._forward_loss

    def poisoned(self, batch):
        losses = real(self, batch)
        return {k: v * float("nan") for k, v in losses.items()}

    monkeypatch.setattr(trainer_mod.Trainer, "_forward_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 0: contrastive_loss=nan"):
        train(cfg_for(tmp_path, data, tmp_path / "run"))


def test_unknown_config_key_is_named():
    with pytest.raises(KeyError, match="optim.stepz"):
        load_config(None, ["optim.stepz=3"])
    with pytest.raises(ValueError, match="optim.lr"):
        load_config(None, ["optim.lr=fast"])


def test_torchrun_two_processes_match_one(tmp_path):
    data = make_dataset(tmp_path, n=16)
    common = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=3",
              "optim.warmup_steps=1", "optim.lr=1e-3", "run.progress=false", "run.tensorboard=false",
              "run.log_every=1", f"run.cache_dir={tmp_path}/cache"]
    train(load_config(None, common + ["optim.batch_size=8", f"run.out={tmp_path}/one"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "holiclip.cli.app", "train",
           *common, "optim.batch_size=4", f"run.out={tmp_path}/two"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [round(m["loss"], 5) for m in one] == [round(m["loss"], 5) for m in two]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


_EACH_RANK = """
import sys
import torch.distributed as dist
from holiclip.training.checkpoint import RunFolderError
from holiclip.training.config import load_config
from holiclip.training.trainer import train

try:
    train(load_config(None, sys.argv[1:]))
except RunFolderError:  # raised on every rank after the process group was set up
    print("stopped", flush=True)
assert not dist.is_initialized(), "process group left behind"
print("process group destroyed", flush=True)
"""


def test_torchrun_training_destroys_its_process_group(tmp_path):
    data = make_dataset(tmp_path, n=8)
    script = tmp_path / "each_rank.py"
    script.write_text(_EACH_RANK)
    overrides = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=1",
                 "optim.warmup_steps=1", "optim.batch_size=4", "run.progress=false", "run.tensorboard=false",
                 f"run.out={tmp_path}/run", f"run.cache_dir={tmp_path}/cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a run that trains, then one that stops on the folder the first one filled: both clean up
    for stopped in (0, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(script), *overrides]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("stopped") == stopped, proc.stdout[-2000:]
        assert proc.stdout.count("process group destroyed") == 2, proc.stdout[-2000:]


def test_text_cache_grows_and_matches_the_trunk(tmp_path):
    from holiclip.models.registry import create_model, get_tokenizer
    from holiclip.training.text_cache import build_text_cache, cache_path

    model = create_model("holi-small-minilm", branches=["global"], lock_text=True).eval()
    tok = get_tokenizer("holi-small-minilm")
    first, idx1 = build_text_cache(model, tok, ["a red apple", "a dog"], tmp_path, "cpu", progress=False)
    more, idx2 = build_text_cache(model, tok, ["a dog", "two cats on a mat"], tmp_path, "cpu", progress=False)
    assert first.shape[0] == 2 and more.shape[0] == 3  # only the new text was added
    assert idx2["a red apple"] == idx1["a red apple"]
    with torch.no_grad():
        want = model.text_trunk(tok(["two cats on a mat", "a red apple"]))
    torch.testing.assert_close(more[[idx2["two cats on a mat"], idx2["a red apple"]]], want, rtol=1e-4, atol=1e-5)
    assert cache_path(tmp_path, model, tok).exists()


def test_text_cache_never_serves_another_trunks_features(tmp_path):
    """Other trunk weights (model.pretrained=, a fine-tuned trunk) or another tokenizer get their own cache."""
    from holiclip.models.registry import create_model, get_tokenizer
    from holiclip.training.text_cache import build_text_cache, cache_path

    texts = ["a red apple", "a dog on a sofa"]
    model = create_model("holi-small-minilm", branches=["global"], lock_text=True).eval()
    tok = get_tokenizer("holi-small-minilm")
    build_text_cache(model, tok, texts, tmp_path, "cpu", progress=False)
    with torch.no_grad():  # "other text weights": perturb the trunk
        for p in model.clip.text.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        want = model.text_trunk(tok(texts))
    got, index = build_text_cache(model, tok, texts, tmp_path, "cpu", progress=False)
    torch.testing.assert_close(got[[index[t] for t in texts]], want, rtol=1e-4, atol=1e-5)
    assert len(list(tmp_path.glob("text_trunk_*.safetensors"))) == 2
    shorter = get_tokenizer("holi-small-minilm", context_length=16)
    assert cache_path(tmp_path, model, shorter) != cache_path(tmp_path, model, tok)


def test_weight_decay_groups_follow_open_clip():
    """open_clip's rule (ndim < 2, bn, ln, bias, logit_scale excluded): the positional embeddings are decayed."""
    import open_clip

    from holiclip.models.registry import _build_clip, create_model, get_model_config
    from holiclip.training.schedule import param_groups

    def decayed(model, groups):
        ids = {id(p) for p in groups[0]["params"]}
        return {n.removeprefix("clip.") for n, p in model.named_parameters() if id(p) in ids}

    model = create_model("holi-tiny", branches=["global"])
    plain = _build_clip(get_model_config("holi-tiny"), pretrained_text=False)
    assert isinstance(plain, open_clip.CLIP)
    want = {n for n, p in plain.named_parameters()
            if not (p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)}
    got = decayed(model, param_groups(model, 0.2))
    assert got == want
    assert {"positional_embedding", "visual.positional_embedding"} <= got
    mlp = create_model("holi-tiny", encoder="mlp", branches=["a", "b", "c"], mlp_layers=2)
    got = decayed(mlp, param_groups(mlp, 0.2))
    assert not any(n.endswith(("class_embedding", ".bias")) for n in got)  # 2-D class tokens and branch biases
    assert any(n.endswith("mlp.c_proj.weight") for n in got)

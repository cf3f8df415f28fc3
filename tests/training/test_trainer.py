"""The trainer: overfitting, exact resume, torchrun equivalence, bad images and rows, non-finite
loss; training as the paper trains (augmentation, the same resize for cached images and
evaluation, the loss in fp32 outside autocast)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from holiclip.data.loader import open_image
from holiclip.data.records import DataError
from holiclip.models.registry import get_transforms
from holiclip.training import trainer as trainer_mod
from holiclip.training.config import load_config, save_config
from holiclip.training.trainer import NonFiniteLoss, Trainer, read_metrics, train

from tests.helpers.datasets import draw, make_dataset
from tests.helpers.distributed import free_port
from tests.helpers.shards import write_shards
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


def test_torchrun_two_processes_match_one(tmp_path):
    data = make_dataset(tmp_path, n=16)
    common = [f"data.train={data}", f"data.slots={SLOTS}", "model.name=holi-tiny", "optim.steps=3",
              "optim.warmup_steps=1", "optim.lr=1e-3", "run.progress=false", "run.tensorboard=false",
              "run.log_every=1", f"run.cache_dir={tmp_path}/cache"]
    train(load_config(None, common + ["optim.batch_size=8", f"run.out={tmp_path}/one"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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


# -- skipped rows, dropped samples and unreadable images reach the user ------------------------
def test_training_reports_skipped_rows_dropped_samples_and_huge_images(tmp_path, capsys):
    path = make_dataset(tmp_path, n=40)
    rows = path.read_bytes().split(b"\n")
    for i in (3, 8):  # torn JSON lines
        rows[i] = rows[i][:-4]
    for i in range(10, 38):  # 28 samples without a 'main' caption
        row = json.loads(rows[i])
        del row["captions"]["main"]
        rows[i] = json.dumps(row).encode()
    path.write_bytes(b"\n".join(rows))
    Image.new("RGB", (100, 100), (9, 9, 9)).save(tmp_path / "img" / "0.png")  # over the pixel limit below
    cfg = load_config(None, [
        f"data.train={path}", "data.slots=[web,main]", "data.on_bad_row=skip", "data.missing_slot_policy=drop",
        "data.max_image_pixels=5000", "data.max_bad_fraction=0.5", "model.name=holi-tiny", "optim.batch_size=4",
        "optim.steps=2", "optim.warmup_steps=1", f"run.out={tmp_path / 'run'}", "run.log_every=1",
        "run.progress=false", "run.tensorboard=false", f"run.cache_dir={tmp_path / 'cache'}",
    ])
    result = train(cfg)
    err = capsys.readouterr().err
    assert f"{path}: 10 of 40 rows used" in err
    assert "2 malformed rows skipped (data.on_bad_row=skip)" in err and f"{path.name}:4: malformed JSON" in err
    assert "28 samples dropped (data.missing_slot_policy=drop)" in err and f"{path.name}:11" in err
    c = result["counters"]
    assert c["bad_rows"] == 2 and c["dropped"] == 28
    assert c["bad"] >= 1  # 0.png: 100 x 100 > data.max_image_pixels, skipped and counted
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["data/bad_rows"] == 2 and metrics[0]["data/dropped"] == 28


def test_resume_with_bad_images_is_bit_identical(tmp_path):
    data = make_dataset(tmp_path, n=20)  # 2 batches of 8 per epoch: substitutes drawn in several epochs
    for i in (2, 3):
        (tmp_path / "img" / f"{i}.png").write_bytes(b"broken")

    def cfg(out, *extra):
        return load_config(None, [
            f"data.train={data}", "data.slots=[web,main]", "model.name=holi-tiny", "optim.batch_size=8",
            "optim.steps=6", "optim.warmup_steps=2", f"run.out={out}", "run.save_every=3", "run.log_every=1",
            "data.max_bad_fraction=0.5", "run.progress=false", "run.tensorboard=false",
            f"run.cache_dir={tmp_path / 'cache'}", *extra,
        ])

    full = train(cfg(tmp_path / "full"))
    train(cfg(tmp_path / "part", "run.max_steps_this_run=3"))
    resumed = train(cfg(tmp_path / "part", "data.workers=1"), resume="latest")  # a worker process too
    assert full["counters"] == resumed["counters"] and full["counters"]["bad"] > 0
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- training as the paper trains ------------------------------------------------------------------
def _wide_dataset(tmp_path, n=8):
    """Non-square images (96 x 64): a squash and a centre crop give different pixels."""
    path = make_dataset(tmp_path, n=n)
    for i in range(n):
        im = draw(i, 96)
        im.crop((0, 16, 96, 80)).save(tmp_path / "img" / f"{i}.png")
    return path


def _trainer(tmp_path, data, *extra) -> Trainer:
    t = Trainer(cfg_for(tmp_path, data, tmp_path / "run", *extra))
    t._build()
    return t


def test_augmentation_is_on_by_default_and_seeded_per_sample(tmp_path):
    # square images: on 3:2 ones every RandomResizedCrop draw (scale >= 0.9, ratio <= 4/3) is out of
    # bounds and torchvision falls back to a fixed centre crop
    data = make_dataset(tmp_path, n=8)
    for cached in ("false", "true"):
        t = _trainer(tmp_path, data, f"data.cache_images={cached}")
        assert t.cfg.data.augment
        first = t.dataset[3]["image"]
        assert torch.equal(first, t.dataset[3]["image"])  # same (seed, epoch, sample): same crop
        t.dataset.set_epoch(1)
        assert not torch.allclose(first, t.dataset[3]["image"])  # a new crop each epoch
        state = torch.get_rng_state()
        t.dataset[4]
        assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is not consumed


def test_no_augmentation_cached_and_uncached_resize_as_evaluation(tmp_path):
    data = _wide_dataset(tmp_path)
    plain = _trainer(tmp_path, data, "data.augment=false")
    cached = _trainer(tmp_path, data, "data.augment=false", "data.cache_images=true")
    evaluation = get_transforms(plain.model, is_train=False)  # open_clip's: resize shortest side + centre crop
    row = json.loads(data.read_text().splitlines()[2])
    want = evaluation(open_image(data.parent / row["image"]))
    # the loader's uint8 images, normalised as the model gets them (the trainer's _images, on the device)
    assert plain.dataset[2]["image"].dtype == cached.dataset[2]["image"].dtype == torch.uint8
    torch.testing.assert_close(plain._images(plain.dataset[2]["image"][None])[0], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached._images(cached.dataset[2]["image"][None])[0], want, rtol=0, atol=1e-5)
    plain.dataset.set_epoch(3)
    torch.testing.assert_close(plain._images(plain.dataset[2]["image"][None])[0], want, rtol=0, atol=1e-6)


def test_the_model_gets_the_old_normalised_images_under_accumulation(tmp_path):
    """uint8 batches from the loader; every forward (both passes of accumulation) gets what open_clip's
    float transform gave, normalised on the device."""
    data = _wide_dataset(tmp_path)
    t = _trainer(tmp_path, data, "data.augment=false", "optim.accum_steps=2", "optim.batch_size=4")
    seen, net = [], t.net
    t.net = lambda **kw: seen.append(kw["images"]) or net(**kw)
    batches = [t.collate(t.dataset.__getitems__(list(range(j, j + 4)))) for j in (0, 4)]
    assert all(b["images"].dtype == torch.uint8 for b in batches)
    t._backward(batches)
    evaluation = get_transforms(t.model, is_train=False)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    want = [torch.stack([evaluation(open_image(data.parent / rows[i]["image"])) for i in range(j, j + 4)]) for j in (0, 4)]
    assert len(seen) == 4  # k forwards without gradients, then k with
    for k, images in enumerate(seen):
        assert images.dtype == torch.float32
        torch.testing.assert_close(images, want[k % 2], rtol=0, atol=1e-6)


def test_loss_runs_in_fp32_outside_autocast(tmp_path):
    data = make_dataset(tmp_path, n=8)
    t = _trainer(tmp_path, data, "run.precision=bf16", "data.cache_images=true")
    seen = {}
    inner = t.loss_fn.forward

    def spy(image_features, text_features, logit_scale, output_dict=False):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["dtypes"] = {image_features.dtype, text_features.dtype}
        return inner(image_features, text_features, logit_scale, output_dict=output_dict)

    t.loss_fn.forward = spy
    batch = t.collate([t.dataset[i] for i in range(4)])
    losses = t._forward_loss(batch)
    assert seen == {"autocast": False, "dtypes": {torch.float32}}
    assert all(v.dtype == torch.float32 for v in losses.values())


# -- streamed webdataset shards ----------------------------------------------------------------------
KILLED_RUN = """
import sys, time
import torch
from holiclip.training import trainer
from holiclip.training.config import load_config

save = trainer.Trainer._save


def save_then_stall(self):  # the kill lands mid-epoch, while the DataLoader workers stream ahead
    save(self)
    if self.step == 3:
        print("saved step 3", flush=True)
        time.sleep(300)


trainer.Trainer._save = save_then_stall
torch.set_num_threads(int(sys.argv[2]))  # as many as the uninterrupted run had: float sums depend on it
trainer.train(load_config(sys.argv[1]))
"""


def test_shards_killed_mid_epoch_then_resumed_train_bit_identical(tmp_path):
    def broken(i, sample):  # an unreadable image and a malformed json: replaced and counted
        return {**sample, "png": b"broken"} if i == 5 else {**sample, "json": b"{"} if i == 17 else sample

    write_shards(tmp_path / "shards", [9, 14, 7, 10], members=broken)  # 5 batches of 8 an epoch: step 3 mid-epoch
    stream = ["data.workers=2", "data.shuffle_buffer=10", "optim.steps=6", "data.on_bad_row=skip",
              "data.max_bad_fraction=0.5"]
    full = train(cfg_for(tmp_path, tmp_path / "shards", tmp_path / "full", *stream))
    part = cfg_for(tmp_path, tmp_path / "shards", tmp_path / "part", *stream)
    save_config(part, tmp_path / "part.yaml")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "part.yaml"), str(torch.get_num_threads())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "saved step 3", proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no clean-up, no final checkpoint
        proc.wait(30)
    finally:
        try:  # its DataLoader workers too (they would notice the lost parent and exit within seconds)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "part" / "model").exists()
    resumed = train(part, resume="latest")
    assert resumed["trained_steps"] == 3 and resumed["counters"] == full["counters"]
    assert full["counters"]["bad"] >= 1 and full["counters"]["bad_rows"] >= 1
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_refuse_image_caching_and_manifests_refuse_stream_settings(tmp_path):
    write_shards(tmp_path / "shards", [8])
    with pytest.raises(DataError, match=r"data.cache_images .* streamed .* set data.cache_images=false"):
        _trainer(tmp_path, tmp_path / "shards", "data.cache_images=true")
    data = make_dataset(tmp_path, n=8)
    with pytest.raises(DataError, match=r"data.resampled and data.train_num_samples apply to webdataset shards"):
        _trainer(tmp_path, data, "data.train_num_samples=4")

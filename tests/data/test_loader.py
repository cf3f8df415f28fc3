"""Datasets and batching: manifests and their counts, image decoding (bit depth, size limits),
bad images substituted and counted (never twice in a batch), tokenisation, the resumable sampler.
Each bad input gets a clear message naming the file (and line), or a counted skip."""
from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from holiclip.data.loader import (
    Collate, ImageTooLarge, MultiTextDataset, Normalize, ResumableBatchSampler, check_bad_fraction, load_manifest,
    open_image, split_normalize, tensor_transform,
)
from holiclip.data.records import DataError
from holiclip.data.tokens import token_lengths
from holiclip.models.registry import create_model, get_tokenizer, get_transforms

from tests.helpers.datasets import make_dataset, with_latin1_line

runner = CliRunner()


# -- manifests -------------------------------------------------------------------------------------
def test_manifest_drop_policy_counts(tmp_path):
    path = make_dataset(tmp_path, n=4)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    del rows[2]["captions"]["main"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path.name}:3: caption slot 'main' is missing"):
        load_manifest(path, ["web", "main"])
    m = load_manifest(path, ["web", "main"], "drop")
    assert len(m.images) == 3 and m.dropped == 1


def test_manifest_counts_are_recorded(tmp_path):
    path = make_dataset(tmp_path, n=5)
    with_latin1_line(path, 2)
    m = load_manifest(path, ["web"], on_bad_row="skip")
    assert m.counts() == {"rows": 5, "bad_rows": 1, "dropped": 0}
    assert "1 malformed rows skipped" in m.summary()
    assert load_manifest(make_dataset(tmp_path / "clean", n=3), ["web"]).summary() is None


def test_folder_as_manifest_is_a_clear_error(tmp_path):
    make_dataset(tmp_path, n=2)
    with pytest.raises(DataError, match=rf"{tmp_path}: is a folder.*train\.jsonl"):
        load_manifest(tmp_path, ["web"])
    from holiclip.cli.app import app

    res = runner.invoke(app, ["train", f"data.train={tmp_path}", "model.name=holi-tiny", f"run.out={tmp_path}/r"])
    assert res.exit_code == 2 and "is a folder" in res.output and "Traceback" not in res.output


# -- decoding: high bit depth ----------------------------------------------------------------------
def _ramp(top: float, dtype) -> np.ndarray:
    """A 16 x 16 ramp from 0 to ``top`` (both ends included)."""
    return (np.linspace(0, top, 256).reshape(16, 16)).astype(dtype)


@pytest.mark.parametrize("mode, suffix, top, dtype, scale", [
    ("I;16", ".png", 65535, np.uint16, 257.0),  # 16-bit greyscale PNG: was all white
    ("I", ".tif", 65535, np.int32, 257.0),  # 16-bit data decoded into 32-bit ints
    ("I", ".tif", 2**31 - 1, np.int32, (2**31 - 1) / 255),  # full 32-bit range
    ("F", ".tif", 1.0, np.float32, 1 / 255),  # float in [0, 1]
    ("F", ".tif", 255.0, np.float32, 1.0),  # float already on the 8-bit scale
])
def test_high_bit_depth_images_scale_by_the_modes_range(tmp_path, mode, suffix, top, dtype, scale):
    arr = _ramp(top, dtype)
    path = tmp_path / f"x{suffix}"
    Image.fromarray(arr).save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the file really is in the mode under test
    got = np.asarray(open_image(str(path)))
    want = np.clip(np.rint(arr.astype(np.float64) / scale), 0, 255).astype(np.uint8)
    assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    assert (got == want[..., None]).all()
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 200  # a ramp, not flat white


def test_16_bit_grey_from_bytes_and_a_dark_16_bit_image_stays_dark(tmp_path):
    arr = np.full((8, 8), 1000, np.uint16)  # 1000 / 65535 of full scale: nearly black
    path = tmp_path / "dark.png"
    Image.fromarray(arr).save(path)
    assert (np.asarray(open_image(path.read_bytes())) == 4).all()  # round(1000 / 257)


@pytest.mark.parametrize("mode", ["1", "L", "P", "P+tRNS", "LA", "RGBA", "CMYK"])
def test_8_bit_modes_convert_as_before(tmp_path, mode):
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).convert(mode.split("+")[0])
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    im.save(path, **({"transparency": 0} if mode == "P+tRNS" else {}))
    with Image.open(path) as ref:
        want = np.asarray(ref.convert("RGB"))
    assert (np.asarray(open_image(str(path))) == want).all()


# -- decoding: decompression bombs -----------------------------------------------------------------
def _png_header(path: Path, width: int, height: int) -> Path:
    """A real PNG whose IHDR claims width x height, with a tiny (truncated) body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_bomb_sized_image_is_refused_from_its_header(tmp_path):
    path = _png_header(tmp_path / "huge.png", 14000, 14000)
    limit = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"huge\.png.*196,000,000 pixels"):
        open_image(str(path))
    assert time.perf_counter() - t0 < 1.0  # refused before decoding anything
    assert issubclass(ImageTooLarge, OSError)  # skipped and counted like any unreadable image
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's process-wide setting is left alone


def test_own_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 60), (1, 2, 3)).save(path)
    with pytest.raises(ImageTooLarge, match=r"big\.png: 100 x 60 = 6,000 pixels.*limit of 5,000"):
        open_image(str(path), max_pixels=5000)
    assert open_image(str(path), max_pixels=6000).size == (100, 60)
    assert open_image(str(path), max_pixels=None).size == (100, 60)
    # between PIL's warning and error thresholds: the default limit (PIL's own) refuses it
    mid = _png_header(tmp_path / "mid.png", 10000, 10000)
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageTooLarge, match=r"10000 x 10000"):
        open_image(str(mid))


# -- bad images: substituted and counted, never twice in a batch -----------------------------------
def test_bad_images_are_substituted_and_counted(tmp_path):
    path = make_dataset(tmp_path, n=6)
    (tmp_path / "img" / "1.png").write_bytes(b"not a png at all")
    (tmp_path / "img" / "4.png").unlink()
    m = load_manifest(path, ["web"])
    model = create_model("holi-tiny", branches=["web"])
    ds = MultiTextDataset(m, get_transforms(model))
    items = [ds[i] for i in range(len(ds))]
    assert all(it["image"].shape == (3, 64, 64) for it in items)
    # each bad image is replaced by a readable sample other than itself
    assert items[1]["index"] in {0, 2, 3, 5} and "1.png" in items[1]["bad"][0]
    assert items[4]["index"] in {0, 2, 3, 5} and "4.png" in items[4]["bad"][0]
    assert sum(len(it["bad"]) for it in items) == 2
    with pytest.raises(DataError, match=r"(?s)2 of 6 images unreadable .*1.png"):
        check_bad_fraction(2, 6, 0.1, [b for it in items for b in it["bad"]])
    check_bad_fraction(2, 6, 0.5, [])  # under the threshold: no error


def test_substitute_for_a_bad_image_is_not_in_the_batch(tmp_path):
    path = make_dataset(tmp_path, n=12)
    (tmp_path / "img" / "4.png").write_bytes(b"not a png")
    m = load_manifest(path, ["web"])
    ds = MultiTextDataset(m, get_transforms(create_model("holi-tiny", branches=["web"])))
    batch = [3, 4, 5, 6]  # the bad image and its successor together
    items = ds.__getitems__(batch)
    got = [it["index"] for it in items]
    assert len(set(got)) == 4 and got[0] == 3 and got[2:] == [5, 6] and got[1] not in batch
    assert "4.png" in items[1]["bad"][0]
    assert [it["index"] for it in ds.__getitems__(batch)] == got  # deterministic (exact resume)


def test_loader_batches_have_no_duplicates_and_equal_rank_sizes(tmp_path):
    path = make_dataset(tmp_path, n=24)
    for i in range(0, 24, 3):  # every third image unreadable: many bad neighbours in each batch
        (tmp_path / "img" / f"{i}.png").write_bytes(b"x")
    m = load_manifest(path, ["web"])
    ds = MultiTextDataset(m, get_transforms(create_model("holi-tiny", branches=["web"])))
    collate = Collate(get_tokenizer("holi-tiny"), 32)
    for world in (1, 2):
        samplers = [ResumableBatchSampler(24, 12 // world, r, world, seed=1) for r in range(world)]
        for epoch in range(2):
            per_rank = []
            for s in samplers:
                s.set_epoch(epoch)
                per_rank.append([b["index"].tolist() for b in DataLoader(ds, batch_sampler=s, collate_fn=collate)])
            for step in zip(*per_rank):
                assert all(len(b) == 12 // world for b in step)  # every rank keeps its batch size
                merged = [i for b in step for i in b]
                assert len(set(merged)) == len(merged)  # no sample twice in the global batch
                assert not any(i % 3 == 0 for i in merged)  # only readable images


# -- images: uint8 out of the loader, normalised on the device -------------------------------------
def _photo(rng, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("is_train", [True, False])
def test_uint8_transform_then_normalize_equals_open_clips_transform(is_train):
    rng = np.random.default_rng(0)
    full = open_clip.image_transform(64, is_train=is_train)
    head, normalize = split_normalize(full)
    for k, (h, w) in enumerate([(64, 64), (80, 96), (100, 70), (256, 256)]):
        im = _photo(rng, h, w)
        torch.manual_seed(k)
        want = full(im)
        torch.manual_seed(k)  # the same crop drawn
        got = head(im)
        assert got.dtype == torch.uint8 and got.shape == want.shape
        torch.testing.assert_close(normalize(got), want, rtol=0, atol=1e-6)
    assert normalize.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and normalize.std == tuple(open_clip.OPENAI_DATASET_STD)
    custom = lambda im: im  # noqa: E731  (not open_clip's Compose: left as it is, nothing to normalise)
    assert split_normalize(custom) == (custom, None)


def test_loader_batches_are_uint8_and_normalise_to_the_old_float_batch(tmp_path):
    path = make_dataset(tmp_path, n=8)
    m = load_manifest(path, ["web", "main"])
    model = create_model("holi-tiny", branches=["web", "main"])
    full = get_transforms(model, is_train=True)
    head, normalize = split_normalize(full)
    collate = Collate(get_tokenizer("holi-tiny"), 32)
    sampler = ResumableBatchSampler(8, 4, seed=1)
    new = list(DataLoader(MultiTextDataset(m, head, seed=1), batch_sampler=sampler, collate_fn=collate, num_workers=2))
    old = list(DataLoader(MultiTextDataset(m, full, seed=1), batch_sampler=sampler, collate_fn=collate))
    assert len(new) == len(old) == 2
    for a, b in zip(new, old):
        assert a["images"].dtype == torch.uint8 and b["images"].dtype == torch.float32
        torch.testing.assert_close(normalize(a["images"]), b["images"], rtol=0, atol=1e-6)
        assert torch.equal(a["texts"], b["texts"]) and torch.equal(a["index"], b["index"])


@pytest.mark.parametrize("augment", [True, False])
def test_cached_images_normalise_later_as_before(augment):
    """The cached path (uint8 images at the model's size): unnormalised out of the transform, then
    Normalize gives what the transform normalising itself gives."""
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))
    before = tensor_transform(32, augment=augment)
    later = tensor_transform(32, augment=augment, normalize=False)
    torch.manual_seed(3)
    want = before(image.float() / 255.0)  # what the cached path handed the transform before
    torch.manual_seed(3)
    got = later(image)
    assert got.dtype == (torch.float32 if augment else torch.uint8)  # a crop is computed in float
    torch.testing.assert_close(Normalize()(got), want, rtol=0, atol=1e-6)


def test_persistent_workers_crop_for_the_sampler_epoch(tmp_path):
    """Workers kept over epochs keep the dataset's epoch from their start; the batch's indices carry
    the sampler's, so each epoch's crops are the ones a fresh loader (or no worker) gives."""
    path = make_dataset(tmp_path, n=8)
    m = load_manifest(path, ["web"])
    ds = MultiTextDataset(m, split_normalize(get_transforms(create_model("holi-tiny", branches=["web"]), True))[0],
                          seed=2)
    collate = Collate(get_tokenizer("holi-tiny"), 32)
    sampler = ResumableBatchSampler(8, 4, seed=2)
    kept = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=1, persistent_workers=True)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch, start_batch=1 if epoch == 2 else 0)  # epoch 2: a resume past its first batch
        ds.set_epoch(epoch)
        got = [b["images"] for b in kept]
        ref = [b["images"] for b in DataLoader(ds, batch_sampler=sampler, collate_fn=collate)]
        assert len(got) == len(ref) == (1 if epoch == 2 else 2)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))
        epochs.append(got[-1])
    assert not torch.equal(epochs[0], epochs[1])  # new crops each epoch


# -- tokenisation and sampling ---------------------------------------------------------------------
def test_truncation_is_counted(tmp_path):
    tok = get_tokenizer("holi-tiny")  # context 32
    texts = ["short", "word " * 50]
    assert token_lengths(tok, texts)[1] > 32 >= token_lengths(tok, texts)[0]
    collate = Collate(tok, 32)
    item = {"image": torch.zeros(3, 4, 4), "texts": texts, "index": 0, "bad": []}
    batch = collate([item])
    assert batch["texts"].shape == (1, 2, 32) and batch["truncated"] == 1


def test_sampler_splits_global_batch_and_resumes():
    one = ResumableBatchSampler(20, 8, seed=3)
    ranks = [ResumableBatchSampler(20, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(1)
    for full, a, b in zip(one, *ranks):
        assert full == a + b
    s = ResumableBatchSampler(20, 8, seed=3)
    s.set_epoch(1)
    all_batches = list(s)
    s.set_epoch(1, start_batch=1)
    assert list(s) == all_batches[1:]
    with pytest.raises(DataError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 4)


def sampler_run(world: int, epoch: int, state=None, trained=0, stop=None):
    """The samples ``world`` ranks train of ``epoch`` (48 samples, batch 4 per rank; resumed from ``state``
    after ``trained`` batches, up to batch ``stop``), global batch after global batch; the last rank's sampler."""
    per_batch: dict[int, list] = {}
    for rank in range(world):
        s = ResumableBatchSampler(48, 4, rank=rank, world_size=world, seed=5)
        start = s.load_state(state, epoch, trained)
        s.set_epoch(epoch, start)
        for k, batch in enumerate(s):
            if stop is not None and start + k >= stop:
                break
            per_batch.setdefault(k, []).append((list(batch), batch.global_batch))
    seen = []
    for k in sorted(per_batch):  # each rank names the same global batch: the ranks' batches in rank order
        parts = per_batch[k]
        assert len(parts) == world and all(g == [i for b, _ in parts for i in b] for _, g in parts)
        seen += parts[0][1]
    return seen, s


@pytest.mark.parametrize("worlds,stops", [((2, 4), (2,)), ((2, 4), (3,)), ((4, 2), (1,)), ((2, 4, 3), (1, 2))])
def test_sampler_resumed_on_another_world_size_trains_each_remaining_sample_once(worlds, stops):
    """2 -> 4 ranks (8 -> 16 GPUs scaled down) mid-epoch: the samples not yet trained, in the order the
    2-rank run would have trained them, re-cut over 4 ranks; none repeated, none lost but the last part
    of a global batch; also fewer ranks and a second change within the epoch."""
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(5 * 1_000_003 + 1)).tolist()
    seen, s = sampler_run(worlds[0], 1, stop=stops[0])
    state, trained = s.state(), stops[0]
    for world, stop in zip(worlds[1:], (*stops[1:], None)):
        more, s = sampler_run(world, 1, state, trained, stop)
        seen += more
        state, trained = s.state(), stop
    untrained, trains = s.remainder(1, 0)
    assert seen == perm[:len(seen)]  # the first run's order, each sample once
    assert len(seen) == 48 // (4 * worlds[0]) * 4 * worlds[0] - (untrained - trains)
    assert 0 <= untrained - trains < 4 * worlds[-1]  # left out: less than one new global batch
    if stops == (2,):  # 16 trained on 2 ranks, 32 left: 2 global batches of 16 on 4 ranks
        assert sorted(seen) == list(range(48)) and (untrained, trains) == (32, 32) and s.batches(1) == 2
    if stops == (3,):  # 24 left: one global batch of 16, 8 left out
        assert (untrained, trains) == (24, 16)


def test_sampler_state_of_an_older_checkpoint_or_a_fresh_epoch_plans_the_epoch_for_this_run():
    s = ResumableBatchSampler(48, 4, rank=1, world_size=2, seed=5)
    s.set_epoch(0)
    full = list(s)
    assert s.load_state(None, 0, 3) == 3  # no state kept (older checkpoints): this run's own split
    assert s.load_state({"epoch": 0, "world_size": 4}, 0, 0) == 0  # nothing trained yet: planned afresh
    s.set_epoch(0, 3)
    assert list(s) == full[3:]

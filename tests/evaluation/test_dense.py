"""Dense read-out: mIoU formulas, segmentation with a stub model whose answer is known, and a
run of the real read-out."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from holiclip.data.records import DataError
from holiclip.evaluation import confusion_matrix, evaluate_segmentation, iou_metrics, run_task
from holiclip.evaluation.dense import load_mask, patch_logits
from holiclip.evaluation.tasks import branch_variants


def test_iou_hand_computed():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 2, 1], [0, 0, 0]]
    m = iou_metrics(cm, ["a", "b", "c"])
    # a: tp 3, fp 0, fn 1 -> 3/4; b: tp 2, fp 1, fn 1 -> 2/4; c: tp 0, fp 1 -> 0
    assert m["per_class_iou"] == {"a": 0.75, "b": 0.5, "c": 0.0}
    assert m["mIoU"] == pytest.approx((0.75 + 0.5) / 3)
    assert m["pixel_accuracy"] == pytest.approx(5 / 7)
    none = iou_metrics(confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 2), 3))
    assert none["per_class_iou"]["1"] is None and none["mIoU"] == 1.0  # absent classes left out


class StubDense(torch.nn.Module):
    """encode_dense returns fixed patch features (D = C, one-hot): branches 'main' and
    'detail' on each patch's true class, 'web' on a wrong class."""

    branch_names = ("web", "main", "detail")
    image_size = (32, 32)

    def __init__(self, grid):
        super().__init__()
        right = torch.eye(3)[grid]  # (gh, gw, C)
        wrong = torch.eye(3)[(grid + 1) % 3]
        self.feats = torch.stack([wrong, right, right])  # (H, gh, gw, D)

    def encode_dense(self, images, normalize=False):  # one-hot features: already unit-norm
        return self.feats.expand(images.shape[0], -1, -1, -1, -1)


def _mask_png(path, truth):
    Image.fromarray(truth.numpy().astype(np.uint8), mode="L").save(path)
    return str(path)


def test_segmentation_known_answer(tmp_path):
    # 2 x 2 patches upsampled to an 8 x 8 mask: bilinear logits put every pixel on its
    # patch's class for this layout (a class on a diagonal would bleed across the centre)
    grid = torch.tensor([[0, 1], [2, 2]])
    truth = grid.repeat_interleave(4, 0).repeat_interleave(4, 1)
    truth[0, 0] = 255  # ignored
    img = Image.new("RGB", (20, 20))
    model = StubDense(grid)
    variants = branch_variants(model.branch_names, "mean", per_branch=True)
    out = evaluate_segmentation(model, [img, img], [_mask_png(tmp_path / "m.png", truth), truth], torch.eye(3), variants, ["a", "b", "c"])
    for right in ("main", "detail"):
        assert out[right]["mIoU"] == 1.0 and out[right]["pixel_accuracy"] == 1.0
    assert out["web"]["mIoU"] == 0.0 and out["web"]["pixel_accuracy"] == 0.0
    # fused: the wrong branch's votes bleed across region borders after upsampling
    assert 0.5 < out["mean(web+main+detail)"]["pixel_accuracy"] < 1.0


def test_fused_branches_known_answer(tmp_path):
    # one class per image (no borders): the fused subsets' answers follow from the votes
    img = Image.new("RGB", (20, 20))
    rows = {}
    for cls in range(3):
        model = StubDense(torch.full((2, 2), cls))
        variants = [("all", "mean", None), ("web+main", "mean", ["web", "main"]), ("max", "norm-max", None)]
        truth = torch.full((6, 6), cls)
        rows[cls] = evaluate_segmentation(model, [img], [truth], torch.eye(3), variants, ["a", "b", "c"])
    for cls in range(3):
        assert rows[cls]["all"]["pixel_accuracy"] == 1.0  # two right branches outvote one wrong
    # web + main tie between the true class and (true + 1) % 3; argmax takes the lower id:
    # right for classes 0 and 1, wrong for class 2 (tie 2 vs 0)
    assert rows[0]["web+main"]["pixel_accuracy"] == 1.0 and rows[1]["web+main"]["pixel_accuracy"] == 1.0
    assert rows[2]["web+main"]["pixel_accuracy"] == 0.0
    # norm-max of one-hots: both classes at 1 -> the same tie
    assert rows[2]["max"]["pixel_accuracy"] == 0.0 and rows[0]["max"]["pixel_accuracy"] == 1.0


def test_patch_logits_layout():
    dense = torch.zeros(1, 2, 2, 3, 4)
    dense[0, :, 1, 2, 3] = 1.0
    logits = patch_logits(dense, torch.eye(4), "mean")
    assert logits.shape == (1, 4, 2, 3) and logits[0, 3, 1, 2] == 1.0 and logits[0, 3].sum() == 1.0


def test_mask_values_are_checked(tmp_path):
    Image.fromarray(np.full((4, 4), 7, np.uint8), mode="L").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match="bad.png: mask value 7"):
        load_mask(tmp_path / "bad.png", 3)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="class-index PNG"):
        load_mask(tmp_path / "rgb.png", 3)


def test_real_read_out_runs(tmp_path, eval_model, solid_image):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        solid_image(tmp_path / "images" / f"{i}.png", (200, 10 * i, 0), size=(30, 40))
        mask = np.zeros((30, 40), np.uint8)
        mask[:, 20:] = 1
        Image.fromarray(mask, mode="L").save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    res = run_task("dense", eval_model, tmp_path, templates="simple", per_branch=True)
    assert res["task"] == "dense_segmentation"
    assert 0.0 <= res["metrics"]["mIoU"] <= 1.0 and set(res["metrics"]["per_class_iou"]) == {"red", "blue"}
    # Psi_CLS: one patch stream for all branches, so one row and a note, not 3 identical branch rows
    assert eval_model.model.encoder == "cls" and len(eval_model.branch_names) == 3
    assert len(res["rows"]) == 1 and "one patch stream shared by all its branches" in res["notes"][0]


def test_per_branch_dense_rows_on_psi_mlp_are_the_branches_streams(tmp_path, solid_image, single_thread):
    import holiclip
    from holiclip.evaluation import load_eval_model

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        solid_image(tmp_path / "images" / f"{i}.png", (200, 10 * i, 0), size=(30, 40))
        Image.fromarray(np.eye(30, 40, dtype=np.uint8), mode="L").save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "classes.txt").write_text("red\nblue\n")
    model = holiclip.create_model("holi-tiny", encoder="mlp", branches=("web", "detail", "main"))
    em = load_eval_model(holiclip.save_model(model, tmp_path / "mlp"))
    res = run_task("dense", em, tmp_path, templates="simple", per_branch=True)
    assert [r["branches"] for r in res["rows"]][:3] == ["web", "detail", "main"] and len(res["rows"]) == 4
    assert "notes" not in res

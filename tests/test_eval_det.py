"""eval_det.py: mAP / fROC on hand-checked cases, and tiny end-to-end runs (frozen and fine-tuned)."""
import json

import numpy as np
import pytest
import torch

import common
import eval_det
from eval_det import IOU_THRESHOLDS, average_precision, box_iou, detection_map, froc


def P(boxes, scores, labels=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return dict(boxes=boxes, scores=np.asarray(scores, np.float32),
                labels=np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels))


def G(boxes, labels=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return dict(boxes=boxes, labels=np.zeros(len(boxes), np.int64) if labels is None else np.asarray(labels))


def test_thresholds_and_iou():
    assert IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
    iou = box_iou([[0, 0, 10, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(iou, [[1.0, 50 / 150, 0.0]])


def test_perfect_predictions_give_one():
    gts = [G([[0, 0, 10, 10], [20, 20, 40, 30]]), G([[5, 5, 15, 25]])]
    preds = [P(g["boxes"], [0.9] * len(g["boxes"])) for g in gts]
    m = detection_map(preds, gts, 1)
    assert m["map"] == m["map50"] == m["map75"] == 1.0


def test_single_box_at_iou_062_matches_five_of_eight_thresholds():
    pred = [[0, 0, 10, 16.1]]  # IoU with the target = 100 / 161 = 0.621
    assert box_iou(pred, [[0, 0, 10, 10]])[0, 0] == pytest.approx(0.621, abs=1e-3)
    m = detection_map([P(pred, [0.8])], [G([[0, 0, 10, 10]])], 1)
    assert m["map"] == pytest.approx(5 / 8)  # hits at 0.40, 0.45, 0.50, 0.55, 0.60
    assert m["map50"] == 1.0 and m["map75"] == 0.0


def test_no_predictions_give_zero():
    m = detection_map([P([], [])], [G([[0, 0, 10, 10]])], 1)
    assert m["map"] == 0.0


def test_false_positives_on_empty_images():
    gts = [G([[0, 0, 10, 10]]), G([])]
    # the false positive on the empty image outranks the true positive: precision 1/2 at recall 1
    preds = [P([[0, 0, 10, 10]], [0.5]), P([[30, 30, 40, 40]], [0.9])]
    assert average_precision(preds, gts, 0, 0.5) == pytest.approx(0.5)
    # ranked below it, it costs nothing
    preds[1]["scores"] = np.array([0.1], np.float32)
    assert average_precision(preds, gts, 0, 0.5) == pytest.approx(1.0)


def test_duplicates_and_101_point_interpolation():
    # one object found twice (second = FP), a second object missed: recall 0.5 at precision 1
    gts = [G([[0, 0, 10, 10], [50, 50, 60, 60]])]
    preds = [P([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8])]
    assert average_precision(preds, gts, 0, 0.5) == pytest.approx(51 / 101)  # recall points 0.00 .. 0.50


def test_several_classes():
    gts = [G([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])]
    # class 0 found, class 1 predicted with the wrong label (counts for class 2, which has no ground truth)
    preds = [P([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.9], [0, 2])]
    m = detection_map(preds, gts, 3)
    assert m["map"] == pytest.approx(0.5)  # mean over the classes with ground truth (0 and 1)
    assert m["ap_per_class"][:2] == [1.0, 0.0] and np.isnan(m["ap_per_class"][2])
    with pytest.raises(ValueError):
        detection_map(preds, [G([])], 3)


def test_froc_hand_case():
    gts = [G([[0, 0, 10, 10]]), G([[20, 20, 30, 30]])]
    preds = [P([[2, 2, 8, 8], [0, 0, 6, 6], [40, 40, 50, 50]], [0.9, 0.8, 0.7]),  # hit, same object again, FP
             P([[0, 0, 4, 4], [18, 18, 28, 28]], [0.6, 0.5])]  # FP, hit (centre 23,23 inside, IoU low)
    # curve (FP per image, sensitivity): (0, .5) (0, .5) (.5, .5) (1, .5) (1, 1)
    mean, sens = froc(preds, gts)
    assert sens == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert mean == pytest.approx(5.5 / 7)


def run_main(tmp_path, *extra):
    out = tmp_path / "det"
    rows = eval_det.main(["--encoder", "random:resnet18", "--synthetic-samples", "20", "--image-size", "64",
                          "--epochs", "1", "--batch-size", "4", "--fpn-channels", "32", "--head-convs", "1",
                          "--out", str(out), *extra])
    saved = json.loads((tmp_path / "det.json").read_text())
    return rows, saved


def test_main_frozen(tmp_path):
    rows, saved = run_main(tmp_path)
    assert rows[0]["mode"] == "frozen" and 0.0 <= rows[0]["map"][0] <= 1.0 and 0.0 <= rows[0]["froc"][0] <= 1.0
    assert saved[0]["encoder"] == "random-resnet18" and "ap/nodule" in saved[0]


def test_main_finetune_changes_encoder(tmp_path, monkeypatch):
    seen = {}
    original = eval_det.train_one

    def spy(args, backbone, data, num_classes, seed):
        before = backbone.backbone.layer1[0].conv1.weight.clone()
        result = original(args, backbone, data, num_classes, seed)
        seen["exported weights untouched"] = torch.equal(before, backbone.backbone.layer1[0].conv1.weight)
        return result

    monkeypatch.setattr(eval_det, "train_one", spy)
    rows, _ = run_main(tmp_path, "--finetune", "--warmup-steps", "1")
    assert rows[0]["mode"] == "finetune" and 0.0 <= rows[0]["map"][0] <= 1.0
    assert seen["exported weights untouched"]  # each seed fine-tunes a copy


def test_main_vit_export_simple_pyramid(tmp_path):
    torch.manual_seed(0)
    enc = common.ImageEncoder("vit_tiny", config=dict(image_size=64, width=32, layers=1, heads=2, mlp=64))
    path = tmp_path / "image_encoder.pt"
    common.export_image_encoder(str(path), enc, 0.5, 0.25, 64, "place")
    pyramid = eval_det.Pyramid([32], 16)
    feats = pyramid([torch.randn(2, 32, 4, 4)])  # stride 16 -> P3, P4, P5 at strides 8, 16, 32
    assert [f.shape[-1] for f in feats] == [8, 4, 2] and all(f.shape[1] == 16 for f in feats)
    rows = eval_det.main(["--encoder", str(path), "--synthetic-samples", "20", "--image-size", "64", "--epochs", "1",
                          "--batch-size", "4", "--fpn-channels", "32", "--head-convs", "1", "--out",
                          str(tmp_path / "det")])
    assert rows[0]["encoder"] == path.parent.name and 0.0 <= rows[0]["map"][0] <= 1.0


def test_lr_grid_picks_the_best_validation_map_and_runs_the_other_seeds_with_it(tmp_path, monkeypatch):
    calls = []
    fake_val = {1e-3: 0.2, 1e-2: 0.5, 1e-1: 0.1}  # the middle lr has the best validation mAP

    def fake_train_one(args, backbone, data, num_classes, seed):
        calls.append((args.lr, seed))
        return dict(map=fake_val[args.lr] + seed, map50=0.0, map75=0.0, froc=0.0, ap_per_class=[0.0] * num_classes,
                    epochs=1, best_val=fake_val[args.lr])

    monkeypatch.setattr(eval_det, "train_one", fake_train_one)
    rows, saved = run_main(tmp_path, "--lr-grid", "1e-3", "1e-2", "1e-1", "--seeds", "3")
    assert calls == [(1e-3, 0), (1e-2, 0), (1e-1, 0), (1e-2, 1), (1e-2, 2)]
    assert rows[0]["lr"] == 1e-2 and rows[0]["map"] == [0.5, 1.5, 2.5]  # seed 0 of the grid is reused, not rerun
    assert saved[0]["val_map_by_lr"] == "0.001:20.00 0.01:50.00 0.1:10.00"

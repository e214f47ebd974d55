import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import eval_seg as es


def _masks(*images):
    """Lists of flat pixel strings ('1' = foreground) -> bool B×1×1×W."""
    return torch.tensor([[[[c == "1" for c in im]]] for im in images])


def test_micro_dice_pools_pixels_and_differs_from_per_image_mean():
    target = _masks("11110000", "10000000")
    pred = _masks("11110000", "11100000")  # image 1 perfect; image 2: TP 1, FP 2 -> Dice 2/4
    per_image = es.per_image_dice(pred, target)
    assert per_image.flatten().tolist() == [1.0, 0.5]
    # pooled: TP 5, predicted 7, true 5 -> 10 / 12, not the per-image mean 0.75
    assert es.micro_dice(pred, target).item() == pytest.approx(10 / 12)
    assert per_image.mean().item() == pytest.approx(0.75)
    tp, n_pred, n_true = (c.sum(0) for c in es.pixel_counts(pred, target))
    assert es.iou_from_counts(tp, n_pred, n_true).item() == pytest.approx(5 / 7)  # TP / (TP + FP + FN)


def test_dice_edge_cases():
    empty, some = _masks("0000"), _masks("0110")
    assert es.per_image_dice(empty, empty).item() == 1.0  # empty mask, empty prediction: defined as 1
    assert es.micro_dice(empty, empty).item() == 1.0
    assert es.per_image_dice(some, empty).item() == 0.0
    assert es.micro_dice(some, some).item() == 1.0
    # multi-class: one value per class
    pred = torch.stack([some[:, 0], empty[:, 0]], 1)
    assert es.micro_dice(pred, pred).tolist() == [1.0, 1.0]


def test_dice_loss():
    target = _masks("0110", "0000")
    perfect = torch.where(target, 50.0, -50.0)
    assert es.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    # a class with no positive pixel in the batch adds nothing (segmentation_models_pytorch DiceLoss)
    two = torch.cat([target, torch.zeros_like(target)], 1)
    logits = torch.cat([perfect, torch.full_like(perfect, 3.0)], 1)
    assert es.dice_loss(logits, two).item() == pytest.approx(0, abs=1e-6)
    # all logits 0: p = 0.5 on 8 pixels, 2 true -> 1 - 2 * 1 / (4 + 2)
    assert es.dice_loss(torch.zeros(2, 1, 1, 4), target).item() == pytest.approx(1 - 2 / 6)


def test_summarize_is_lovt_95_percent_interval():
    values = [0.1, 0.2, 0.3, 0.4, 0.5]
    mean, hw = es.summarize(values)
    assert mean == pytest.approx(0.3)
    assert hw == pytest.approx(1.96 * np.std(values, ddof=1) / math.sqrt(5))
    assert math.isnan(es.summarize([0.4])[1])


def test_load_encoders_random_and_exported(tmp_path):
    torch.manual_seed(1)
    enc = common.ImageEncoder("resnet18")
    path = tmp_path / "lovt_run" / "image_encoder.pt"
    path.parent.mkdir()
    common.export_image_encoder(str(path), enc, 0.5, 0.25, 64, "lovt")
    torch.load(path, weights_only=True)  # the contract: a plain, weights_only-loadable dict
    (name, exported, meta), (rname, rand, rmeta) = es.load_encoders([str(path), "random"], 64)
    assert name == "lovt_run" and meta["method"] == "lovt" and "state_dict" not in meta
    assert torch.equal(exported.backbone.conv1.weight, enc.backbone.conv1.weight)
    # `random` takes the architecture of the exported encoder, so the baseline is comparable
    assert rname == "random-resnet18" and rmeta["arch"] == "resnet18"
    assert not exported.training and not rand.training
    x = torch.randn(2, 1, 64, 64)
    stages = rand.feature_maps(x)
    assert [s.shape[1] for s in stages] == rand.stage_channels == [64, 64, 128, 256, 512]
    assert [s.shape[-1] for s in stages] == [32, 16, 8, 4, 2]  # strides 2 .. 32
    assert es.load_encoders(["random:resnet50"], 64)[0][2]["arch"] == "resnet50"
    with pytest.raises(SystemExit, match="no such file"):
        es.load_encoders([str(tmp_path / "missing.pt")], 64)


def test_resunet_widths_follow_lovt_layout():
    head = es.ResUNetHead([64, 64, 128, 256, 512], n_classes=3)  # ResNet-18: C5 = 512
    assert [u.up.out_channels for u in head.ups] == [256, 128, 64, 32, 16]  # C5/2 .. C5/32 (R50: 1024 .. 64)
    assert [u.convs[0][0].in_channels for u in head.ups] == [256 + 256, 128 + 128, 64 + 64, 32 + 64, 16 + 1]
    stages = [torch.randn(2, c, 64 // 2 ** (i + 1), 64 // 2 ** (i + 1)) for i, c in enumerate([64, 64, 128, 256, 512])]
    assert head(torch.randn(2, 1, 64, 64), stages).shape == (2, 3, 64, 64)
    linear = es.LinearSegHead([64, 64, 128, 256, 512], 3)
    assert linear(torch.randn(2, 1, 64, 64), stages[-1:]).shape == (2, 3, 64, 64)


def test_hypercolumn_head_sums_linear_maps_of_conv3_to_conv5():
    """A 1×1 conv per map, summed at conv3's grid, upsampled to the input: linear in the features (a ViT's one map:
    the linear head). Checked against the sum written out."""
    torch.manual_seed(0)
    channels = [64, 64, 128, 256, 512]
    stages = [torch.randn(2, c, 64 // 2 ** (i + 1), 64 // 2 ** (i + 1)) for i, c in enumerate(channels)]
    head, x = es.HypercolumnSegHead(channels, 3), torch.randn(2, 1, 64, 64)
    up = lambda t, s: F.interpolate(t, size=s, mode="bilinear", align_corners=False)
    c3, c4, c5 = head.convs
    want = up(c3(stages[2]) + up(c4(stages[3]), (8, 8)) + up(c5(stages[4]), (8, 8)), (64, 64))
    assert torch.allclose(head(x, stages), want, atol=1e-5)
    assert torch.allclose(head(x, stages[2:]), want, atol=1e-5)  # the cached maps: conv3 .. conv5 only
    vit = es.HypercolumnSegHead([32], 2)
    assert len(vit.convs) == 1 and vit(x, [torch.randn(2, 32, 4, 4)]).shape == (2, 2, 64, 64)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    rows = es.main(["--encoder", "random:resnet18", "--synthetic-samples", "10", "--image-size", "64",
                    "--batch-size", "8", "--out", str(out), *extra])
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert (tmp_path / f"{name}.csv").exists() and len(saved) == len(rows)
    return saved


def test_end_to_end_linear_and_unet_frozen(tmp_path):
    saved = _run(tmp_path, "frozen", "--head", "linear", "--head", "unet", "--epochs", "1", "--seeds", "2",
                 "--lr-grid", "1e-2", "1e-3")
    assert [(r["head"], r["mode"]) for r in saved] == [("linear", "frozen"), ("unet", "frozen")]
    for r in saved:
        assert r["lr"] in (1e-2, 1e-3) and r["val_dice_by_lr"].count(":") == 2  # LoVT's LR selection
        assert len(r["dice"]["values"]) == 2 and 0 <= r["dice"]["mean"] <= 1 and r["dice"]["ci95"] is not None
        assert set(r) >= {"dice_img", "iou", "dice/opacity", "dice/cardiomegaly"}


def test_end_to_end_hypercolumn_alone_and_beside_the_unet(tmp_path):
    """Alone it caches conv3 .. conv5; beside a frozen U-Net all five stages: the same run either way."""
    alone = _run(tmp_path, "hc", "--head", "hypercolumn", "--epochs", "2", "--seeds", "1")
    both = _run(tmp_path, "hc_unet", "--head", "hypercolumn", "--head", "unet", "--epochs", "2", "--seeds", "1")
    assert [r["head"] for r in both] == ["hypercolumn", "unet"]
    assert alone[0]["dice"]["values"] == both[0]["dice"]["values"]


def test_end_to_end_unet_finetune(tmp_path):
    # 6 training images = 1 step an epoch; warm-up of 1 step: epoch 1 trains the decoder only, epoch 2 both
    saved = _run(tmp_path, "ft", "--head", "unet", "--finetune", "--warmup-steps", "1", "--epochs", "2",
                 "--seeds", "1")
    assert saved[0]["mode"] == "finetune" and 0 <= saved[0]["dice"]["mean"] <= 1


def test_finetune_needs_the_unet_head():
    with pytest.raises(SystemExit):
        es.main(["--finetune"])


def _folder(root, n=6, bad_mask=None):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((40, 48), 100, np.uint8)).save(root / "images" / f"im{i}.png")
        shape = (30, 48) if i == bad_mask else (40, 48)
        Image.fromarray(np.zeros(shape, np.uint8)).save(root / "masks" / f"im{i}.png")


def test_bad_records_are_named_or_skipped(tmp_path):
    _folder(tmp_path / "d", bad_mask=2)
    args = es.add_common_eval_args(__import__("argparse").ArgumentParser()).parse_args(
        ["--dataset", "folder", "--data-root", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="im2.png"):  # the mask of another size is named
        es.load_splits(args, 64)
    args.skip_bad = True
    splits, classes = es.load_splits(args, 64)
    assert sum(len(s["images"]) for s in splits.values()) == 5 and classes == ["mask"]
    assert splits["train"]["masks"].shape[1:] == (1, 64, 64)
    args.fraction = 0.1  # 3 training images -> none
    with pytest.raises(SystemExit, match="leaves none"):
        es.load_splits(args, 64)
    # a boxes CSV naming an image that is not there
    (tmp_path / "b" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "b" / "images" / "im0.png")
    (tmp_path / "b" / "boxes.csv").write_text("image,x,y,w,h,label\nim0.png,1,1,5,5,a\nghost.png,1,1,5,5,a\n")
    args.data_root, args.fraction, args.skip_bad = str(tmp_path / "b"), 1.0, False
    with pytest.raises(SystemExit, match="ghost"):
        es.load_splits(args, 64)


def _vit_export(tmp_path, size=64):
    torch.manual_seed(0)
    enc = common.ImageEncoder("vit_tiny", config=dict(image_size=size, width=32, layers=1, heads=2, mlp=64))
    path = tmp_path / "place_run" / "image_encoder.pt"
    path.parent.mkdir(exist_ok=True)
    common.export_image_encoder(str(path), enc, 0.5, 0.25, size, "place")
    return str(path)


def test_setr_head_follows_mgca_layout():
    head = es.SETRHead([32], n_classes=2)
    convs = [m for m in head.decoder if isinstance(m, nn.Sequential)]
    assert [c[0].out_channels for c in convs] == [512, 256, 128, 64]  # MGCA's decode_features
    assert head(torch.randn(2, 1, 64, 64), [torch.randn(2, 32, 4, 4)]).shape == (2, 2, 64, 64)  # x16: patch 16


def test_end_to_end_vit_export_setr_and_linear(tmp_path):
    path = _vit_export(tmp_path)
    out = tmp_path / "vit"
    rows = es.main(["--encoder", path, "--encoder", "random", "--synthetic-samples", "10", "--image-size", "64",
                    "--batch-size", "8", "--head", "setr", "--head", "linear", "--epochs", "1", "--seeds", "1",
                    "--out", str(out)])
    assert [(r["encoder"], r["head"]) for r in rows] == [("place_run", "setr"), ("place_run", "linear"),
                                                         ("random-vit_tiny", "setr"), ("random-vit_tiny", "linear")]
    assert all(0 <= r["dice"][0] <= 1 for r in rows)
    with pytest.raises(SystemExit, match="five stages"):  # the U-Net needs a CNN
        es.main(["--encoder", path, "--synthetic-samples", "10", "--image-size", "64", "--head", "unet",
                 "--epochs", "1", "--seeds", "1", "--out", str(out)])
    with pytest.raises(SystemExit, match="--image-size 64"):  # fixed position embeddings
        es.main(["--encoder", path, "--synthetic-samples", "10", "--image-size", "96", "--epochs", "1",
                 "--out", str(out)])


def test_positive_control_held_out_score_is_the_findings_mean_dice():
    """The learning rate is chosen on held-out images by eval_seg's dataset-level Dice: a map that is the masks
    themselves scores 1, its negation 0, the class order matters, a finding absent and not predicted counts 1."""
    import positive_control

    class Masks(nn.Module):  # "encoder" whose last map is the held-out masks as logits (+-4)
        def feature_maps(self, x):
            return [8 * masks.float() - 4]

    masks = torch.zeros(3, 5, 16, 16, dtype=torch.bool)
    masks[0, 1, 4:8, 4:8] = masks[1, 3, :, :8] = masks[2, 0, 10:, 10:] = True
    masks[0, 2, 12:, :] = masks[2, 4, 4:12, 4:12] = True  # every finding present somewhere
    batch, identity = dict(image=torch.zeros(3, 1, 16, 16), masks=masks), nn.Conv2d(5, 5, 1)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(5)[:, :, None, None]), identity.bias.zero_()
    score, loss = positive_control.validate(identity, Masks(), batch, "masks")
    assert score == pytest.approx(1.0)
    with torch.no_grad():
        identity.weight.neg_()
    assert positive_control.validate(identity, Masks(), batch, "masks")[0] == 0.0
    with torch.no_grad():
        identity.weight.copy_(torch.eye(5)[[1, 0, 2, 3, 4]][:, :, None, None])  # opacity and nodule swapped
    assert positive_control.validate(identity, Masks(), batch, "masks")[0] == pytest.approx(0.6)
    masks[2, 4] = False  # cardiomegaly absent from the images and (through the map) from the prediction: Dice 1
    assert positive_control.validate(identity, Masks(), batch, "masks")[0] == pytest.approx(0.6)


def test_positive_and_untrained_controls_export_the_methods_architecture(tmp_path):
    """tests/positive_control.py trains the architecture of an export (here JoImTeRNet's soft-attention ResNet) on
    the findings' masks at each learning rate and exports the one whose loss falls lowest; --epochs 0 exports that
    seed's untrained encoder; eval_seg judges both like any method's export."""
    import positive_control
    like = tmp_path / "joim.pt"
    common.export_image_encoder(str(like), common.SoftAttentionResNet(32, (4, 8, 8, 16, 16, 32), 1), 0.5, 0.2, 64,
                                "joimternet")
    flags = ["--like", str(like), "--train-samples", "16", "--val-samples", "8", "--batch-size", "8",
             "--lr", "3e-3", "1e-5"]
    losses, held_out = positive_control.main(flags + ["--epochs", "4", "--out-dir", str(tmp_path / "pos")])
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]) and sorted(held_out) == [1e-5, 3e-3]
    chosen = max(held_out, key=lambda lr: (held_out[lr][0], -held_out[lr][1]))  # best held-out Dice, then loss
    assert positive_control.main(flags + ["--epochs", "0", "--out-dir", str(tmp_path / "untrained")])[0] == []
    for kind, folder in (("positive-control-masks", "pos"), ("untrained-control", "untrained")):
        encoder, meta = common.load_image_encoder(str(tmp_path / folder / "image_encoder.pt"))
        assert (meta["arch"], meta["image_size"], meta["method"]) == ("joimternet-resnet", 64, kind)
        assert meta["config"] == dict(dim=32, widths=[4, 8, 8, 16, 16, 32], stem_stride=1)
        assert list(meta["args"]["lr"]) == [chosen if folder == "pos" else 3e-3]  # untrained: the first
    torch.manual_seed(1)  # --seed 1: the untrained control is that seed's initialisation
    fresh = common.SoftAttentionResNet(32, (4, 8, 8, 16, 16, 32), 1).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in encoder.state_dict().items())
    es.main(["--encoder", str(tmp_path / "pos" / "image_encoder.pt"), "--synthetic-samples", "20", "--image-size", "64",
             "--epochs", "1", "--seeds", "1", "--out", str(tmp_path / "seg")])
    assert json.load(open(tmp_path / "seg.json"))[0]["method"] == "positive-control-masks"

"""Detection with a frozen or fine-tuned pre-trained image encoder: mAP over IoU 0.40-0.75 and fROC.

Every method exports `image_encoder.pt` (its architecture, configuration and weights, so that
eval_seg.load_encoders rebuilds any encoder of the suite from it); this script trains a detector on its conv3-conv5
stages and reports mAP, so that encoders from different methods (and the `random` / `imagenet` baselines) are
compared by the same yardstick.

    python eval_det.py --encoder runs/lovt/image_encoder.pt --encoder random            # synthetic, CPU
    python eval_det.py --encoder runs/lovt/image_encoder.pt --finetune
    python eval_det.py --dataset rsna --data-root DIR --fraction 0.1 --lr 1e-3 --seeds 5 --device cuda
    python eval_det.py --dataset object-cxr --data-root DIR --split-csv lovt/datasets/object-CXR

A DIFFERENT DETECTOR THAN THE PAPERS. LoVT and MGCA put a YOLOv3 head on conv3-conv5 (philip-mueller/lovt:
src/models/downstream/detection.py; HKU-MedAI/MGCA:mgca/models/ssl_detector.py).
This script uses torchvision's FCOS (anchor-free, one point per feature-map cell) on an FPN over c3-c5 of the
exported encoder, so its numbers compare encoders within this suite and are NOT
comparable with the YOLOv3 numbers in the papers' tables.

A ViT export (one patch map at stride 16) gets ViTDet's simple feature pyramid first (Li et al. 2022,
"Exploring Plain Vision Transformer Backbones for Object Detection", Sec. 3; facebookresearch/detectron2:
detectron2/modeling/backbone/vit.py:SimpleFeaturePyramid), built from the last map only: c3 = a learned
2×2 deconvolution (stride 8, C/2 channels), c4 = the map, c5 = 2×2 max-pooling (stride 32); then the same
FPN and FCOS head. Our choice: the FPN keeps its top-down path (ViTDet finds it unnecessary, not harmful),
and the deconvolution belongs to the detector (it trains with the frozen encoder's cached map).

Detector: FPN (torchvision FeaturePyramidNetwork, `--fpn-channels` wide: 128, or 64 in the synthetic CPU
demo, which also defaults to batch 16 and 15 epochs) on c3, c4, c5 (strides 8, 16, 32) -> P3-P5; FCOS
head with `--head-convs` conv-GroupNorm-ReLU layers per branch (classification, box regression +
centerness), focal loss, GIoU loss. Anchor sizes = strides (8, 16, 32 px): FCOS then
assigns a box to P3 when its largest centre-to-side distance is < 64 px, P4 < 128 px, else P5, which
covers CXR findings at 224 px (RSNA opacities ~40-100 px, foreign objects ~5-30 px, NIH up to ~200 px).
The input is the 1-channel image with the dataset-level scalar normalization (below); the ResNet runs
outside torchvision's detection wrapper, whose own transform is neutralised anyway (image_mean 0,
image_std 1, min/max size = the evaluation size). Inference: score > `--score-thresh` (0.05), NMS at
`--nms-thresh` (0.5), at most 100 boxes per image.

Protocol (LoVT, as eval_seg.py, shared harness): pad to a square and resize (224 px; 128 for synthetic),
no augmentation, scalar mean/std of the downstream train split (also for the baselines), Adam with
weight decay 1e-6, ReduceLROnPlateau on the validation loss (patience 3, factor 0.5), early stopping on
the validation mAP (fROC for Object-CXR), test on the best validation state, `--lr-grid` as eval_seg.py (one
seed-0 run per value, the best validation metric picks the lr), `--seeds N` runs reported
as mean ± 1.96·s/√N. Frozen: the encoder in eval mode (BN running statistics), its c3-c5 maps computed
once and cached while they fit in `--cache-gb`. `--finetune`: the encoder stays frozen for
`--warmup-steps` optimizer steps at lr 1e-3, then everything trains at `--lr` (LoVT).

Metrics (pure functions below; boxes in the evaluation frame, i.e. pixels of the padded, resized image):
  map        AP per class with 101-point interpolated precision (recall 0, 0.01, ..., 1), averaged over
             the classes that have ground truth and over IoU 0.40, 0.45, ..., 0.75 (8 thresholds;
             RSNA-Kaggle style, LoVT). Matching per image, greedy by score: each prediction takes the
             unmatched ground-truth box of its class with the highest IoU >= t, else it is a false
             positive (COCO's rule = the `soft` policy of bes-dev/mean_average_precision that LoVT calls).
             Two differences from that package: IoU on continuous coordinates (it adds VOC's +1 pixel
             to widths and heights), and classes without test boxes are left out (it counts them as 0).
  map50, map75  the same at one threshold.
  froc       Object-CXR challenge: sensitivity averaged at 0.125, 0.25, 0.5, 1, 2, 4, 8 false positives
             per image; a prediction hits when its box centre lies inside a ground-truth box of its class
             (each object counts once; more hits on a found object are neither hits nor false positives).
"""
import argparse
import copy
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from tqdm.auto import tqdm

import data
from eval_seg import (Batches, add_common_eval_args, extract_features, finetune_phase, load_encoders, load_splits,
                      print_table, select_lr, summarize, write_results)

IOU_THRESHOLDS = tuple(np.round(np.arange(0.40, 0.76, 0.05), 2).tolist())  # 0.40 ... 0.75, 8 values
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
FROC_FPS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

# ==== METRICS: predictions = [dict(boxes N×4 xyxy, scores N, labels N)] per image; ground truth =
# [dict(boxes M×4, labels M)] per image; numpy arrays (or anything np.asarray takes) ====


def box_iou(a, b):
    """IoU of every pair: a N×4, b M×4 (x1, y1, x2, y2) -> N×M."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter / np.maximum(union, 1e-12)


def _class_view(items, c, scores=False):
    """The boxes (and scores) of class c in every image."""
    out = []
    for it in items:
        keep = np.asarray(it["labels"]).reshape(-1) == c
        boxes = np.asarray(it["boxes"], np.float64).reshape(-1, 4)[keep]
        out.append((boxes, np.asarray(it["scores"], np.float64).reshape(-1)[keep]) if scores else boxes)
    return out


def average_precision(preds, gts, c, iou_threshold):
    """AP of class c (101-point interpolation); nan when no image has a ground-truth box of class c."""
    gt = _class_view(gts, c)
    n_gt = sum(len(g) for g in gt)
    if n_gt == 0:
        return float("nan")
    scores, hits = [], []
    for (boxes, s), g in zip(_class_view(preds, c, scores=True), gt):
        order = np.argsort(-s, kind="stable")
        hit = np.zeros(len(order), bool)  # without ground truth in the image every prediction is a miss
        if len(g):
            iou = box_iou(boxes[order], g)
            taken = np.zeros(len(g), bool)
            for i in range(len(order)):  # greedy by score: the best free ground truth above the threshold
                if taken.all():
                    break  # every ground truth is matched: the rest are misses
                cand = np.where(taken, -1.0, iou[i])
                j = int(np.argmax(cand))
                if cand[j] >= iou_threshold:
                    taken[j] = hit[i] = True
        hits.append(hit)
        scores.append(s[order])
    if not any(len(s) for s in scores):
        return 0.0  # no prediction of the class in any image
    scores, hits = np.concatenate(scores), np.concatenate(hits)
    order = np.argsort(-scores, kind="stable")  # all predictions of the class, by score
    tp = np.cumsum(hits[order])
    recall = tp / n_gt
    precision = tp / np.arange(1, len(tp) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at this recall or beyond
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")  # first rank that reaches each recall
    return float(np.mean([envelope[i] if i < len(recall) else 0.0 for i in idx]))


def detection_map(preds, gts, num_classes, thresholds=IOU_THRESHOLDS):
    """dict(map = mean over thresholds of the class-mean AP, map50, map75, ap_per_class = mean over
    thresholds, per class (nan without ground truth)). Classes without ground truth are left out."""
    ap = {t: np.array([average_precision(preds, gts, c, t) for c in range(num_classes)])
          for t in sorted(set(thresholds) | {0.5, 0.75})}
    if np.isnan(ap[0.5]).all():
        raise ValueError("no ground-truth boxes in this split: mAP is undefined")
    main = np.stack([ap[t] for t in thresholds])  # thresholds × classes
    return dict(map=float(np.nanmean(main, axis=1).mean()), map50=float(np.nanmean(ap[0.5])),
                map75=float(np.nanmean(ap[0.75])), ap_per_class=main.mean(0).tolist())


def froc(preds, gts, fps=FROC_FPS):
    """(mean sensitivity, sensitivity at each fps): Object-CXR's fROC with the centre-in-box hit rule.
    At each score threshold: sensitivity = found objects / all objects, false positives per image = misses /
    images; the sensitivity at f is the best one reached with at most f false positives per image."""
    events, offset = [], 0  # (score, ids of the objects its centre lies in), object ids numbered over images
    for p, g in zip(preds, gts):
        gb, gl = np.asarray(g["boxes"], np.float64).reshape(-1, 4), np.asarray(g["labels"]).reshape(-1)
        pb = np.asarray(p["boxes"], np.float64).reshape(-1, 4)
        cx, cy = (pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2
        inside = ((gb[None, :, 0] <= cx[:, None]) & (cx[:, None] <= gb[None, :, 2]) &
                  (gb[None, :, 1] <= cy[:, None]) & (cy[:, None] <= gb[None, :, 3]) &
                  (np.asarray(p["labels"]).reshape(-1)[:, None] == gl[None, :]))
        for s, row in zip(np.asarray(p["scores"]).reshape(-1), inside):
            events.append((float(s), set((offset + np.flatnonzero(row)).tolist())))
        offset += len(gb)
    n_obj, n_img = offset, len(gts)
    if n_obj == 0:
        raise ValueError("no ground-truth boxes in this split: fROC is undefined")
    found, false_pos, curve = set(), 0, [(0.0, 0.0)]  # (fp per image, sensitivity) after each prediction
    for _, hit in sorted(events, key=lambda e: -e[0]):
        if hit:
            found |= hit
        else:
            false_pos += 1
        curve.append((false_pos / n_img, len(found) / n_obj))
    sens = [max(se for f_, se in curve if f_ <= f) for f in fps]
    return float(np.mean(sens)), sens


# ==== MODEL ====


class Pyramid(nn.Module):
    """[c1 .. c5] of a CNN -> FPN(c3, c4, c5) -> [P3, P4, P5]; [patch map] of a ViT (stride 16) -> ViTDet's simple
    pyramid (deconv ×2, identity, max-pool ÷2) -> the same FPN."""

    def __init__(self, channels, fpn_channels):
        super().__init__()
        c = channels[-1]
        self.up = nn.ConvTranspose2d(c, c // 2, 2, stride=2) if len(channels) == 1 else None
        self.fpn = FeaturePyramidNetwork([c // 2, c, c] if self.up is not None else channels[2:5], fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, stages):
        x = stages[-1]
        c345 = [self.up(x), x, F.max_pool2d(x, 2)] if self.up is not None else stages[-3:]
        return list(self.fpn(OrderedDict(zip(("c3", "c4", "c5"), c345))).values())


def build_detector(channels, num_classes, image_size, fpn_channels=128, head_convs=2, score_thresh=0.05,
                   nms_thresh=0.5):
    """Pyramid (FPN over c3-c5, or ViTDet's simple pyramid + FPN for a ViT) + torchvision FCOS head. The returned
    FCOS's `backbone` is only the pyramid: the encoder runs outside (frozen: cached features), see `detect`."""
    fpn = Pyramid(channels, fpn_channels)
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,)), aspect_ratios=((1.0,),) * 3)
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    return FCOS(fpn, num_classes, min_size=image_size, max_size=image_size, image_mean=[0.0], image_std=[1.0],
                anchor_generator=anchors, head=head, score_thresh=score_thresh, nms_thresh=nms_thresh,
                detections_per_img=100)


def detect(model, stages, image_size, targets=None):
    """FCOS on given encoder stages ([.., c3, c4, c5] or a ViT's [patch map]). -> (losses or None, detections or None):
    losses when targets (list of dict(boxes n×4, labels n)) are given, detections when the model is in eval
    mode. torchvision's FCOS.forward, minus its transform (inputs are already normalized and resized)."""
    feats = model.backbone(stages)
    b = feats[0].shape[0]
    images = ImageList(feats[0].new_zeros(1, 1, 1, 1).expand(b, 1, image_size, image_size),
                       [(image_size, image_size)] * b)
    head_outputs = model.head(feats)
    anchors = model.anchor_generator(images, feats)
    per_level = [f.shape[2] * f.shape[3] for f in feats]
    losses = model.compute_loss(targets, head_outputs, anchors, per_level) if targets is not None else None
    detections = None
    if not model.training:
        split = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
        detections = model.postprocess_detections(split, [list(a.split(per_level)) for a in anchors],
                                                  images.image_sizes)
    return losses, detections


def total_loss(losses):
    return losses["classification"] + losses["bbox_regression"] + losses["bbox_ctrness"]


# ==== TRAINING ====


def targets_of(split, idx, device):
    """FCOS targets of the images idx; degenerate boxes (zero width/height after resizing) are dropped."""
    out = []
    for i in idx.tolist():
        boxes, labels = split["boxes"][i].float().reshape(-1, 4), split["box_labels"][i].long().reshape(-1)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        out.append(dict(boxes=boxes[keep].to(device), labels=labels[keep].to(device)))
    return out


@torch.no_grad()
def evaluate(model, backbone, batches, split, image_size, batch_size, num_classes):
    """Validation/test loss, mAP (+ map50, map75, per-class AP) and fROC of one split."""
    model.eval()
    backbone.eval()
    loss_sum, preds, gts = 0.0, [], []
    for i in range(0, len(batches), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(batches)))
        _, stages, _ = batches.get(idx, backbone)
        targets = targets_of(split, idx, batches.device)
        losses, dets = detect(model, stages, image_size, targets)
        loss_sum += total_loss(losses).item() * len(idx)
        preds += [{k: v.cpu().numpy() for k, v in d.items()} for d in dets]
        gts += [{k: v.cpu().numpy() for k, v in t.items()} for t in targets]
    m = detection_map(preds, gts, num_classes)
    m["froc"], m["froc_at"] = froc(preds, gts)
    m["loss"] = loss_sum / len(batches)
    return m


def train_one(args, backbone, task_data, num_classes, seed):
    """One run: train the detector (and the encoder after the warm-up when fine-tuning) with early stopping
    on the validation metric; return the test metrics of the best validation state."""
    torch.manual_seed(seed)
    device, finetune, size = args.device, args.finetune, args.image_size
    if finetune:
        backbone = copy.deepcopy(backbone)  # every seed starts from the exported weights
    backbone.to(device)
    model = build_detector(backbone.stage_channels, num_classes, size, args.fpn_channels, args.head_convs,
                           args.score_thresh, args.nms_thresh).to(device)
    params = list(model.parameters()) + (list(backbone.parameters()) if finetune else [])
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=1e-6)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=3)
    (train, val, test), (train_split, val_split, test_split) = task_data["batches"], task_data["splits"]
    gen = torch.Generator().manual_seed(seed)
    step, best, best_state, bad_epochs = 0, -1.0, None, 0
    bar = tqdm(range(args.epochs), desc=f"  seed {seed}", leave=False)
    for epoch in bar:
        for idx in torch.randperm(len(train), generator=gen).split(args.batch_size):
            encoder_trains = finetune_phase(args, backbone, opt, step, finetune)
            model.train()
            _, stages, _ = train.get(idx, backbone, encoder_grad=encoder_trains)
            losses, _ = detect(model, stages, size, targets_of(train_split, idx, device))
            loss = total_loss(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        m = evaluate(model, backbone, val, val_split, size, args.batch_size, num_classes)
        plateau.step(m["loss"])
        bar.set_postfix(loss=f"{loss.item():.3f}", val_loss=f"{m['loss']:.3f}", val=f"{m[args.metric]:.3f}")
        if m[args.metric] > best:  # keep the best validation state in memory; the test uses it
            best, bad_epochs = m[args.metric], 0
            best_state = copy.deepcopy((model.state_dict(), backbone.state_dict() if finetune else None))
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                break
    model.load_state_dict(best_state[0])
    if finetune:
        backbone.load_state_dict(best_state[1])
    result = evaluate(model, backbone, test, test_split, size, args.batch_size, num_classes)
    result.update(epochs=epoch + 1, best_val=best)
    backbone.cpu()
    return result


def c345_bytes(backbone, image_size):
    """float32 bytes of one image's c3, c4, c5 maps (ResNet-50 at 224 px: 2.8 MB) or of a ViT's patch map."""
    with torch.no_grad():
        stages = backbone.eval().feature_maps(torch.zeros(1, 1, image_size, image_size))
    return 4 * sum(s.numel() for s in stages[-3:])


def main(argv=None):
    parser = add_common_eval_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    a = parser.add_argument
    a("--finetune", action="store_true", help="train the encoder too, after the frozen warm-up")
    a("--warmup-steps", type=int, default=100, help="fine-tune: frozen-encoder steps first (LoVT: 100)")
    a("--warmup-lr", type=float, default=1e-3, help="fine-tune: lr of the warm-up steps")
    a("--metric", choices=["map", "froc"], default=None,
      help="validation metric for early stopping (default: froc for object-cxr, else map)")
    a("--fpn-channels", type=int, default=None, help="width of the FPN and the FCOS head (128; synthetic 64)")
    a("--head-convs", type=int, default=2, help="conv-GN-ReLU layers per FCOS branch (torchvision default 4)")
    a("--score-thresh", type=float, default=0.05, help="inference: drop boxes scored below")
    a("--nms-thresh", type=float, default=0.5, help="inference: NMS IoU")
    a("--cache-gb", type=float, default=8.0, help="frozen: cache c3-c5 of all splits when they fit")
    parser.set_defaults(batch_size=None)
    args = parser.parse_args(argv)
    synthetic = args.dataset in data.SYNTHETIC_CONTRAST  # the CPU demo: a lighter head, more (smaller) steps
    args.encoder = args.encoder or ["random"]
    args.image_size = args.image_size or (128 if synthetic else 224)
    args.batch_size = args.batch_size or (16 if synthetic else 64)
    args.fpn_channels = args.fpn_channels or (64 if synthetic else 128)
    if args.image_size % 32:
        raise SystemExit(f"--image-size {args.image_size}: must be a multiple of 32 (stride of c5)")
    args.epochs = args.epochs or (15 if synthetic else 100)
    args.metric = args.metric or ("froc" if args.dataset == "object-cxr" else "map")
    args.lr = args.lr or (1e-4 if args.finetune else 1e-3)
    t0 = time.time()

    splits, classes = load_splits(args, args.image_size, task="det")
    for s, d in splits.items():
        n_boxes = sum(len(b) for b in d["boxes"])
        print(f"{args.dataset} {s}: {len(d['images'])} images, {n_boxes} boxes"
              + (f", {d['skipped']} skipped" if d["skipped"] else ""))
        if n_boxes == 0 and s != "train":
            raise SystemExit(f"{args.dataset}: the {s} split has no boxes, so mAP is undefined (more data?)")
    mean, std = data.pixel_stats(splits["train"]["images"])
    print(f"train-split normalization: mean {mean:.4f}, std {std:.4f}; classes: {', '.join(classes)}")

    rows, mode = [], "finetune" if args.finetune else "frozen"
    order = ("train", "validate", "test")
    for name, backbone, meta in load_encoders(args.encoder, args.image_size):
        n_all = sum(len(d["images"]) for d in splits.values())
        cached = not args.finetune and c345_bytes(backbone, args.image_size) * n_all <= args.cache_gb * 2 ** 30
        t = time.time()
        feats = dict.fromkeys(order)
        if cached:  # frozen encoder + no augmentation: the features never change, so compute them once
            backbone.to(args.device)
            levels = [2, 3, 4] if len(backbone.stage_channels) == 5 else [-1]  # c3-c5, or a ViT's patch map
            feats = {s: extract_features(backbone, splits[s]["images"], mean, std, levels, args.batch_size,
                                         args.device) for s in order}
            backbone.cpu()
        task_data = dict(batches=[Batches(splits[s], mean, std, args.device, feats[s]) for s in order],
                    splits=[splits[s] for s in order])
        run = lambda lr, seed: train_one(argparse.Namespace(**{**vars(args), "lr": lr}), backbone, task_data,
                                         len(classes), seed)
        lr, runs, trials = select_lr(args.lr_grid or [args.lr], run, args.seeds, "best_val", f"{name} {mode}")
        row = dict(encoder=name, method=meta.get("method", ""), mode=mode, lr=lr,
                   map=[r["map"] for r in runs], map50=[r["map50"] for r in runs],
                   map75=[r["map75"] for r in runs], froc=[r["froc"] for r in runs])
        for c, cls in enumerate(classes):
            row[f"ap/{cls}"] = [r["ap_per_class"][c] for r in runs]
        if len(trials) > 1:
            row[f"val_{args.metric}_by_lr"] = " ".join(f"{v:g}:{100 * r['best_val']:.2f}" for v, r in trials.items())
        row.update(epochs=runs[-1]["epochs"], seconds=round(time.time() - t, 1))
        rows.append(row)
        print(f"{name} {mode}: test mAP {100 * summarize(row['map'])[0]:.2f} %, fROC "
              f"{100 * summarize(row['froc'])[0]:.2f} % ({row['seconds']} s, "
              f"{'cached features' if cached else 'live encoder'})")

    print(f"\nDetection, {args.dataset} ({args.image_size} px, train fraction {args.fraction}, {args.seeds} seed(s)), "
          f"FCOS on FPN(c3-c5; ViT: ViTDet's simple pyramid) - not the papers' YOLOv3; test metrics in %, "
          f"mean ± 1.96·s/√N over seeds.\n"
          f"map = AP (101-point) averaged over classes with ground truth and IoU 0.40:0.05:0.75; "
          f"froc = sensitivity averaged at 1/8 ... 8 false positives per image, centre-in-box hits.")
    print_table(rows, ["encoder", "mode", "lr", "map", "map50", "map75", "froc", "epochs"])
    if len(classes) > 1:
        print("\nPer-class AP over IoU 0.40-0.75 (%; nan = no test box of that class):")
        print_table(rows, ["encoder", "mode"] + [f"ap/{c}" for c in classes])
    out = args.out or os.path.join("runs", "eval_det", args.dataset)
    paths = write_results(out, rows)
    print(f"\nwrote {' and '.join(paths)}; total {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()

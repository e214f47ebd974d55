"""Segmentation with a frozen or fine-tuned pre-trained image encoder: LoVT's evaluation protocol.

Every method exports `image_encoder.pt` (its architecture, configuration and weights, so that any encoder of the
suite is rebuilt from it); this script trains a segmentation head on top of it and reports Dice, so that encoders
from different methods (and the `random` / `imagenet` baselines) are compared by the same yardstick.

    python eval_seg.py --encoder runs/lovt/image_encoder.pt --encoder random           # synthetic, CPU
    python eval_seg.py --encoder runs/lovt/image_encoder.pt --head unet --finetune
    python eval_seg.py --dataset siim --data-root DIR --head unet --lr 3e-5 --seeds 5 --device cuda

Protocol (LoVT, `philip-mueller/lovt`, configs/experiment/eval): pad to a square and resize (224 px;
128 for synthetic), no augmentation, scalar mean/std of the downstream train split (also for the
baselines), Adam with weight decay 1e-6, ReduceLROnPlateau on the validation loss (patience 3, factor
0.5), early stopping on the validation Dice, test on the best validation checkpoint (kept in memory),
`--seeds N` runs, reported as mean ± 1.96·s/√N.

Heads:
  linear  1×1 conv on conv5 + bilinear upsampling to the mask size, frozen encoder (LoVT tasks 7-9, 12, 17, 18)
  hypercolumn  our choice: a linear probe that also sees the finer maps (Hariharan et al., CVPR 2015): 1×1 conv on
          each of conv3, conv4, conv5, summed at conv3's stride-8 grid, upsampled bilinearly to the mask size;
          frozen encoder. Small findings (a 5-10 px nodule at 128 px) fall between the cells of conv5's 4×4 grid.
          On a ViT (one patch map) it is the linear head.
  unet    LoVT's ResUNet (after kevinlu1211's ResNet-50 U-Net): bridge 2×(conv3×3-BN-ReLU, C5), five
          up-blocks ConvTranspose(2×2, s2) + concat skip + 2×(conv3×3-BN-ReLU) with widths C5/2 … C5/32,
          skips conv4, conv3, conv2, conv1 (stem) and the input, 1×1 conv to the classes. For ResNet-50
          (C5 = 2048) this is exactly 1024/512/256/128/64. Frozen, or `--finetune`: the encoder stays
          frozen for `--warmup-steps` optimizer steps at lr 1e-3, then everything trains at `--lr`.
  setr    MGCA's SETR-style decoder for a ViT (HKU-MedAI/MGCA:mgca/models/backbones/transformer_seg.py:
          SETRModel with sample_rate 4): a per-patch Linear(C, C) on the patch-token map, four stages of
          conv3×3-BN-ReLU + bilinear ×2 upsampling with widths 512/256/128/64, a final conv3×3 to the classes
          (patch 16: 14×14 -> 224×224); frozen encoder (MGCA's protocol). On a ResNet it reads conv5 and the
          output is resized to the input.

A ViT export (ImageEncoder vit_b16 / vit_tiny) has one feature map, the patch grid after the final
LayerNorm (stride 16), so it takes the `linear` and `setr` heads; the U-Net needs the five ResNet stages
and refuses it. The ViT is evaluated at its pre-training size (its position embeddings are not resized).

Metrics (state them next to every table):
  dice       dataset-level (micro) Dice as LoVT reports it: all test pixels pooled, sigmoid > 0.5,
             2TP / (2TP + FP + FN); multi-class tasks: per-class Dice and their mean.
  dice_img   mean of per-image Dice; an image whose mask and prediction are both empty counts as 1.
  iou        dataset-level (micro) IoU, TP / (TP + FP + FN), mean over classes.

Frozen encoders with no augmentation give the same features every epoch, so the features are computed
once per encoder and the head trains on the cache (conv5 for `linear`; all five stages for `unet`
while they fit in `--cache-gb`, otherwise the frozen encoder runs under no_grad in every step).

LoVT's segmentation tasks (ResNet-50, 224 px, 5 seeds, LoVT's split files; add to each line
`--encoder E --data-root R --split-csv S --seeds 5`):
  RSNA opacity 1 %        --dataset rsna --fraction 0.01 --batch-size 8 --epochs 500 --patience 20
                          --lr-grid 3e-2 1e-2 3e-3 1e-4  (10 % / 100 %: --batch-size 64 --epochs 100 / 50
                          --patience 10 --lr-grid 3e-2 1e-2 3e-3 1e-3)
  COVID rural             --dataset covid-rural --batch-size 8 --epochs 100 --patience 20 and
                          --head unet --finetune --warmup-steps 20 --lr-grid 1e-4 3e-4 | --head unet
                          --lr-grid 1e-4 3e-4 1e-3 | --lr-grid 3e-2 1e-2 3e-3 1e-3 (linear)
  SIIM pneumothorax       --dataset siim --head unet [--finetune] --epochs 50 --lr-grid 3e-5 1e-5
  Object-CXR              --dataset object-cxr --lr-grid 3e-1 1e-1 3e-2 1e-2
  NIH, 8 box classes      --dataset nih --lr-grid 1e-1 3e-2 1e-2   (Dice = mean of the 8 class Dices)
`--lr-grid` is LoVT's LR selection: one seed-0 run per value; the best validation Dice (eval_det.py: the
validation mAP) picks the lr of all seeds.

Deviations from LoVT: `random` and `imagenet` take the architecture of the first exported encoder in
the list (ResNet-50 if none), so that the baseline matches what it is compared with; the random encoder
is initialised with torch seed 0 (the same in every run); the U-Net input skip has 1 channel, not 3.
"""
import argparse
import copy
import csv
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import common
import data

# ==== SHARED HARNESS (eval_det.py imports these) ====


def add_common_eval_args(parser):
    """Flags shared by eval_seg.py and eval_det.py."""
    a = parser.add_argument
    a("--encoder", action="append", default=None,
      help="image_encoder.pt | random[:arch] | imagenet[:resnet18|resnet50|vit_b16]; repeat to compare "
           "(default: random)")
    a("--dataset", default="synthetic",
      help="synthetic | synthetic-faint | rsna | siim | covid-rural | object-cxr | nih | folder")
    a("--data-root", default=None, help="dataset folder (not needed for synthetic)")
    a("--split-csv", default=None, help="LoVT's split folder (train/validation/test.csv) or a CSV with id and "
                                         "split columns (default: a seeded 60/20/20 split by patient)")
    a("--fraction", type=float, default=1.0, help="fraction of the training split: the first rows of "
                                                  "--split-csv (LoVT), else a seeded random subset")
    a("--seeds", type=int, default=3, help="runs per encoder; mean ± 1.96·s/√N is reported")
    a("--image-size", type=int, default=None, help="square input size (default 224; 128 for synthetic)")
    a("--epochs", type=int, default=None, help="maximum epochs")
    a("--lr", type=float, default=None, help="learning rate of the head (and of the encoder when fine-tuned)")
    a("--batch-size", type=int, default=64)
    a("--patience", type=int, default=10, help="early stopping: epochs without a better validation metric")
    a("--lr-grid", type=float, nargs="+", default=None,
      help="LoVT's LR selection: one seed-0 run per value, the best validation metric picks the lr of all seeds")
    a("--out", default=None, help="results file stem: writes OUT.json and OUT.csv")
    a("--synthetic-samples", type=int, default=None, help="synthetic: number of images, split 60/20/20 (default 500)")
    a("--skip-bad", action="store_true", help="skip unreadable / inconsistent records and count them")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def load_encoders(specs, image_size):
    """specs: list of `path/to/image_encoder.pt`, `random[:arch]`, `imagenet[:arch]`.

    Returns [(name, encoder, meta)]: encoder = the suite's image encoder rebuilt from the export (a 1-channel
    torchvision ResNet, JoImTeRNet's soft-attention ResNet, ...), in eval mode on the CPU, with
    encoder.feature_maps(x) -> [c1 .. c5] at strides 2 .. 32 and encoder.stage_channels; meta = the exported dict
    without the state dict (for the baselines: arch and method). `random` without an arch is the architecture (and
    configuration) of the first exported encoder in `specs`, randomly initialised, so that the baseline matches;
    `imagenet` without an arch takes the first exported ResNet's or ViT-B/16's (ResNet-50 if there is none).
    """
    loaded = {}
    for spec in specs:
        if spec.split(":")[0] in ("random", "imagenet"):
            continue
        if not os.path.isfile(spec):
            raise SystemExit(f"--encoder {spec}: no such file (expected an exported image_encoder.pt, "
                             f"`random[:arch]` or `imagenet[:arch]`)")
        try:
            encoder, meta = common.load_image_encoder(spec)
        except (AttributeError, KeyError, RuntimeError, ValueError) as e:  # not an export, missing keys, wrong shapes
            raise SystemExit(f"--encoder {spec}: not an image_encoder.pt exported by this suite "
                             f"({type(e).__name__}: {e})")
        if meta.get("image_size") not in (None, image_size):
            print(f"note: {spec} was pre-trained at {meta['image_size']} px and is evaluated at {image_size} px")
        loaded[spec] = (encoder, meta)
    first = next((meta for _, meta in loaded.values()), dict(arch="resnet50"))
    first_pretrained = next((m["arch"] for _, m in loaded.values()
                             if m["arch"] in ("resnet18", "resnet50", "vit_b16")), "resnet50")

    encoders, names = [], set()
    for spec in specs:
        if spec in loaded:
            encoder, meta = loaded[spec]
            folder, file = os.path.split(os.path.abspath(spec))
            name = os.path.basename(folder) if file == "image_encoder.pt" else os.path.splitext(file)[0]
        else:
            kind, _, arch = spec.partition(":")
            arch = arch or (first["arch"] if kind == "random" else first_pretrained)
            config = first.get("config") if arch == first["arch"] else None
            torch.manual_seed(0)  # the same random encoder in every run
            # common.ImageEncoder: 1-channel conv1, ImageNet conv1 summed over RGB (= grayscale repeated).
            try:
                encoder = common.build_image_encoder(arch, config, weights=None if kind == "random" else "imagenet")
            except ValueError as e:
                raise SystemExit(f"--encoder {spec}: {e}") from None
            except SystemExit as e:  # common's clear message when the ImageNet weights cannot be had
                raise SystemExit(f"{e}\nHere: evaluate `--encoder random` or an exported image_encoder.pt "
                                 f"instead.") from None
            meta, name = dict(arch=arch, config=config, method=kind), f"{kind}-{arch}"
        check_strides(spec, encoder, image_size)
        while name in names:  # e.g. two runs/*/lovt/image_encoder.pt
            name += "'"
        names.add(name)
        encoders.append((name, encoder.eval(), meta))
    return encoders


def check_strides(spec, encoder, image_size):
    """The heads need c1 .. c5 at strides 2, 4, 8, 16, 32 (JoImTeRNet with --stem-stride 4 has 8 .. 128), or a
    ViT's one patch map at its pre-training size (fixed position embeddings)."""
    if getattr(encoder, "is_vit", False):
        if image_size != encoder.config["image_size"]:
            raise SystemExit(f"--encoder {spec}: a {encoder.arch} pre-trained at {encoder.config['image_size']} px "
                             f"is evaluated at that size: pass --image-size {encoder.config['image_size']}")
        return
    with torch.no_grad():
        sides = [m.shape[-1] for m in encoder.eval().feature_maps(torch.zeros(1, 1, image_size, image_size))]
    if sides != [image_size // 2 ** k for k in range(1, 6)]:
        raise SystemExit(f"--encoder {spec}: its five feature maps are {sides} px at {image_size} px input; the "
                         f"segmentation and detection heads need strides 2, 4, 8, 16, 32")


def normalize(images, mean, std):
    """uint8 B×S×S -> float32 B×1×S×S normalized input."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


def summarize(values):
    """(mean, 95 % CI half-width 1.96·s/√N with the sample std s, ddof = 1) over seeds, as LoVT reports
    it; the half-width is nan for a single run."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(len(v)))


def _cell(value):
    if isinstance(value, (list, tuple)):  # per-seed values of a metric in [0, 1], shown in %
        mean, hw = summarize(value)
        return f"{100 * mean:.2f}" + ("" if math.isnan(hw) else f" ± {100 * hw:.2f}")
    return str(value)


def print_table(rows, columns=None):
    """Rows = dicts; a list value is a metric over seeds and shows as `mean ± half-width` in %."""
    columns = columns or list(rows[0])
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    print(line(columns))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(line(row))


def write_results(path, rows):
    """PATH.json: every row with its per-seed values, mean and ci95; PATH.csv: one line per row with
    <metric>_mean and <metric>_ci95 columns (fractions, not %). Returns the two paths."""
    stem = path[:-5] if path.endswith(".json") else path[:-4] if path.endswith(".csv") else path
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    json_rows, csv_rows = [], []
    for r in rows:
        jr, cr = {}, {}
        for k, v in r.items():
            if isinstance(v, (list, tuple)):
                mean, hw = summarize(v)
                hw = None if math.isnan(hw) else hw
                jr[k] = {"values": [float(x) for x in v], "mean": mean, "ci95": hw}
                cr[f"{k}_mean"], cr[f"{k}_ci95"] = mean, "" if hw is None else hw
            else:
                jr[k] = cr[k] = v
        json_rows.append(jr)
        csv_rows.append(cr)
    with open(stem + ".json", "w") as f:
        json.dump(json_rows, f, indent=1)
    fields = list(dict.fromkeys(k for cr in csv_rows for k in cr))
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(csv_rows)
    return stem + ".json", stem + ".csv"


def load_splits(args, image_size, task="seg"):
    """Read the dataset, split it, take `--fraction` of the training split, and load every record padded to
    a square and resized to image_size. Returns ({split: dict(images uint8 N×S×S, masks bool N×T×S×S,
    boxes [float32 n×4 x1 y1 x2 y2 px], box_labels [int64 n], ids [str], skipped int)}, classes).
    A bad record (missing image, mask of another size, ...) or an empty split stops the run with the
    reader's message, which names the file or row; with --skip-bad the bad records are counted and skipped."""
    try:
        records, classes = data.read_records(args.dataset, args.data_root, task, args.skip_bad,
                                             num_samples=args.synthetic_samples)
        splits = data.split_records(records, args.split_csv)
        # LoVT takes the first rows of its split files; without them a seeded random subset
        splits["train"] = data.take_fraction(splits["train"], args.fraction, seed=None if args.split_csv else 0)
        if args.dataset == "rsna":  # LoVT validates every RSNA task on the first 10 % of its validation split
            splits["validate"] = splits["validate"][:math.ceil(0.1 * len(splits["validate"]))]
    except (data.BadRecord, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{args.dataset}: {e}")
    out = {}
    for split in ("train", "validate", "test"):
        loaded, ids, skipped = [], [], 0
        for rec in tqdm(splits[split], desc=f"load {split}", leave=False):
            try:
                loaded.append(data.load_record(rec, image_size))
                ids.append(rec["id"])
            except data.BadRecord as e:
                if not args.skip_bad:
                    raise SystemExit(f"{args.dataset} {split}: {e}\n(--skip-bad skips such records and counts them)")
                skipped += 1
        if not loaded:
            raise SystemExit(f"{args.dataset}: the {split} split is empty"
                             + (f" after --fraction {args.fraction}" if split == "train" else "")
                             + (f" ({skipped} bad records skipped)" if skipped else ""))
        out[split] = dict(images=torch.stack([torch.tensor(r["image"]) for r in loaded]),
                          masks=torch.stack([torch.tensor(r["mask"]) for r in loaded]),
                          boxes=[torch.tensor(r["boxes"]) for r in loaded],
                          box_labels=[torch.tensor(r["box_labels"]) for r in loaded],
                          ids=ids, skipped=skipped)
    return out, classes


@torch.no_grad()
def extract_features(backbone, images, mean, std, stages, batch_size, device):
    """Frozen features of uint8 N×S×S images: the listed stage indices (0 = c1 … 4 = c5, -1 the last
    map: c5, or a ViT's patch map), each a float32
    CPU tensor N×C×h×w. The backbone must be in eval mode (BN running statistics, LoVT's frozen mode)."""
    out = [[] for _ in stages]
    for i in tqdm(range(0, len(images), batch_size), desc="features", leave=False):
        feats = backbone.feature_maps(normalize(images[i:i + batch_size].to(device), mean, std))
        for o, s in zip(out, stages):
            o.append(feats[s].float().cpu())
    return [torch.cat(o) for o in out]


def snapshot(module):
    """A CPU copy of the state dict (the best validation state lives in memory, not on the GPU)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class Batches:
    """Inputs, (cached or live) encoder features and masks of one split of load_splits. feats = cached
    stage tensors (e.g. [c5] for a linear head, [c1 .. c5] for the U-Net), or None: then the backbone
    runs in every get(), with gradient only when encoder_grad."""

    def __init__(self, split, mean, std, device, feats=None):
        self.images, self.masks, self.feats = split["images"], split["masks"], feats
        self.mean, self.std, self.device = mean, std, device

    def __len__(self):
        return len(self.images)

    def get(self, idx, backbone, encoder_grad=False):
        x = normalize(self.images[idx].to(self.device), self.mean, self.std)  # B×1×S×S
        if self.feats is not None:
            stages = [f[idx].to(self.device) for f in self.feats]
        else:
            with torch.set_grad_enabled(encoder_grad):
                stages = backbone.feature_maps(x)
        return x, stages, self.masks[idx].to(self.device)


# ==== SEGMENTATION ====


def pixel_counts(pred, target):
    """pred, target: bool B×T×H×W -> (TP, predicted, true) pixel counts per image and class, float64 B×T
    (float32 products and sums: twice as fast as bool reductions on a CPU, exact below 2^24 pixels)."""
    p, t = pred.flatten(2).float(), target.flatten(2).float()
    return torch.linalg.vecdot(p, t).double(), p.sum(-1).double(), t.sum(-1).double()


def dice_from_counts(tp, n_pred, n_true):
    """2TP / (2TP + FP + FN) = 2TP / (predicted + true); 1 where both are empty."""
    denom = n_pred + n_true
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(denom))


def iou_from_counts(tp, n_pred, n_true):
    """TP / (TP + FP + FN) = TP / (predicted + true - TP); 1 where both are empty."""
    denom = n_pred + n_true - tp
    return torch.where(denom > 0, tp / denom.clamp(min=1), torch.ones_like(denom))


def micro_dice(pred, target):
    """Dataset-level Dice per class (T,), LoVT's metric: the pixels of all images are pooled first."""
    return dice_from_counts(*(c.sum(0) for c in pixel_counts(pred, target)))


def per_image_dice(pred, target):
    """Dice of every image and class, B×T; an empty mask with an empty prediction counts as 1."""
    return dice_from_counts(*pixel_counts(pred, target))


def dice_loss(logits, target, bce=False):
    """Soft Dice on sigmoid probabilities (segmentation_models_pytorch DiceLoss, binary/multilabel mode):
    per class over the whole batch, 1 - Dice, zero for a class without positive pixels in the batch,
    mean over classes. logits float B×T×H×W, target bool B×T×H×W; `bce` adds pixel-wise BCE."""
    p, t = logits.float().sigmoid(), target.float()
    inter = (p * t).sum((0, 2, 3))
    card = (p + t).sum((0, 2, 3))
    loss = (1 - 2 * inter / card.clamp(min=1e-7)) * (t.sum((0, 2, 3)) > 0)
    loss = loss.mean()
    if bce:
        loss = loss + F.binary_cross_entropy_with_logits(logits.float(), t)
    return loss


class LinearSegHead(nn.Module):
    """LoVT's linear segmentation: 1×1 conv on conv5, logits upsampled bilinearly to the input size."""
    maps = 1  # the last stage maps the head reads (what main caches for it)

    def __init__(self, channels, n_classes):
        super().__init__()
        self.conv = nn.Conv2d(channels[-1], n_classes, 1)

    def forward(self, x, stages):  # x: B×1×S×S (only its size is used); stages[-1]: B×C5×S/32×S/32
        return F.interpolate(self.conv(stages[-1]), size=x.shape[-2:], mode="bilinear", align_corners=False)


class HypercolumnSegHead(nn.Module):
    """1×1 conv on each of the last three maps (conv3-conv5; a ViT's one patch map), summed at the finest of them,
    upsampled bilinearly to the input size: still linear in the frozen features."""
    maps = 3

    def __init__(self, channels, n_classes):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, n_classes, 1) for c in channels[-self.maps:])

    def forward(self, x, stages):  # stages[-3:]: conv3 B×C3×S/8×S/8, conv4, conv5 (live: all five; cached: these)
        maps = stages[-len(self.convs):]
        size = maps[0].shape[-2:]
        y = sum(F.interpolate(conv(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size
                else conv(m) for conv, m in zip(self.convs, maps))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def conv_bn_relu(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """ConvTranspose 2×2 stride 2 to `width`, concat with the skip, 2×(conv3×3-BN-ReLU) to `width`."""

    def __init__(self, cin, skip, width):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, width, 2, stride=2)
        self.convs = nn.Sequential(conv_bn_relu(width + skip, width), conv_bn_relu(width, width))

    def forward(self, x, skip):
        return self.convs(torch.cat([self.up(x), skip], 1))


class SETRHead(nn.Module):
    """MGCA's SETR-style decoder (HKU-MedAI/MGCA:mgca/models/backbones/transformer_seg.py: Encoder2D.final_dense
    and Decoder2D): per-patch Linear(C, C) (a 1×1 conv), 4 × [conv3×3 -> BN -> ReLU -> bilinear ×2 (align_corners,
    as there)] with widths 512/256/128/64, conv3×3 to the classes; resized to the input if the map's stride is
    not 16."""
    maps = 1

    def __init__(self, channels, n_classes, widths=(512, 256, 128, 64)):
        super().__init__()
        stages, cin = [nn.Conv2d(channels[-1], channels[-1], 1)], channels[-1]
        for w in widths:
            stages += [conv_bn_relu(cin, w), nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
            cin = w
        self.decoder = nn.Sequential(*stages, nn.Conv2d(cin, n_classes, 3, padding=1))

    def forward(self, x, stages):  # stages[-1]: the patch map B×C×S/16×S/16
        y = self.decoder(stages[-1])
        return y if y.shape[-2:] == x.shape[-2:] else F.interpolate(y, size=x.shape[-2:], mode="bilinear")


class ResUNetHead(nn.Module):
    """LoVT's ResUNet decoder, widths C5/2 … C5/32 (ResNet-50: 1024, 512, 256, 128, 64)."""
    maps = 5

    def __init__(self, channels, n_classes, in_chans=1):
        super().__init__()
        c5 = channels[-1]
        widths = [c5 // 2 ** k for k in range(1, 6)]
        skips = [channels[3], channels[2], channels[1], channels[0], in_chans]  # c4, c3, c2, c1, input
        self.bridge = nn.Sequential(conv_bn_relu(c5, c5), conv_bn_relu(c5, c5))
        self.ups = nn.ModuleList(UpBlock(cin, s, w) for cin, s, w in zip([c5] + widths[:-1], skips, widths))
        self.out = nn.Conv2d(widths[-1], n_classes, 1)

    def forward(self, x, stages):  # x: B×1×S×S input, stages: [c1 .. c5]
        y = self.bridge(stages[-1])
        for up, skip in zip(self.ups, [stages[3], stages[2], stages[1], stages[0], x]):
            y = up(y, skip)
        return self.out(y)  # B×T×S×S


HEADS = {"linear": LinearSegHead, "hypercolumn": HypercolumnSegHead, "setr": SETRHead, "unet": ResUNetHead}


def build_head(kind, backbone, n_classes):
    return HEADS[kind](backbone.stage_channels, n_classes)


@torch.no_grad()
def evaluate(head, backbone, batches, batch_size, bce=False):
    """Validation loss and the Dice / IoU metrics of one split (threshold: sigmoid > 0.5, i.e. logit > 0)."""
    head.eval()
    backbone.eval()
    loss_sum, counts = 0.0, []
    for idx in torch.arange(len(batches)).split(batch_size):
        x, stages, target = batches.get(idx, backbone)
        logits = head(x, stages)
        loss_sum += dice_loss(logits, target, bce).item() * len(idx)
        counts.append(torch.stack(pixel_counts(logits > 0, target)))  # 3×B×T
    counts = torch.cat(counts, 1)  # 3×N×T: TP, predicted, true per image and class
    dice, iou = dice_from_counts(*counts.sum(1)), iou_from_counts(*counts.sum(1))
    return dict(loss=loss_sum / len(batches), dice=dice.mean().item(), dice_img=dice_from_counts(*counts).mean().item(),
                iou=iou.mean().item(), dice_per_class=dice.tolist())


def finetune_phase(args, backbone, opt, step, finetune):
    """LoVT's fine-tuning schedule, set before every step; returns whether the encoder trains now. The encoder is
    frozen (eval mode, no gradient) for the first `warmup_steps` at `warmup_lr`; afterwards every parameter group
    is set to the task lr at every step, so the plateau schedule has no lasting effect when fine-tuning (it acts
    on the frozen runs only)."""
    encoder_trains = finetune and step >= args.warmup_steps
    backbone.train(encoder_trains)
    if finetune:
        for g in opt.param_groups:
            g["lr"] = args.lr if encoder_trains else args.warmup_lr
    return encoder_trains


def train_one(args, kind, backbone, data_splits, n_classes, seed):
    """One run: train the head (and the encoder after the warm-up when fine-tuning) with early stopping on
    the validation Dice; return the test metrics of the best validation state."""
    torch.manual_seed(seed)
    device, finetune = args.device, args.finetune and kind == "unet"
    if finetune:
        backbone = copy.deepcopy(backbone)  # every seed starts from the exported weights
    backbone.to(device)
    head = build_head(kind, backbone, n_classes).to(device)
    params = list(head.parameters()) + (list(backbone.parameters()) if finetune else [])
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=1e-6)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=3)
    train, val, test = data_splits
    gen = torch.Generator().manual_seed(seed)
    step, best, best_state, bad_epochs = 0, -1.0, None, 0
    bar = tqdm(range(args.epochs), desc=f"  seed {seed}", leave=False)
    for epoch in bar:
        head.train()
        for idx in torch.randperm(len(train), generator=gen).split(args.batch_size):
            encoder_trains = finetune_phase(args, backbone, opt, step, finetune)
            x, stages, target = train.get(idx, backbone, encoder_grad=encoder_trains)
            loss = dice_loss(head(x, stages), target, args.bce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        m = evaluate(head, backbone, val, args.batch_size, args.bce)
        plateau.step(m["loss"])
        bar.set_postfix(loss=f"{loss.item():.3f}", val_loss=f"{m['loss']:.3f}", val_dice=f"{m['dice']:.3f}")
        if m["dice"] > best:  # keep the best validation state in memory; the test uses it
            best, bad_epochs = m["dice"], 0
            best_state = [snapshot(head), snapshot(backbone) if finetune else None]
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                break
    head.load_state_dict(best_state[0])
    if finetune:
        backbone.load_state_dict(best_state[1])
    result = evaluate(head, backbone, test, args.batch_size, args.bce)
    result.update(epochs=epoch + 1, best_val_dice=best)
    backbone.cpu()
    return result


def cache_fits(backbone, image_size, n_images, limit_gb):
    """Whether all five float32 stage maps of n_images fit in limit_gb (ResNet-50 at 224: 9.2 MB an image)."""
    with torch.no_grad():
        sizes = [s.numel() for s in backbone.eval().feature_maps(torch.zeros(1, 1, image_size, image_size))]
    return 4 * sum(sizes) * n_images / 2 ** 30 <= limit_gb


def select_lr(grid, run, seeds, key, desc):
    """LoVT's LR selection: one run (seed 0) per grid value, the best validation `key` wins, then seeds 1 ..
    seeds - 1 with that lr; a single lr is a grid of one. run(lr, seed) -> result dict. Returns (lr, the runs of
    the chosen lr, {lr: its seed-0 result})."""
    trials = {lr: run(lr, 0) for lr in tqdm(grid, desc=f"{desc} lr", disable=len(grid) == 1)}
    lr = max(grid, key=lambda v: trials[v][key])
    return lr, [trials[lr]] + [run(lr, seed) for seed in tqdm(range(1, seeds), desc=desc)], trials


def main(argv=None):
    parser = add_common_eval_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--head", action="append", choices=list(HEADS), default=None,
                        help="segmentation head, repeat for several (default: linear; setr for a ViT)")
    parser.add_argument("--finetune", action="store_true", help="unet: train the encoder too, after the warm-up")
    parser.add_argument("--warmup-steps", type=int, default=100, help="fine-tune: frozen-encoder steps first")
    parser.add_argument("--warmup-lr", type=float, default=1e-3, help="fine-tune: lr of the warm-up steps")
    parser.add_argument("--bce", action="store_true", help="add pixel-wise BCE to the Dice loss")
    parser.add_argument("--cache-gb", type=float, default=8.0,
                        help="frozen unet: cache all stage features when they fit in this many GB")
    args = parser.parse_args(argv)
    heads = args.head or ["linear"]
    if args.finetune and "unet" not in heads:
        parser.error("--finetune fine-tunes the encoder under the unet head (the linear head is always frozen, "
                     "as in LoVT): add --head unet")
    args.encoder = args.encoder or ["random"]
    image_size = args.image_size or (128 if args.dataset in data.SYNTHETIC_CONTRAST else 224)
    if image_size % 32:
        raise SystemExit(f"--image-size {image_size}: must be a multiple of 32 (the U-Net skips)")
    args.epochs = args.epochs or 100
    t0 = time.time()

    splits, classes = load_splits(args, image_size, task="seg")
    for s, d in splits.items():
        print(f"{args.dataset} {s}: {len(d['images'])} images" + (f", {d['skipped']} skipped" if d["skipped"] else ""))
    mean, std = data.pixel_stats(splits["train"]["images"])
    print(f"train-split normalization: mean {mean:.4f}, std {std:.4f}; classes: {', '.join(classes)}")

    rows = []
    n_all = sum(len(d["images"]) for d in splits.values())
    for name, backbone, meta in load_encoders(args.encoder, image_size):
        if "unet" in heads and len(backbone.stage_channels) != 5:
            raise SystemExit(f"--encoder {name}: the U-Net needs the five stages of a CNN; a {meta['arch']} has one "
                             f"patch map: use --head setr (MGCA's ViT decoder) or --head linear")
        # Frozen encoder + no augmentation: the features never change, so compute them once per encoder
        # (conv5 for the linear head, conv3-conv5 for the hypercolumn; all stages when a frozen unet is asked for
        # and they fit in memory).
        frozen_heads = [k for k in heads if not (args.finetune and k == "unet")]
        cache_all = "unet" in frozen_heads and cache_fits(backbone, image_size, n_all, args.cache_gb)
        if "unet" in frozen_heads and not cache_all:
            print(f"{name}: the stage features of {n_all} images exceed --cache-gb {args.cache_gb}; the frozen "
                  f"encoder runs in every step of the unet")
        t = time.time()
        if frozen_heads:
            backbone.to(args.device)
            # the last maps of the cached heads (a live unet reads its own)
            reads = max((HEADS[k].maps for k in frozen_heads if k != "unet" or cache_all), default=1)
            stages = list(range(len(backbone.stage_channels)))[-reads:]
            cache = {s: extract_features(backbone, d["images"], mean, std, stages, args.batch_size, args.device)
                     for s, d in splits.items()}
            backbone.cpu()
            print(f"{name}: features of {n_all} images in {time.time() - t:.1f} s")
        for kind in heads:
            t = time.time()
            finetune = args.finetune and kind == "unet"
            mode = "finetune" if finetune else "frozen"
            cached = kind != "unet" or (cache_all and not finetune)
            feats = {s: cache[s][-HEADS[kind].maps:] if cached else None for s in splits}
            batches = [Batches(splits[s], mean, std, args.device, feats[s]) for s in ("train", "validate", "test")]
            run = lambda lr, seed: train_one(argparse.Namespace(**{**vars(args), "lr": lr}), kind, backbone,
                                             batches, len(classes), seed)
            default_lr = {"linear": 3e-3, "hypercolumn": 3e-3, "setr": 3e-4, "unet": 1e-4 if finetune else 3e-4}[kind]
            grid = args.lr_grid or [args.lr or default_lr]
            lr, runs, trials = select_lr(grid, run, args.seeds, "best_val_dice", f"{name} {kind} {mode}")
            row = dict(encoder=name, method=meta.get("method", ""), head=kind, mode=mode, lr=lr, dataset=args.dataset,
                       fraction=args.fraction, image_size=image_size,
                       dice=[r["dice"] for r in runs], dice_img=[r["dice_img"] for r in runs],
                       iou=[r["iou"] for r in runs])
            if len(grid) > 1:
                row["val_dice_by_lr"] = " ".join(f"{v:g}:{100 * trials[v]['best_val_dice']:.2f}" for v in grid)
            for c, cls in enumerate(classes):
                row[f"dice/{cls}"] = [r["dice_per_class"][c] for r in runs]
            row.update(epochs=round(float(np.mean([r["epochs"] for r in runs]))), seconds=round(time.time() - t, 1))
            rows.append(row)
            print(f"{name} {kind} {mode}: test Dice {100 * summarize(row['dice'])[0]:.2f} % "
                  f"({row['seconds']} s, {'cached features' if cached else 'live encoder'})")

    print(f"\nSegmentation, {args.dataset} ({image_size} px, train fraction {args.fraction}, {args.seeds} seed(s)); "
          f"test metrics in %, mean ± 1.96·s/√N over seeds.\n"
          f"dice = dataset-level (micro) Dice, all test pixels pooled, sigmoid > 0.5 (LoVT); "
          f"dice_img = mean per-image Dice (empty mask and empty prediction = 1); iou = micro IoU. "
          f"Multi-class: mean over classes.")
    print_table(rows, ["encoder", "head", "mode", "lr", "dice", "dice_img", "iou", "epochs"])
    if len(classes) > 1:
        print("\nPer-class micro Dice (%):")
        print_table(rows, ["encoder", "head", "mode"] + [f"dice/{c}" for c in classes])
    out = args.out or os.path.join("runs", "eval_seg", args.dataset)
    paths = write_results(out, rows)
    print(f"\nwrote {' and '.join(paths)}; total {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()

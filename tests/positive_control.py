"""The comparison's positive control: an image encoder trained with direct supervision, on the same synthetic
training images, for the same number of images, as a method's pre-training; exported like a method's encoder so
that eval_seg.py / eval_det.py judge it by the same yardstick. It says what a perfect pre-training signal buys at
that budget, as the untrained encoder of the same architecture says what none buys.

    python tests/positive_control.py --like runs/lovt-XXXX/image_encoder.pt --out-dir runs/control-lovt
    python tests/positive_control.py --arch vit_tiny --train-samples 2000 --target labels --out-dir runs/control-vit

--like takes the architecture and configuration (and the pre-training image size) of an exported encoder, so the
control is exactly the method's encoder (JoImTeRNet's soft-attention ResNet included). --target masks (default): a
1x1 convolution on the last feature map predicts the five findings' masks, upsampled to the image (soft Dice + BCE:
what the linear segmentation head of eval_seg.py reads, the strongest signal); --target labels: the findings'
presence from the globally pooled last map (BCE), a signal as coarse as a report's. Adam at each --lr from the same
initialisation and image order (--seed); exported: the run whose own head scores best on --val-samples held-out
images (masks: mean Dice over the findings; labels: minus the BCE), the validation loss breaking ties. The training
loss does not choose: in 62 steps a tiny ViT from scratch lowers it from 1.75 to 0.35 at 1e-2 by predicting no
finding anywhere (validation Dice 0 for every finding at 1e-2, 3e-3 and 1e-3). --epochs passes over --train-samples
images: a method's budget (compare.sh gives each control its method's passes).
--epochs 0 exports the untrained encoder of that seed: the negative control, judged the same way.
"""
import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import eval_seg  # noqa: E402
from common import arg  # noqa: E402


@dataclass
class Args:
    """Positive control: an encoder trained on the synthetic findings' masks or labels, exported as image_encoder.pt."""
    like: str = arg("", "an exported image_encoder.pt whose architecture and config to train (else --arch)")
    arch: str = arg("resnet18", "resnet18 | vit_tiny | ... (common.build_image_encoder) when no --like")
    target: str = arg("masks", "masks (per-finding segmentation from the last map) | labels (presence, pooled)")
    data: str = arg("synthetic", "synthetic | synthetic-faint")
    train_samples: int = arg(2000, "training images (the comparison's pre-training pairs)")
    image_size: int = arg(128, "training size (--like: the export's unless given)")
    epochs: int = arg(1, "passes over the training images")
    batch_size: int = arg(32, "images per step")
    lr: tuple[float, ...] = arg((1e-2, 3e-3, 1e-3), "Adam learning rates: a run each, the best on the held-out "
                                                     "images is exported")
    val_samples: int = arg(200, "held-out synthetic images (generator seed 1) that choose the learning rate")
    seed: int = arg(1, "initialisation and image order")
    workers: int = arg(0, "DataLoader workers")
    out_dir: str = arg("runs/positive-control", "where image_encoder.pt and log.csv go")


def build(args, like=None):
    """The encoder to train: the architecture and config of `like` (--like's export; random init), else --arch's."""
    if like is None:
        return common.build_image_encoder(args.arch)
    return common.build_image_encoder(like["arch"], like["config"])


def loss_of(head, last_map, batch, target):
    """Soft Dice + BCE of the masks at the image's size, or BCE of the labels from the pooled map."""
    masks = batch["masks"].float()  # B x C x S x S
    if target == "labels":
        present = masks.flatten(2).amax(2)
        return F.binary_cross_entropy_with_logits(head(last_map.mean((2, 3), keepdim=True)).flatten(1), present)
    logits = F.interpolate(head(last_map), size=masks.shape[-2:], mode="bilinear", align_corners=False)
    p = logits.sigmoid()
    dice = 1 - (2 * (p * masks).sum((2, 3)) + 1) / (p.sum((2, 3)) + masks.sum((2, 3)) + 1)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, masks)


@torch.no_grad()
def validate(head, encoder, batch, target):
    """(score, loss) of the run on the held-out images: masks: the mean over findings of eval_seg's dataset-level
    Dice (logit > 0; a finding absent from the images and the prediction counts 1); labels: minus the BCE. Eval
    mode, as eval_seg reads the encoder."""
    encoder.eval()
    last_map = encoder.feature_maps(batch["image"])[-1]
    loss = loss_of(head, last_map, batch, target).item()
    if target == "labels":
        return -loss, loss
    logits = F.interpolate(head(last_map), size=batch["masks"].shape[-2:], mode="bilinear", align_corners=False)
    return eval_seg.micro_dice(logits > 0, batch["masks"]).mean().item(), loss


def train(args, lr, dataset, like=None):
    """One run from --seed's initialisation and image order at learning rate lr -> (encoder, head, losses per
    step)."""
    torch.manual_seed(args.seed)
    encoder = build(args, like)
    with torch.no_grad():  # eval mode: the probe leaves the BatchNorm statistics as initialised
        channels = encoder.eval().feature_maps(torch.zeros(1, 1, args.image_size, args.image_size))[-1].shape[1]
    head = torch.nn.Conv2d(channels, len(data.SYNTH_FINDINGS), 1)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=lr)
    loader = DataLoader(dataset, args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed),
                        collate_fn=lambda s: {k: torch.stack([x[k] for x in s]) for k in ("image", "masks")})
    losses = []
    encoder.train()
    for _ in range(args.epochs):  # --epochs 0: the untrained control
        for batch in loader:
            loss = loss_of(head, encoder.feature_maps(batch["image"])[-1], batch, args.target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return encoder, head, losses


def main(argv=None):
    args = common.parse_args(Args, argv=argv)
    like = torch.load(args.like, map_location="cpu", weights_only=True) if args.like else None  # read once
    if like and "--image-size" not in (argv if argv is not None else sys.argv[1:]):
        args = dataclasses.replace(args, image_size=like["image_size"])
    dataset = data.make_dataset(args.data, None, "train", args.image_size, train=False, num_samples=args.train_samples)
    # held out from everything: the generator's seed 1 (the methods and eval_seg draw from seed 0)
    held_out = data.make_dataset(args.data, None, "validate", args.image_size, train=False, seed=1,
                                 num_samples=args.val_samples)
    held_out = {k: torch.stack([held_out[i][k] for i in range(len(held_out))]) for k in ("image", "masks")}
    start, runs = time.process_time(), {}
    for lr in args.lr if args.epochs else args.lr[:1]:
        encoder, head, losses = train(args, lr, dataset, like)
        runs[lr] = (encoder, losses, validate(head, encoder, held_out, args.target) if losses else (0.0, 0.0))
        if losses:
            print(f"lr {lr:g}: training loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of "
                  f"the last 10 steps); held out: {'Dice' if args.target == 'masks' else '-BCE'} "
                  f"{runs[lr][2][0]:.4f}, loss {runs[lr][2][1]:.4f}")
    # the recipe's one choice, made on held-out images: the best score, then the lowest loss
    lr = max(runs, key=lambda r: (runs[r][2][0], -runs[r][2][1]))
    encoder, losses, _ = runs[lr]
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "log.csv"), "w") as f:
        f.write("step,loss\n" + "".join(f"{i + 1},{v:.5f}\n" for i, v in enumerate(losses)))
    kind = f"positive-control-{args.target}" if losses else "untrained-control"
    common.export_image_encoder(os.path.join(args.out_dir, "image_encoder.pt"), encoder, dataset.mean, dataset.std,
                                args.image_size, kind, dataclasses.replace(args, lr=(lr,)))
    print(f"{kind}: {len(losses)} steps of {args.batch_size} images" + (f" at lr {lr:g}" if losses else "")
          + f", {time.process_time() - start:.0f} CPU s; {args.out_dir}/image_encoder.pt")
    return losses, {r: run[2] for r, run in runs.items()}

if __name__ == "__main__":
    main()

"""LoVT: localized representation learning from chest X-rays and reports, in one file.

Paper: P. Müller, G. Kaissis, C. Zou, D. Rueckert, "Joint Learning of Localized Representations from Medical
Images and Reports", ECCV 2022, https://arxiv.org/abs/2112.02889. Official code: philip-mueller/lovt at
f548985d0e56989107948df983a7d508fe510878; every detail below follows that code (src/models/, configs/), not
the paper's prose where the two differ.

Model. A ResNet-50 turns the image into 7x7 = 49 region features y_a (layer4, row-major) and a BERT turns the
report (one pass over all sentences) into sentence features y_b (channel-wise max over each sentence's tokens).
Attention pooling (one query = the mean token) gives the global features and the region/sentence weights w.
Four BN-MLP heads project to z (512-d); ONE symmetric cross-attention (shared W_k, W_v, W_o and BatchNorm) gives
every region a counterpart mixed from its own report's sentences (b->a) and every sentence a counterpart mixed
from its own image's regions (a->b).

Objectives (lovt_loss, a pure function of the model's outputs; cos = cosine similarity, each term a mean over
the micro-batch):
  global   S_ij = cos(zg_a_i, zg_b_j) / 0.1;  L_global_a2b = CE_rows(S),  L_global_b2a = CE_rows(S^T)
  local    per sample, anchors l_i and counterparts c_j:  s_ij = cos(l_i, c_j) / 0.3,
           q_ij = T_ij 1[j valid] / sum_j' T_ij' 1[j' valid],
           l2att = sum_i w_i (-sum_j q_ij s_ij + log sum_j exp s_ij),  att2l: the same with s_ji
  target   image: T_ij = 1[d_ij <= 0.5] exp(-1.0 d_ij), d = distance of (row, col) / grid diagonal
           (22-49 positives per region on 7x7; the loss floor is the target entropy, ~3.1-3.9 nats,
           so the image-local terms never approach 0); report: T = I over the valid sentences
  weights  w = the detached, masked, renormalised attention-pool weights of the anchor modality
  total    L = 0.75 L_global_a2b + 0.25 L_global_b2a
             + 0.375 (L_a_l2att + L_a_att2l) + 0.375 (L_b_l2att + L_b_att2l)
Training: AdamW lr 1e-4 wd 1e-6, micro-batch 32 x 16 accumulation = 512 pairs per optimizer step (negatives and BN
statistics still come from the 32-sample micro-batch), cosine wave per epoch never reset, <= 100 epochs, early
stopping (patience 10) on the validation loss, the best-validation checkpoint is exported. --accum counts the
whole job's micro-batches per optimizer step: with W processes each does accum / W (16 / 8 = 2 on 8 GPUs), so the
step is 512 pairs on 1 GPU or on 8, as nanoGPT does; --accum 1 (the demo) is one micro-batch per process on any
number of processes, and an --accum that W does not divide stops with the valid values. Training views: the
loader's view (a CSV's or the MIMIC cache's square) reaches --image-size through LoVT's augmentation
(data.BatchAugment), or resized whole with --no-augment (data.train_view, the rule of every method of the suite).

Commands:
  python lovt.py                                          # demo: synthetic data, small models, minutes on 2 CPU cores
  python lovt.py --preset paper --data mimic --data-root CACHE                      # LoVT_100, one GPU
  torchrun --nproc_per_node=8 lovt.py --preset paper --data mimic --data-root CACHE  # LoVT_100, 8 GPUs x 2 x 32
  torchrun --nproc_per_node=2 lovt.py --max-steps 5                                 # DDP smoke test on CPU (gloo)
  python lovt.py --preset paper --data csv --data-root pairs.csv                    # own image-report pairs
  python lovt.py --resume --out-dir runs/lovt-XXXX                                  # continue a killed run
  python lovt.py --bench 20 [--preset paper --image-weights none --text-model bert-base]   # throughput
CACHE is written once by `python data.py prepare-mimic ...`. The run folder (default runs/lovt-<time>) holds
args.json, metrics.csv, val.csv, ckpt.pt (last), best.pt (best validation loss), image_encoder.pt, text_encoder/,
eval.json and viz/*.png. Without --data the demo preset runs on the built-in synthetic data.

Deviations / our choices:
- Images come from the suite's small-resolution cache, so RandomResizedCrop acts on the zero-padded square
  instead of the original non-square film (crop parameters unchanged); augmentation runs batched on the device.
- Sentences are split by data.split_sentences instead of Stanza.
- No horizontal flips (LoVT flips with p = 0.5 although the reports say left and right).
- bf16 autocast where supported, fp16 + GradScaler otherwise, fp32 on CPU (LoVT: fp16); loss math in fp32.
- Under DDP each process keeps LoVT's per-micro-batch negatives (--gather-negatives gathers them across GPUs).
- The online CheXpert linear probes of the official code are not trained.
- The demo preset (ResNet-18 and a 2-layer BERT from scratch, 128 px, 1 epoch) trains without augmentation.
- Resume is exact in one process with --workers 0 (tested: a run killed with SIGKILL and resumed logs the losses
  of one never stopped); with workers or several ranks the data order is exact, but the random draws of the
  interrupted epoch (sentence swaps, MIMIC's view choice) are drawn anew.
- Evaluation runs in fp32 on rank 0 after the process group is closed, once ckpt.pt and the export are written; a
  failure there is one message, and --resume on the finished run evaluates it again without training. eval.json:
  retrieval, zero-shot AUC with bootstrap 95 % intervals (--n-boot) of the untrained and the trained model.
"""
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

import common
import data
from common import arg


@dataclass
class Args(common.RunArgs):
    """LoVT pre-training (defaults = LoVT_100; `--preset demo` is used when no --data is given)."""
    train_subset: float = arg(1.0, "use the first fraction of the training studies (LoVT_30: 0.3)")
    # encoders and heads
    image_arch: str = arg("resnet50", "resnet50 | resnet18")
    image_weights: str = arg("imagenet", "imagenet | none | path to a state dict")
    image_size: int = arg(224, "input size (the 7x7 conv5 grid at 224)")
    channels_last: bool = arg(True, "NHWC memory format for the ResNet: faster convolutions on CPUs and tensor cores")
    text_model: str = arg("emilyalsentzer/Bio_ClinicalBERT", "name/path, or tiny | bert-base (random init, "
                          "vocabulary from the training reports)")
    text_freeze_layers: int = arg(6, "freeze the embeddings and the first k BERT layers")
    max_length: int = arg(512, "token limit of a report incl. [CLS]/[SEP]")
    proj_dim: int = arg(512, "d_z of the four projection heads and the cross-attention")
    proj_hidden: int = arg(2048, "hidden width of the projection heads")
    pool_heads: int = arg(8, "heads of the attention pooling")
    # optimisation
    batch_size: int = arg(32, "micro-batch per process (negatives and BN statistics)")
    accum: int = arg(16, "micro-batches per optimizer step, whole job: each of W processes does accum / W (1: one "
                         "per process, any W)")
    lr: float = arg(1e-4, "AdamW learning rate (cosine wave with a 2-epoch period)")
    weight_decay: float = arg(1e-6, "AdamW weight decay (all parameters)")
    epochs: int = arg(100, "maximum epochs")
    patience: int = arg(10, "early stopping: epochs without a validation-loss improvement > 1e-5")
    # objective
    tau_global: float = arg(0.1, "temperature of the global InfoNCE")
    tau_local: float = arg(0.3, "temperature of the local losses")
    spatial_threshold: float = arg(0.5, "image-local positives: relative distance <= threshold")
    smooth_lambda: float = arg(1.0, "image-local target exp(-lambda d)")
    weight_global_a2b: float = arg(0.75, "loss weight, image -> report")
    weight_global_b2a: float = arg(0.25, "loss weight, report -> image")
    weight_local_a: float = arg(0.375, "loss weight of each image-local direction")
    weight_local_b: float = arg(0.375, "loss weight of each report-local direction")
    swap_prob: float = arg(0.6, "random sentence swaps: P(one more swap)")
    gather_negatives: bool = arg(False, "DDP: global negatives from all GPUs (LoVT: per GPU)")
    no_global: bool = arg(False, "ablation: local losses only")
    no_local: bool = arg(False, "ablation: global losses only")
    no_spatial_smoothing: bool = arg(False, "ablation: uniform image-local target inside the radius")
    uniform_weights: bool = arg(False, "ablation: uniform region/sentence weights")


PRESETS = {
    "paper": dict(data="mimic"),  # the defaults are LoVT_100
    # 2 CPU cores, about 5 minutes including evaluation: small encoders from scratch, no accumulation.
    # From random init LoVT's strong augmentation needs far more steps than a CPU demo has (global loss after 40
    # steps: 3.50 with it, 2.40 without), so the demo trains on the plain views: one epoch = one cosine decay.
    "demo": dict(data="synthetic", image_arch="resnet18", image_weights="none", image_size=128, augment=False,
                 text_model="tiny", text_freeze_layers=0, batch_size=32, accum=1, lr=1e-3, epochs=1,
                 train_samples=4000, workers=0, ckpt_every=50, log_every=5),
}


# ==== METHOD: LoVT ====
# ---- 1.4 the one symmetric cross-attention (shared by both modalities and directions) ----
class SymmetricCrossAttention(nn.Module):
    """Cross-modal counterparts within each image-report pair. One W_k, W_v, W_o and one BatchNorm serve
    both directions; keys double as queries (symmetric), scores scaled by 1/sqrt(d), no temperature."""

    def __init__(self, d=512):
        super().__init__()
        self.key, self.value, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)  # shared: each call uses its own batch stats, both update the running ones
        for lin in (self.key, self.value, self.out):
            nn.init.kaiming_normal_(lin.weight, mode="fan_out", nonlinearity="linear")
            nn.init.zeros_(lin.bias)

    def bn(self, x):  # B x N x d, statistics over all B*N positions (padded sentence slots included)
        return self.norm(x.flatten(0, 1)).view_as(x)

    def forward(self, za, zb, mask_b):
        """za: B x Na x d regions, zb: B x Nb x d sentences, mask_b: B x Nb bool.
        -> (att_a B x Na x d = regions' counterparts from sentences (b->a),
            att_b B x Nb x d = sentences' counterparts from regions (a->b),
            p_a2b B x Na x Nb = for each sentence, its distribution over regions (columns); 0 for padding)."""
        ka, kb, va, vb = self.key(za), self.key(zb), self.value(za), self.value(zb)
        scores = ka.float() @ kb.float().transpose(1, 2) / math.sqrt(za.shape[-1])  # B x Na x Nb, fp32
        p_b2a = scores.masked_fill(~mask_b[:, None, :], float("-inf")).softmax(2)  # region r over sentences
        p_a2b = scores.softmax(1) * mask_b[:, None, :]  # sentence s over regions; padded sentences get 0
        att_a = self.bn(self.out(p_b2a.to(vb.dtype) @ vb))
        att_b = self.bn(self.out(p_a2b.transpose(1, 2).to(va.dtype) @ va))  # padded slots = BN(b_o)
        return att_a, att_b, p_a2b


# ---- 1. the model ----
class LoVT(nn.Module):
    """Image encoder + attention pooling, text encoder + sentence max-pooling + attention pooling, four BN-MLP
    projection heads and the shared symmetric cross-attention. forward(batch) -> dict of loss terms."""

    def __init__(self, args, tokenizer):
        super().__init__()
        self.args = args
        self.image_encoder = common.ImageEncoder(args.image_arch, args.image_weights, args.channels_last)
        self.text_encoder = common.TextEncoder(args.text_model, tokenizer, args.text_freeze_layers)
        ca, cb, d, hidden = self.image_encoder.out_dim, self.text_encoder.out_dim, args.proj_dim, args.proj_hidden
        self.pool_a, self.pool_b = common.AttentionPool(ca, args.pool_heads), common.AttentionPool(cb, args.pool_heads)
        # four independent BN-MLP heads; the local ones act per region / per sentence (padded slots included)
        self.project_local_a, self.project_global_a = (common.ProjectionHead(ca, hidden, d) for _ in range(2))
        self.project_local_b, self.project_global_b = (common.ProjectionHead(cb, hidden, d) for _ in range(2))
        self.cross = SymmetricCrossAttention(d)

    def image_features(self, images):
        """-> regions y_a B x N x C, global B x C, pooling weights B x N, grid (h, w)."""
        out = self.image_encoder(images)
        pooled, weights = self.pool_a(out["local_feats"])
        return out["local_feats"], pooled, weights, out["grid"]

    def text_features(self, batch):
        """-> sentences y_b B x S x C (padded slots 0), global B x C, pooling weights B x S, sentence mask B x S."""
        tokens = self.text_encoder(batch["input_ids"], batch["attention_mask"])  # B x L x C, one joint pass
        mask = batch["sentence_mask"]
        sentences = common.pool_sentences(tokens, batch["sentence_index"], mask.shape[1], "max")
        pooled, weights = self.pool_b(sentences, mask)
        return sentences, pooled, weights, mask

    def forward(self, batch):
        """-> lovt_loss's terms: the features and counterparts come from the modules, the loss from tensors alone."""
        ya, ga, wa, grid = self.image_features(batch["images"])
        yb, gb, wb, mask = self.text_features(batch)
        za, zb = self.project_local_a(ya), self.project_local_b(yb)  # B x N x d, B x S x d
        att_a, att_b, _ = self.cross(za, zb, mask)  # counterparts of the regions / of the sentences
        zga, zgb = self.project_global_a(ga), self.project_global_b(gb)
        gathered = {}
        if self.args.gather_negatives and dist.is_initialized():  # every process's rows as negatives
            gathered = dict(zip(("global_a_all", "global_b_all", "offset"), common.gather_rows(zga, zgb)))
        return lovt_loss(zga, zgb, za, att_a, zb, att_b, mask, wa, wb, grid, **gathered,
                         **loss_hyperparameters(self.args))

    def encode_image(self, images):
        """-> B x d L2-normalised global image embeddings."""
        return F.normalize(self.project_global_a(self.image_features(images)[1]).float(), dim=-1)

    def encode_text(self, batch):
        """-> B x d L2-normalised global report embeddings."""
        return F.normalize(self.project_global_b(self.text_features(batch)[1]).float(), dim=-1)

    def attention_maps(self, batch):
        """-> region weights B x h x w (attention pooling) and sentence->region maps B x S x h x w (a->b
        cross-attention probabilities; zero for padded sentences)."""
        ya, _, wa, (h, w) = self.image_features(batch["images"])
        yb, _, _, mask = self.text_features(batch)
        _, _, p_a2b = self.cross(self.project_local_a(ya), self.project_local_b(yb), mask)
        return wa.view(-1, h, w), p_a2b.transpose(1, 2).reshape(len(ya), -1, h, w)


# ---- 2.3 the spatial soft target of the image-local loss ----
def spatial_target(h, w, threshold=0.5, smooth_lambda=1.0, smooth=True):
    """Soft positives between the h*w regions of a row-major grid -> T: (h*w) x (h*w), float32.

    Coordinates are (row, col) cell indices divided by the grid diagonal sqrt(h^2 + w^2);
    T_ij = 1[d_ij <= threshold] * exp(-smooth_lambda * d_ij)   (smooth=False: the indicator alone).
    On 7x7 every region has 22 (corner) to 49 (centre) positives, its own probability is 2.7-6.0 %."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], 1).float() / math.sqrt(h * h + w * w)
    d = torch.cdist(coords, coords)  # N x N relative distances
    near = (d <= threshold).float()
    return near * torch.exp(-smooth_lambda * d) if smooth else near


# ---- 2.3 intra-sample local contrastive loss, both directions ----
def local_intra_contrastive(anchors, counterparts, target=None, mask=None, weights=None, tau=0.3):
    """anchors l, counterparts c: B x N x D (unnormalised); target: N x N soft positives (None = identity);
    mask: B x N bool valid items (None = all valid); weights: B x N, zero on padding and summing to 1
    per sample (see local_weights; None = uniform). -> (L_l2att, L_att2l), scalars.

    Per sample, s_ij = cos(l_i, c_j) / tau and q_ij = T_ij 1[j valid] / sum_j' T_ij' 1[j' valid]:
      l2att_i = -sum_j q_ij s_ij + log sum_{j valid} exp s_ij     (anchor l_i, candidates c_j)
      att2l_i = -sum_j q_ij s_ji + log sum_{j valid} exp s_ji     (anchor c_i, candidates l_j)
      L = (1/B) sum_b sum_i w_i loss_i.
    Negatives are only the other items of the same sample; the positive stays in the log-sum-exp."""
    B, N, _ = anchors.shape
    valid = torch.ones(B, N, dtype=torch.bool, device=anchors.device) if mask is None else mask.bool()
    if target is None:
        target = torch.eye(N, device=anchors.device)
    if weights is None:
        weights = local_weights(torch.ones(B, N, device=anchors.device), valid)
    l = F.normalize(anchors.float(), dim=-1)
    c = F.normalize(counterparts.float(), dim=-1)
    s = l @ c.transpose(1, 2) / tau  # B x N x N, s[b, i, j] = cos(l_i, c_j) / tau
    q = target.to(s)[None] * valid[:, None, :]  # padded candidates get no target mass
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-12)  # padded rows (report T = I) become all zero
    cols = ~valid[:, None, :]  # B x 1 x N: padded candidates leave the log-sum-exp

    def direction(scores):  # scores[b, i, j] = anchor i vs candidate j
        loss = -(q * scores).sum(-1) + torch.logsumexp(scores.masked_fill(cols, float("-inf")), -1)
        loss = loss.masked_fill(~valid, 0.0)  # padded anchors: weight 0 (and never inf * 0)
        return (weights.float() * loss).sum(-1).mean()

    return direction(s), direction(s.transpose(1, 2))


# ---- 2.4 region / sentence weights ----
def local_weights(pool_attn, mask=None, uniform=False):
    """pool_attn: B x N head-averaged attention-pooling weights; mask: B x N bool (None = all valid).

    -> B x N weights: detached (no gradient into the pooling), zero on padded items, sum 1 per sample.
    uniform=True is the 'no weights' ablation (uniform over the valid items)."""
    w = torch.ones_like(pool_attn, dtype=torch.float32) if uniform else pool_attn.detach().float()
    if mask is not None:
        w = w * mask
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


# ---- 2. the objective: one pure function of tensors (2.1 global InfoNCE, 2.3 local losses, 2.4 weights) ----
def lovt_loss(global_a, global_b, local_a, att_a, local_b, att_b, sentence_mask, pool_a, pool_b, grid, *,
              global_a_all=None, global_b_all=None, offset=0, tau_global=0.1, tau_local=0.3, spatial_threshold=0.5,
              smooth_lambda=1.0, spatial_smoothing=True, uniform_weights=False, weight_global_a2b=0.75,
              weight_global_b2a=0.25, weight_local_a=0.375, weight_local_b=0.375) -> dict:
    """LoVT's objective -> {"loss": the weighted total, and each term unweighted}.

    global_a, global_b: B x d projected global image / report features; local_a: B x N x d projected regions of the
    row-major grid (h, w), att_a their cross-attention counterparts; local_b, att_b: B x S x d projected sentences
    and theirs, sentence_mask B x S; pool_a B x N, pool_b B x S: the attention-pooling weights. global_a_all,
    global_b_all: every process's global features in rank order (--gather-negatives), this process's rows at
    offset..offset+B; None: LoVT's negatives from the micro-batch alone.
      global_a2b = CE_rows(S), S_ij = cos(global_a_i, global_b_all_j) / tau_global, positive j = offset + i;
      global_b2a the same with a and b exchanged
      local_a_l2att, local_a_att2l = local_intra_contrastive(local_a, att_a, T = spatial_target(grid), all valid,
                                                             w = local_weights(pool_a), tau_local)
      local_b_l2att, local_b_att2l = local_intra_contrastive(local_b, att_b, T = I, sentence_mask,
                                                             w = local_weights(pool_b, sentence_mask), tau_local)
      loss = w_a2b global_a2b + w_b2a global_b2a + w_a (local_a_l2att + local_a_att2l)
             + w_b (local_b_l2att + local_b_att2l)
    Ablations zero a weight; every term is still computed (logged, and DDP sees every parameter used)."""
    normalized = lambda x: F.normalize(common.fp32(x), dim=-1)  # logits in fp32 (at least)
    ga, gb = normalized(global_a), normalized(global_b)
    ga_all = ga if global_a_all is None else normalized(global_a_all)
    gb_all = gb if global_b_all is None else normalized(global_b_all)
    terms = dict(zip(("global_a2b", "global_b2a"),
                     common.contrastive_ce(ga @ gb_all.T / tau_global, gb @ ga_all.T / tau_global, offset)))
    target = spatial_target(*grid, spatial_threshold, smooth_lambda, spatial_smoothing).to(local_a.device)
    terms["local_a_l2att"], terms["local_a_att2l"] = local_intra_contrastive(
        local_a, att_a, target, None, local_weights(pool_a, None, uniform_weights), tau_local)
    terms["local_b_l2att"], terms["local_b_att2l"] = local_intra_contrastive(
        local_b, att_b, None, sentence_mask, local_weights(pool_b, sentence_mask, uniform_weights), tau_local)
    loss = (weight_global_a2b * terms["global_a2b"] + weight_global_b2a * terms["global_b2a"]
            + weight_local_a * (terms["local_a_l2att"] + terms["local_a_att2l"])
            + weight_local_b * (terms["local_b_l2att"] + terms["local_b_att2l"]))
    return dict(loss=loss, **terms)


def loss_hyperparameters(args):
    """Args -> lovt_loss's keyword arguments; --no-global / --no-local zero the weights of their terms."""
    g, l = 0.0 if args.no_global else 1.0, 0.0 if args.no_local else 1.0
    return dict(tau_global=args.tau_global, tau_local=args.tau_local, spatial_threshold=args.spatial_threshold,
                smooth_lambda=args.smooth_lambda, spatial_smoothing=not args.no_spatial_smoothing,
                uniform_weights=args.uniform_weights, weight_global_a2b=g * args.weight_global_a2b,
                weight_global_b2a=g * args.weight_global_b2a, weight_local_a=l * args.weight_local_a,
                weight_local_b=l * args.weight_local_b)


# ---- 3. text augmentation: random sentence swaps ----
def random_sentence_swaps(sentences, p=0.6, rng=random):
    """Swap two uniformly drawn sentences (possibly the same), k times with k ~ Geometric: P(k) = p^k (1-p),
    mean p / (1 - p) = 1.5 for p = 0.6. Training only; no dropping or duplication."""
    sentences = list(sentences)
    while len(sentences) > 1 and rng.random() < p:
        i, j = rng.randrange(len(sentences)), rng.randrange(len(sentences))
        sentences[i], sentences[j] = sentences[j], sentences[i]
    return sentences


# ==== TRAINING: data, loop, evaluation ====
@torch.no_grad()
def evaluate(model, loader, tokenizer, device, n_boot=1000):
    """On held-out pairs, in fp32: retrieval R@1/5/10 in both directions and the zero-shot AUC of the global cosine
    with the pair prompts ("x" vs "no x"; common.zero_shot_summary). Synthetic data: one finding per SYNTH_FINDINGS
    (present = non-empty mask); real data: the CheXpert labels. -> dict(retrieval, zero_shot, checks={})."""
    model.eval()
    images, reports, labels = [], [], []
    for batch in loader:
        b = common.to_device(batch, device)
        images.append(model.encode_image(b["images"]))
        reports.append(model.encode_text(b))
        labels.append(data.zero_shot_targets(batch))
    img, txt = torch.cat(images), torch.cat(reports)
    sim = img @ txt.t()
    retrieval = common.retrieval(sim)
    names, phrases = data.zero_shot_findings("masks" in batch)
    pos = model.encode_text(common.to_device(data.prompt_batch(phrases, tokenizer), device))
    neg = model.encode_text(common.to_device(data.prompt_batch([f"no {p}" for p in phrases], tokenizer), device))
    zero_shot = common.zero_shot_summary(img @ pos.T, img @ neg.T, torch.cat(labels), names, n_boot)
    return dict(retrieval=retrieval, zero_shot=zero_shot, checks={})


def finish(args, model, tokenizer, test_loader, mean_std, device, out, external=None):
    """The end of a run, once the best-validation model (LoVT's downstream checkpoint) is exported: it is evaluated
    next to the untrained model it started from (printed and written to eval.json), on the --zero-shot-csv set too
    (`external`), then the attention overlays."""
    common.seed_everything(args.seed)
    initial = LoVT(args, tokenizer).to(device)  # the same initialisation the training started from
    results = {k: evaluate(m, test_loader, tokenizer, device, args.n_boot)
               for k, m in (("untrained", initial), ("trained", model))}
    print(f"held-out {args.data} test split ({len(test_loader.dataset)} pairs):")
    if math.isnan(results["trained"]["zero_shot"]["mean"][0]):
        print(f"zero-shot AUC: no finding has both outcomes in this split. It needs label columns named as the "
              f"CheXpert findings ({', '.join(repr(n) for n in data.CHEXPERT_LABELS[1:4])}, ...: 1 positive, "
              f"0 negative) with positive and negative studies.")
    common.save_results(os.path.join(out, "eval.json"), results)
    common.score_external(out, external, dict(untrained=initial, trained=model), tokenizer, device, args)
    if args.viz:
        write_viz(model, next(iter(test_loader)), os.path.join(out, "viz"), *mean_std, args.viz, device)
    print(f"run folder: {out}")


@torch.no_grad()
def write_viz(model, batch, folder, mean, std, n, device):
    """PNG per image: the region weights of the attention pooling, then each sentence's a->b attention map."""
    model.eval()
    os.makedirs(folder, exist_ok=True)
    region, sentence = model.attention_maps(common.to_device(batch, device))  # B x h x w, B x S x h x w
    for i in range(min(n, len(region))):
        gray = (batch["images"][i, 0] * std + mean).clamp(0, 1)
        maps = [("attention-pool region weights", region[i])] + list(zip(batch["sentences"][i], sentence[i]))[:5]
        common.save_panels([common.heat_overlay(gray, heat) for _, heat in maps], [c for c, _ in maps],
                           os.path.join(folder, f"sample{i}.png"))


def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv, default_preset="demo")
    if args.bench:  # N timed optimizer steps without accumulation after one warm-up step
        args = common.bench_args(args, accum=1, ckpt_every=0)
    ddp = common.setup_distributed(args.device or None)
    dev, amp = ddp.device, common.amp_dtype(ddp.device, args.precision)
    micro_per_step = common.micro_batches_per_step(args.accum, ddp.world_size, args.batch_size)  # 32 x 16 on 1 or 8
    out = common.run_folder(args.out_dir, "lovt", ddp, args)
    first = lambda s: Subset(s, range(round(args.train_subset * len(s))))  # LoVT_30: the first 30 % of the studies
    train_set, val_set, test_set, (mean, std), tokenizer, external = common.datasets(
        args, lambda s: data.report_tokenizer(args.text_model, first(s)))  # statistics: all the training studies
    train_set = first(train_set)
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = LoVT(args, tokenizer).to(dev)
    collate = partial(data.collate, tokenizer=tokenizer, max_length=args.max_length)
    swapped = partial(collate, sentence_transform=partial(random_sentence_swaps, p=args.swap_prob))  # training only
    sampler, loader, val_loader, test_loader = common.loaders(args, ddp, train_set, val_set, test_set, collate, swapped)
    val_loader.generator = torch.Generator()  # validation draws its base seed from here, not from the global RNG
    augment = data.BatchAugment(args.image_size, mean, std).to(dev) if args.augment else None
    n_micro = sampler.num_samples // args.batch_size
    steps_per_epoch = math.ceil(n_micro / micro_per_step)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], args.lr,
                                  weight_decay=args.weight_decay)
    scheduler = common.per_epoch_cosine(optimizer, steps_per_epoch)  # the cosine wave over each epoch's steps
    scaler = common.grad_scaler(dev, amp)
    run = common.TrainingRun(args, ddp, out, min(args.max_steps or math.inf, steps_per_epoch * args.epochs),
                             model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    state, net = run.progress, common.wrap_ddp(model, ddp)
    if ddp.is_main:
        print(f"LoVT: {common.count_parameters(optimizer) / 1e6:.1f}M trainable parameters, {dev}, "
              f"{amp or torch.float32}, {steps_per_epoch} steps of {args.batch_size * micro_per_step * ddp.world_size} "
              f"pairs per epoch. The image-local terms cannot fall below the entropy of their soft target (~3.1-3.9 "
              f"nats on 7x7).")

    while not run.done:
        run.start_epoch(loader)  # a resumed run skips the batches this epoch already trained on
        net.train()
        for batch in run.logger.iterate(loader):
            state["micro"] += 1
            last, share = common.accumulation(state["micro"], n_micro, micro_per_step)
            batch = common.to_device(batch, dev)
            batch["images"] = data.train_view(batch["images"], args.image_size, augment)
            with nullcontext() if last or not ddp.distributed else net.no_sync():  # all-reduce once per step
                with common.autocast(dev, amp):
                    terms = net(batch)
                detached = {k: v.detach() for k, v in terms.items()}
                common.check_finite(detached["loss"], state["step"], run.ckpt_path, detached)
                scaler.scale(terms["loss"] / share).backward()
            run.logger.add(detached, images=args.batch_size * ddp.world_size)
            if not last:
                continue
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if run.stepped(lambda: {"lr": scheduler.get_last_lr()[0]}):
                break
        else:  # the epoch is complete: validation loss, best checkpoint, early stopping
            run.end_epoch(common.validation_loss(model, val_loader, dev, amp), model)
    run.export(model, lambda: common.export_encoders(out, model.image_encoder, model.text_encoder, tokenizer, mean,
                                                     std, args.image_size, "lovt", args))
    return run.evaluate(lambda: finish(args, model, tokenizer, test_loader, (mean, std), dev, out, external))

if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, data.BadRecord) as e:  # a NaN stop (check_finite) or bad training data: no traceback
        raise SystemExit(f"stopped: {e}")

"""LRCLR: local region contrastive fine-tuning of an image-text model for chest X-rays, in one file.

Paper: S. A. Rizvi, R. Tang, X. Jiang, X. Ma, X. Hu, "Local Contrastive Learning for Medical Image Recognition",
arXiv 2303.14153 (2023). No official code is known, and only the abstract is public: LRCLR is a fine-tuning
framework that ADDS layers to an existing image-text model, (a) a region-selection layer and (b) a cross-modality
interaction layer, and on an external chest X-ray set it "improves zero-shot performance on several findings" and
maps image regions to report text. Everything below beyond that sentence is our reconstruction (the "our choice:"
marks), the smallest architecture consistent with the abstract.

Stage base (our choice: a CLIP-style global model, the role CheXzero, rajpurkarlab/CheXzero, likely played).
  The image encoder's last feature grid y_1..y_N (ResNet conv5, row-major; a ViT's patches once common.py has one)
  goes through ONE linear map phi_img into the joint space, cell by cell: p_r = phi_img(y_r), g = phi_img(global)
  (= mean_r p_r on a ResNet grid), so the local tokens live in the joint space from the first step, as CLIP's
  final projection applied to ViT patch tokens. Text: u = phi_txt(h_[CLS]) of common.TextEncoder.
  S_ij = exp(t) cos(g_i, u_j), exp(t) clamped to <= 100, t_0 = ln(1/0.07);  L_glob = 1/2 [CE_rows(S) + CE_rows(S^T)]
Stage lrclr (our choice throughout), from the base checkpoint (--init RUN_DIR), every weight trainable:
  selection    s_r = MLP(LN(p_r)) (D -> 128 -> 1, GELU), keep the K highest (K ~ N/6: 3 of 16, 8 of 49, 33 of
               196), gated p~_r = sigmoid(s_r) p_r so the scorer has a gradient; gates start at ~0.5
  interaction  q_1..q_K = one pre-LN transformer block over the kept tokens (8 heads, FFN 4D, dropout 0.1, no
               positional embedding); text-guided pooling with 8 heads, d_h = D / 8:
               beta^h_{r|j} = softmax_r((W_Q^h u_j) . (W_K^h q_r) / sqrt(d_h)),
               z_{i|j} = LN(W_O [sum_r beta^h W_V^h q_r]_h)
               with NO residual of the text query (z would carry the text, the match would be trivial)
  scores       s^loc_ij = cos(z_{i|j}, u_j) / tau_loc (tau_loc learned, log-stored, from 0.07);  s = s^glob + s^loc
  loss         lrclr_loss: L = L_glob + lambda_loc L_loc (+ mu mean_r sigmoid(s_r), off by default),
               L_loc = 1/2 [CE_rows(S^loc) + CE_rows(S^loc^T)]
  optimiser    AdamW (0.9, 0.98): lr 1e-5 / wd 1e-4 for the base, 1e-4 / 0.1 for the new layers; 500 warm-up
               steps then cosine; batch 64; 3 epochs
Zero-shot (CheXzero's pair prompts "c" / "no c": p_c = softmax over the pair, so its AUC is that of
s(x, "c") - s(x, "no c")): per-finding AUC with bootstrap 95 % intervals for the base (global score), LRCLR
(global + local), LRCLR (local only) and LRCLR (global only), and the paired bootstrap interval of LRCLR - base, on
the test split and (--zero-shot-csv FILE) on a labelled image set no stage trained on: the abstract's external set.

Commands:
  python lrclr.py                     # demo: base, then LRCLR from it (and the control), synthetic data, CPU
  python lrclr.py --preset paper --data mimic --data-root CACHE --stage base               # Stage 0, one GPU
  python lrclr.py --preset paper --data mimic --data-root CACHE --stage lrclr --init runs/lrclr-base-XXXX
  torchrun --nproc_per_node=2 lrclr.py --preset paper --data mimic --data-root CACHE --stage base --batch-size 72
  python lrclr.py --stage lrclr --init RUN --lambda-loc 0     # control: the base fine-tuned alone, same steps
  python lrclr.py --resume --stage lrclr --init RUN --out-dir runs/lrclr-XXXX             # continue a killed run
  torchrun --nproc_per_node=2 lrclr.py --max-steps 5 --ft-max-steps 5     # DDP smoke test on CPU (gloo), all stages
  python lrclr.py --bench 20 --stage base|lrclr [--preset paper --image-weights none --text-model bert-base]
A run folder holds args.json, metrics.csv, val.csv, ckpt.pt, best.pt, image_encoder.pt, text_encoder/, eval.json (a
column per model and score, and the paired differences), zero_shot.txt and (stage lrclr) viz/*.png. --stage both (the
default) trains base/, control/ and lrclr/ one after another in one folder (also under torchrun) and evaluates them
after the last; --resume continues each sub-run that has a ckpt.pt and starts the others. --batch-size is per
process: the contrastive terms score each rank's rows against all gathered columns (g, u and, for L_loc, the kept
region tokens q are gathered with gradient), so W x B pairs per step; --accum counts the whole job's micro-batches
per step (each of W processes does accum / W; the default 1 is one per process on any number of processes). Stage
lrclr needs --init (it fine-tunes that base) and takes the base's encoders and report pooling from its args.json.

Deviations / our choices:
- our choice: the whole architecture and recipe of stage lrclr above, and the suite's own base (stage base).
- our choice: Stage 0 trains with MGCA's global recipe (AdamW (0.9, 0.999), lr 2e-5, wd 0.05, cosine with 40 %
  linear warm-up to 1e-8, batch 144, <= 50 epochs, early stopping patience 5 on the validation loss).
- our choice: phi_img and phi_txt start with a parameter-free BatchNorm of the encoder features (Projection); the
  image's global vector is normalised with its grid cells' statistics, so g = mean_r p_r in training and evaluation.
- our choice: the logit scale and tau_loc take no weight decay (open_clip's exclusion); 1/tau_loc <= 100 as exp(t).
- our choice: both stages keep the best validation-loss checkpoint (not the zero-shot AUC on a validation set).
- our choice: the base is compared with LRCLR on one checkpoint lineage, and for fairness also with the CONTROL:
  the base fine-tuned for the same steps with the same recipe and lambda_loc = 0 (--compare RUN_DIR).
- Report text: the suite loader's findings + impression sentences (CheXzero trained on the impression alone).
- our choice: MGCA's augmentation, a random crop of the training view (224 of the 256-px square; --no-augment:
  the whole view resized, as the demo); no other augmentation.
- bf16 autocast where supported, fp16 + GradScaler otherwise, fp32 on CPU; similarities and softmaxes in fp32.
- The demo preset (ResNet-18 and a 2-layer BERT from scratch, 128 px, K = 3 of 16 cells) uses larger learning rates
  and a shorter warm-up; the parameter-free selection ablation and word-level maps are not implemented.
"""
import json
import math
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import ImageDraw
from torch import nn

import common
import data
from common import arg, fp32


@dataclass
class Args(common.RunArgs):
    """LRCLR (defaults = our reconstruction of the paper's recipe; `--preset demo` is used when no --data is given)."""
    stage: Literal["both", "base", "lrclr"] = arg("both", "base: Stage 0 | lrclr: fine-tune --init | both: base, "
                                                          "control and lrclr in sub-folders")
    init: str = arg("", "stage lrclr: the base run folder (its best.pt or ckpt.pt, args.json and text_encoder/)")
    compare: str = arg("", "stage lrclr: also evaluate this run (e.g. the --lambda-loc 0 control) in the table")
    control: bool = arg(True, "--stage both: also train the control (the base fine-tuned with --lambda-loc 0)")
    # encoders (stage lrclr takes them from the --init run)
    image_arch: str = arg("resnet50", "resnet50 | resnet18 (conv5 grid: 7x7 at 224 px) | vit_b16 | vit_tiny")
    image_weights: str = arg("imagenet", "imagenet | none | path to a state dict")
    image_size: int = arg(224, "input size")
    channels_last: bool = arg(True, "NHWC memory format for the ResNet")
    text_model: str = arg("emilyalsentzer/Bio_ClinicalBERT", "name/path, or tiny | bert-base (random init, "
                          "vocabulary from the training reports)")
    text_pool: Literal["cls", "mean"] = arg("cls", "u from the [CLS] state (CLIP-style) or the mean of the tokens")
    max_length: int = arg(512, "token limit of a report incl. [CLS]/[SEP]")
    dim: int = arg(512, "D, the joint space")
    # the added layers
    top_k: int = arg(0, "regions kept (0 = round(N / 6): 8 of 49)")
    scorer_hidden: int = arg(128, "hidden width of the region scorer")
    heads: int = arg(8, "heads of the region self-attention and of the text-guided pooling")
    dropout: float = arg(0.1, "dropout of the region self-attention block")
    lambda_loc: float = arg(1.0, "weight of L_loc (0: the control, the base fine-tuned alone)")
    mu_sparsity: float = arg(0.0, "weight of the gate sparsity term mean_r sigmoid(s_r) (0.01 to switch it on)")
    # optimisation, stage base
    batch_size: int = arg(144, "stage base: micro-batch per process")
    accum: int = arg(1, "micro-batches per optimizer step, whole job: each of W processes does accum / W (1: one "
                        "per process, any W)")
    lr: float = arg(2e-5, "stage base: AdamW learning rate")
    weight_decay: float = arg(0.05, "stage base: AdamW weight decay")
    warmup: float = arg(0.4, "stage base: linear warm-up fraction of the steps, then cosine to 1e-8")
    epochs: int = arg(50, "stage base: maximum epochs")
    patience: int = arg(5, "early stopping: epochs without a validation-loss improvement > 1e-5")
    # optimisation, stage lrclr
    ft_batch_size: int = arg(64, "stage lrclr: micro-batch per process")
    ft_lr: float = arg(1e-5, "stage lrclr: learning rate of the base (encoders, projections, logit scale)")
    ft_lr_new: float = arg(1e-4, "stage lrclr: learning rate of the added layers")
    ft_weight_decay: float = arg(1e-4, "stage lrclr: weight decay of the base")
    ft_weight_decay_new: float = arg(0.1, "stage lrclr: weight decay of the added layers")
    ft_warmup_steps: int = arg(500, "stage lrclr: linear warm-up steps, then cosine to 1e-8")
    ft_epochs: int = arg(3, "stage lrclr: epochs")
    ft_max_steps: int = arg(0, "stage lrclr: stop after this many optimizer steps (0 = ft_epochs; --max-steps wins)")


PRESETS = {
    "paper": dict(data="mimic"),
    # 2 CPU cores, 141 s measured alone for base + control + lrclr: small encoders from scratch, 128 px (4x4 grid,
    # K = 3).
    "demo": dict(data="synthetic", image_arch="resnet18", image_weights="none", image_size=128, augment=False,
                 text_model="tiny", text_pool="mean", max_length=128, dim=256, batch_size=32, lr=1e-3,
                 weight_decay=0.05, warmup=0.1, epochs=1,
                 ft_batch_size=32, ft_lr=2e-4, ft_lr_new=2e-3, ft_warmup_steps=5, ft_epochs=1, ft_max_steps=20,
                 train_samples=1280, eval_samples=300, workers=0, ckpt_every=50, log_every=5),
}
NEW_LAYERS = ("select.", "interact.")            # what stage lrclr adds to the base
TEMPERATURES = ("log_logit_scale", "interact.log_tau")


# ==== METHOD: LRCLR ====
# ---- stage base: one projection for the global vector and every grid cell ----
class LRCLR(nn.Module):
    """Image encoder + phi_img (every cell), text encoder + phi_txt, learned logit scale; with stage lrclr also the
    region selection and the interaction layer. forward(batch) -> dict(loss, global[, local, sparsity])."""

    def __init__(self, args, tokenizer, local=None, image_weights=None):
        super().__init__()
        self.args, self.local = args, args.stage == "lrclr" if local is None else local
        self.image_encoder = common.ImageEncoder(args.image_arch, image_weights or args.image_weights,
                                                 args.channels_last)
        self.text_encoder = common.TextEncoder(args.text_model, tokenizer)
        self.image_proj = Projection(self.image_encoder.out_dim, args.dim)
        self.text_proj = Projection(self.text_encoder.out_dim, args.dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initialisation
        if self.local:
            self.select = RegionSelection(args.dim, args.top_k, args.scorer_hidden)
            self.interact = Interaction(args.dim, args.heads, args.dropout)

    def logit_scale(self):
        return self.log_logit_scale.exp().clamp(max=100.0)  # CLIP's clamp

    def image_features(self, images):
        """-> g B x D (phi_img of the encoder's global feature: the grid mean on a ResNet, CLS on a ViT),
        tokens p B x N x D (phi_img of every cell), grid (h, w). One normalisation serves both (Projection.pair):
        on a ResNet g = mean_r p_r in training and in evaluation."""
        out = self.image_encoder(images)
        return (*self.image_proj.pair(out["global_feat"], out["local_feats"]), out["grid"])

    def text_features(self, batch):
        """-> u B x D, phi_txt of the [CLS] state (or, --text-pool mean, of the mean over the report's tokens)."""
        states = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        if self.args.text_pool == "cls":
            return self.text_proj(states[:, 0])
        mask = batch["attention_mask"][..., None].to(states.dtype)
        return self.text_proj((states * mask).sum(1) / mask.sum(1))

    def forward(self, batch):
        """-> lrclr_loss's terms. The caller's part of the loss: the unit embeddings, the gathers across ranks (with
        gradient) and, with the added layers, the learned local scores s^loc of own region tokens vs all gathered
        texts and of own texts vs all gathered region tokens."""
        g, tokens, _ = self.image_features(batch["images"])
        u = self.text_features(batch)
        unit_g, unit_u = F.normalize(fp32(g), dim=-1), F.normalize(fp32(u), dim=-1)  # the model normalises (CLIP)
        unit_g_all, unit_u_all, offset = common.gather_rows(unit_g, unit_u)
        local = {}
        if self.local:
            kept, _, gates = self.select(tokens)
            regions = self.interact.block(kept)
            regions_all, u_all, _ = common.gather_rows(regions, u)
            rows = self.interact.scores(regions, u_all)[0]
            cols = rows.T if regions_all is regions else self.interact.scores(regions_all, u)[0].T
            local = dict(local_rows=rows, local_cols=cols, gates=gates)
        # lambda_loc = 0 (the control) zeroes a weight; every term is still computed (logged, DDP sees all parameters)
        return lrclr_loss(unit_g, unit_u, unit_g_all, unit_u_all, self.logit_scale(), offset, **local,
                          lambda_loc=self.args.lambda_loc, mu_sparsity=self.args.mu_sparsity)

    def encode_image(self, images):
        return F.normalize(fp32(self.image_features(images)[0]), dim=-1)

    def encode_text(self, batch):
        return F.normalize(fp32(self.text_features(batch)), dim=-1)

    def regions(self, images):
        """-> g B x D, the K region tokens q B x K x D (after the self-attention block), their cell indices B x K,
        the gates sigmoid(s_r) B x N and the grid (h, w)."""
        g, tokens, grid = self.image_features(images)
        kept, index, gates = self.select(tokens)
        return g, self.interact.block(kept), index, gates, grid

    def pair_scores(self, g, q, u, chunk=64):
        """g I x D, q I x K x D (or None), u T x D -> {"global": I x T[, "local": I x T, "global+local": their sum]}
        in fp32, chunked over images (the local score pools I x T vectors of D)."""
        scores = {"global": self.logit_scale().float() * F.normalize(fp32(g), dim=-1) @ F.normalize(fp32(u), dim=-1).T}
        if q is not None:
            scores["local"] = torch.cat([self.interact.scores(q[s:s + chunk], u)[0] for s in range(0, len(q), chunk)])
            scores["global+local"] = scores["global"] + scores["local"]
        return scores

    def score(self, images, batch):
        """The combined score s = s^glob + s^loc, images x reports (B x B)."""
        g, q, *_ = self.regions(images)
        return self.pair_scores(g, q, self.text_features(batch))["global+local"]


class Projection(nn.Module):
    """phi: a parameter-free BatchNorm of the encoder features, then one Linear. our choice: the centring;
    from-scratch encoders give nearly equal features for every image, and the CLIP loss then sits at log B for tens
    of steps (40 on 8 pairs) before it moves; with it, from the first steps. The image side normalises the global
    vector with the statistics of the grid cells (pair): one affine map for both, in training (the batch's
    statistics) and in evaluation (the running ones), so that g = mean_r p_r holds on a ResNet grid in both and
    evaluation scores the embedding the loss trained."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.norm, self.linear = nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, out_dim)

    def forward(self, x):  # ... x in_dim -> ... x out_dim, normalised with x's own statistics (the text side)
        return self.linear(self.norm(x.reshape(-1, x.shape[-1])).view_as(x))

    def pair(self, global_feat, cells):
        """global B x in_dim, cells B x N x in_dim -> (phi(global) B x out_dim, phi(cells) B x N x out_dim), both
        normalised with the cells' statistics (training: the batch's, also updating the running ones)."""
        flat = cells.reshape(-1, cells.shape[-1])
        normed = self.norm(flat).view_as(cells)
        if self.training:
            mean, var = fp32(flat).mean(0), fp32(flat).var(0, unbiased=False)  # what BatchNorm normalised with
        else:
            mean, var = self.norm.running_mean, self.norm.running_var
        g = (fp32(global_feat) - mean) * torch.rsqrt(var + self.norm.eps)
        return self.linear(g.to(normed.dtype)), self.linear(normed)


# ---- stage lrclr: the region-selection layer ----
class RegionSelection(nn.Module):
    """our choice: s_r = MLP(LN(p_r)) (D -> hidden -> 1, GELU); the top-K tokens, each times its gate sigmoid(s_r).
    top-K itself has no gradient, the gate gives the scorer one; unselected tokens receive none (tested)."""

    def __init__(self, dim, top_k=0, hidden=128):
        super().__init__()
        self.top_k = top_k
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.normal_(self.mlp[2].weight, std=1e-3)  # our choice: s_r ~ 0, every gate starts at ~0.5
        nn.init.zeros_(self.mlp[2].bias)

    def k(self, n):
        return min(n, self.top_k or max(1, round(n / 6)))  # our choice: K ~ N/6 (8 of 49, 3 of 16)

    def forward(self, tokens):
        """tokens B x N x D -> kept B x K x D (sigmoid(s_r) p_r, highest score first), index B x K, gates B x N."""
        scores = fp32(self.mlp(self.norm(tokens)).squeeze(-1))
        gates = scores.sigmoid()
        index = scores.topk(self.k(tokens.shape[1]), dim=1).indices
        kept = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
        return kept * gates.gather(1, index)[..., None].to(kept.dtype), index, gates


# ---- stage lrclr: the cross-modality interaction layer ----
class TextGuidedPooling(nn.Module):
    """our choice: multi-head cross-attention with the report embedding u_j as the one query over an image's region
    tokens q_r: beta^h_{r|j} = softmax_r((W_Q^h u_j) . (W_K^h q_r) / sqrt(d_h)),
    z_{i|j} = LN(W_O [sum_r beta^h_{r|j} W_V^h q_r]_h). No residual of the query: u_j reaches z only through beta."""

    def __init__(self, dim, heads=8):
        super().__init__()
        if dim % heads:
            raise ValueError(f"--dim {dim} must be divisible by --heads {heads}")
        self.heads = heads
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)

    def forward(self, regions, texts):
        """regions I x K x D, texts T x D -> z I x T x D (image i pooled for report j), beta I x T x heads x K."""
        (I, K, D), H = regions.shape, self.heads
        q = fp32(self.query(texts)).view(-1, H, D // H)
        k = fp32(self.key(regions)).view(I, K, H, D // H)
        v = self.value(regions).view(I, K, H, D // H)
        beta = (torch.einsum("thd,ikhd->ithk", q, k) / math.sqrt(D // H)).softmax(-1)  # fp32
        mixed = torch.einsum("ithk,ikhd->ithd", beta.to(v.dtype), v).flatten(2)       # I x T x D
        return self.norm(self.out(mixed)), beta


class Interaction(nn.Module):
    """our choice: one pre-LN transformer block over the K kept tokens (no positional embedding), the text-guided
    pooling, and the local score s^loc_ij = cos(z_{i|j}, u_j) / tau_loc with tau_loc learned (log-stored)."""

    def __init__(self, dim, heads=8, dropout=0.1):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                                norm_first=True)
        self.pool = TextGuidedPooling(dim, heads)
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.07)))

    def scores(self, regions, texts):
        """regions I x K x D (block output), texts u T x D -> s^loc I x T (fp32), beta I x T x heads x K."""
        z, beta = self.pool(regions, texts)
        tau = self.log_tau.exp().clamp(min=0.01)  # our choice: 1 / tau_loc <= 100, as the logit scale
        return common.cosine(fp32(z), fp32(texts)[None]) / tau, beta


# ---- the losses ----
def symmetric_ce(rows, cols, offset=0):
    """CLIP's loss from both score directions: rows B x M (own images vs all M texts), cols B x M (own texts vs all
    M images), the positive of row b at column b + offset -> 1/2 [CE_rows(rows) + CE_rows(cols)]. In one process
    rows = S and cols = S^T; under DDP M = W x B gathered columns and offset = rank x B."""
    a2b, b2a = common.contrastive_ce(fp32(rows), fp32(cols), offset)
    return 0.5 * (a2b + b2a)


def lrclr_loss(g, u, g_all, u_all, logit_scale, offset=0, local_rows=None, local_cols=None, gates=None,
               lambda_loc=1.0, mu_sparsity=0.0):
    """LRCLR's loss on this rank's B pairs, from tensors alone: L = L_glob + lambda_loc L_loc + mu_sparsity L_sp.
    g, u B x D: this rank's image and report embeddings, L2-normalised (as open_clip's ClipLoss takes them);
    g_all, u_all M x D: every rank's, in rank order (M = W x B, this rank's rows at offset = rank x B; in one process
    g, u themselves and offset 0); logit_scale = exp(t):
      L_glob = 1/2 [CE_rows(exp(t) g u_all^T) + CE_rows(exp(t) u g_all^T)]                   (CLIP)
    and with the added layers (stage lrclr), their scores computed by the caller: local_rows B x M = s^loc of own
    images vs all texts, local_cols B x M = s^loc of all images vs own texts, transposed; gates B x N = sigmoid(s_r):
      L_loc = 1/2 [CE_rows(local_rows) + CE_rows(local_cols)],  L_sp = mean gates.
    The positive of row b is column offset + b; with DDP's gradient averaging this equals the full-batch loss and
    gradient (tested). -> dict(loss, global[, local, sparsity]), the terms unweighted."""
    tau = 1 / logit_scale
    terms = {"global": symmetric_ce(g @ u_all.T / tau, u @ g_all.T / tau, offset)}
    loss = terms["global"]
    if local_rows is not None:
        terms.update(local=symmetric_ce(local_rows, local_cols, offset), sparsity=gates.mean())
        loss = loss + (lambda_loc * terms["local"] + mu_sparsity * terms["sparsity"])
    return dict(loss=loss, **terms)


# ==== TRAINING: data, loop, evaluation ====
def report_tokenizer(args, train_set):
    """The --init run's tokenizer (stage lrclr), else data.report_tokenizer (Bio_ClinicalBERT's, or a vocabulary
    of the training reports for the random-init encoders)."""
    if args.init:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(os.path.join(args.init, "text_encoder"))
    return data.report_tokenizer(args.text_model, train_set)


def stage_args(args):
    """Stage lrclr: the encoder fields (and the report vector's pooling) from the --init run's args.json, and its own
    batch size, epochs and base lr and weight decay (in the fields stage base uses)."""
    if args.stage != "lrclr":
        return args
    if not args.init and not args.bench:  # --bench times the fine-tuning step from random initialisation
        raise SystemExit("--stage lrclr fine-tunes a base model: pass --init RUN, the folder of a --stage base run "
                         "(or run --stage both, which trains the base first)")
    if args.init:
        path = os.path.join(args.init, "args.json")
        if not os.path.exists(path):
            raise SystemExit(f"--init {args.init}: no args.json there (pass a folder written by --stage base)")
        with open(path) as f:
            base = json.load(f)
        args = replace(args, **{k: base[k] for k in ("image_arch", "image_size", "channels_last", "text_model",
                                                     "text_pool", "max_length", "dim")}, image_weights="none")
    return replace(args, batch_size=args.ft_batch_size, epochs=args.ft_epochs, lr=args.ft_lr,
                   weight_decay=args.ft_weight_decay, max_steps=args.max_steps or args.ft_max_steps)


def load_run(model, run_dir):
    """The weights of a run folder (best.pt, else ckpt.pt) into `model`; only the added layers may be missing (a base
    into LRCLR) or left out (an LRCLR run, e.g. the control, into a base model)."""
    path = next((p for p in (os.path.join(run_dir, n) for n in ("best.pt", "ckpt.pt")) if os.path.exists(p)), None)
    if path is None:
        raise SystemExit(f"{run_dir} holds neither best.pt nor ckpt.pt (pass a finished run folder)")
    try:
        state = common.load_checkpoint(path)["model"]
        if not model.local:
            state = {k: v for k, v in state.items() if not k.startswith(NEW_LAYERS)}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SystemExit(f"{path} does not fit this model ({str(e)[:300]})")
    if unexpected or [k for k in missing if not k.startswith(NEW_LAYERS)]:
        raise SystemExit(f"{path}: unexpected keys {unexpected[:5]}, missing {missing[:5]}")
    return model


def param_groups(model, args):
    """AdamW groups: stage base one lr and wd; stage lrclr the base at ft_lr / ft_weight_decay (args.lr and
    args.weight_decay after stage_args) and the new layers at ft_lr_new / ft_weight_decay_new; the temperatures
    without weight decay."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith(NEW_LAYERS), name in TEMPERATURES), []).append(p)
    return [dict(params=ps, lr=args.ft_lr_new if new else args.lr,
                 weight_decay=0.0 if temp else args.ft_weight_decay_new if new else args.weight_decay)
            for (new, temp), ps in groups.items()]


def image_side(model, images, local):
    """-> g B x D and, with `local` (the added layers), the region tokens q B x K x D, else None."""
    return model.regions(images)[:2] if local else (model.image_features(images)[0], None)


@torch.no_grad()
def evaluate(model, loader, tokenizer, device, local=True, n_boot=1000):
    """Held-out pairs, in fp32 -> ({kind: dict(retrieval, zero_shot, checks)}, {kind: zero-shot margins N x C},
    labels N x C, names) for the score kinds global (and with `local` and the added layers: local, global+local):
    retrieval R@1/5/10 both ways on the split's pairs, zero-shot AUC with bootstrap 95 % intervals per finding and for
    their mean (the margin s(x, "c") - s(x, "no c"): CheXzero's pair softmax)."""
    model.eval()
    local = local and model.local
    g, q, u, labels = [], [], [], []
    for batch in loader:
        b = common.to_device(batch, device)
        image_g, image_q = image_side(model, b["images"], local)
        g.append(image_g)
        q.append(image_q)
        u.append(model.text_features(b))
        labels.append(data.zero_shot_targets(batch))
    g, q, u, labels = torch.cat(g), torch.cat(q) if local else None, torch.cat(u), torch.cat(labels)
    names, phrases = data.zero_shot_findings("masks" in batch)
    pos, neg = (model.pair_scores(g, q, model.text_features(common.to_device(data.prompt_batch(p, tokenizer), device)))
                for p in (phrases, [f"no {p}" for p in phrases]))
    results = {kind: dict(retrieval=common.retrieval(pair),
                          zero_shot=common.zero_shot_summary(pos[kind], neg[kind], labels, names, n_boot), checks={})
               for kind, pair in model.pair_scores(g, q, u).items()}
    margins = {kind: (pos[kind].double() - neg[kind].double()).cpu().numpy() for kind in pos}
    return results, margins, labels.numpy(), names


def paired_delta(a, b, labels, names, n_boot=1000):
    """AUC(a) - AUC(b) per finding and for the mean, with paired bootstrap 95 % intervals (the same resampled images
    for both scores) -> {name: (delta, low, high)}."""
    out = {}
    delta = lambda x, y, t: common.roc_auc(x, t) - common.roc_auc(y, t)  # noqa: E731
    for c, name in enumerate(names):
        value = delta(a[:, c], b[:, c], labels[:, c])
        out[name] = (value, math.nan, math.nan) if math.isnan(value) else (
            value, *common.bootstrap_ci(delta, a[:, c], b[:, c], labels[:, c], n=n_boot))
    mean = lambda x, y, t: common.mean_auc(x, t) - common.mean_auc(y, t)  # noqa: E731
    out["mean"] = (mean(a, b, labels), *common.bootstrap_ci(mean, a, b, labels, n=n_boot))
    return out


def zero_shot_table(ci, deltas, title):
    """The must-show table as text: AUC [95 % CI] per finding and column, then the paired differences."""
    cell = lambda v: "n/a" if math.isnan(v[0]) else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
    rows = list(next(iter(ci.values())))
    lines = [title, "| finding | " + " | ".join(ci) + " |", "|---" * (len(ci) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(cell(c[r]) for c in ci.values()) + " |" for r in rows]
    for name, d in deltas.items():
        lines.append(f"{name}: " + ", ".join(f"{r} {d[r][0]:+.3f} [{d[r][1]:+.3f}, {d[r][2]:+.3f}]" for r in d
                                             if not math.isnan(d[r][0])))
    return "\n".join(lines)


def zero_shot_scores(model, images, prompts, local=True):
    """common.external_zero_shot's score: pair_scores of the images against the prompts, as evaluate scores them:
    global, and with the added layers (and `local`) also local and global+local."""
    return model.pair_scores(*image_side(model, images, local and model.local), model.text_features(prompts))


def finish(args, model, tokenizer, test_loader, mean_std, external, device, out):
    """The end of a run, once the best-validation model is exported: the comparison. Stage base: untrained vs
    trained (global score). Stage lrclr: its base (--init), the control (--compare) and LRCLR's three scores, with
    the paired differences; the table goes to zero_shot.txt and everything to eval.json (common.save_results: a
    column per model and score, "trained": this run's model under the score it reports, as in every method's
    eval.json, and "paired_delta"); the same comparison on the --zero-shot-csv set (`external`, or None); then the
    overlays. -> eval.json's columns."""
    common.seed_everything(args.seed)
    if model.local:
        others = [("base", args.init), ("control", args.compare)]
        others = [(n, load_run(LRCLR(args, tokenizer, local=False).to(device), d)) for n, d in others if d]
    else:
        others = [("untrained", LRCLR(args, tokenizer).to(device))]  # the initialisation the training started from
    trained = ("LRCLR" if args.lambda_loc > 0 else "control") if model.local else "base"
    models = dict(others + [(trained, model)])
    results, margins = {}, {}
    for name, m in models.items():  # the control: global score only
        found, margin, labels, names = evaluate(m, test_loader, tokenizer, device, args.lambda_loc > 0, args.n_boot)
        for kind in found:
            column = name if len(found) == 1 else f"{name} {kind}"
            results[column], margins[column] = found[kind], margin[kind]
    pairs = ([("LRCLR global+local", "base"), ("LRCLR local", "base"), ("LRCLR global+local", "control"),
              ("control", "base")] if model.local else [("base", "untrained")])

    def deltas(margins, labels, names):  # paired bootstrap intervals of the pairs of columns that exist
        return {f"{a} - {b}": paired_delta(margins[a], margins[b], labels, names, args.n_boot)
                for a, b in pairs if a in margins and b in margins}
    held_out = deltas(margins, labels, names)
    own = "LRCLR global+local" if trained == "LRCLR" else trained
    common.save_results(os.path.join(out, "eval.json"), results, trained=results[own], paired_delta=held_out)
    table = zero_shot_table({c: r["zero_shot"] for c, r in results.items()}, held_out,
                            f"zero-shot AUC [bootstrap 95 % CI], held-out {args.data} test split "
                            f"({len(test_loader.dataset)} pairs), base: suite {args.image_arch} grid; "
                            "differences are paired bootstrap intervals:")
    print(table)
    with open(os.path.join(out, "zero_shot.txt"), "w") as f:
        f.write(table + "\n")
    if external is not None:  # the claim's test: the same columns and differences on images it never trained on
        zero_shot = common.external_zero_shot(models, external, tokenizer, device,
                                              partial(zero_shot_scores, local=args.lambda_loc > 0), args.n_boot,
                                              args.workers)
        external_deltas = deltas(zero_shot["margins"], zero_shot["labels"], zero_shot["names"])
        common.save_external_zero_shot(out, external, zero_shot["ci"], paired_delta=external_deltas)
        table = zero_shot_table(zero_shot["ci"], external_deltas, f"zero-shot AUC [bootstrap 95 % CI] on "
                                f"{args.zero_shot_csv} ({len(external)} images); differences are paired intervals:")
        print(table)
        with open(os.path.join(out, "zero_shot.txt"), "a") as f:
            f.write(table + "\n")
    if model.local and args.viz:
        write_viz(model, next(iter(test_loader)), tokenizer, os.path.join(out, "viz"), *mean_std, args.viz, device)
    print(f"run folder: {out}")
    return results


def grid_map(values, index, n):
    """Values B x K at cell indices B x K -> B x n, unselected cells 0."""
    return values.new_zeros(len(values), n).scatter(1, index, values)


@torch.no_grad()
def write_viz(model, batch, tokenizer, folder, mean, std, n, device):
    """PNG per test image: the gates sigmoid(s_r) with the K kept cells outlined, then the text->region map beta
    (heads averaged, unselected cells 0) for the image's own report and for the positive prompt of a finding it has."""
    model.eval()
    os.makedirs(folder, exist_ok=True)
    b = common.to_device(batch, device)
    _, q, index, gates, (h, w) = model.regions(b["images"])
    reports = model.text_features(b)
    names, phrases = data.zero_shot_findings("masks" in batch)
    present = data.zero_shot_targets(batch)
    for i in range(min(n, len(q))):
        gray = (batch["images"][i, 0] * std + mean).clamp(0, 1)
        found = [c for c in range(len(names)) if present[i, c] == 1]
        queries = [(f"report: {batch['texts'][i]}", reports[i:i + 1])]
        if found:
            prompt = data.prompt_batch([phrases[found[0]]], tokenizer)
            queries.append((f"prompt: {phrases[found[0]]}", model.text_features(common.to_device(prompt, device))))
        maps = [(f"gates sigmoid(s_r) {gates[i].min():.2f}-{gates[i].max():.2f}, K = {q.shape[1]} kept", gates[i])]
        for caption, u in queries:
            beta = model.interact.scores(q[i:i + 1], u)[1].mean(2)[0, 0]  # K, heads averaged
            maps.append((caption, grid_map(beta[None], index[i:i + 1], h * w)[0]))
        panels = [common.heat_overlay(gray, heat.view(h, w), mode="nearest") for _, heat in maps]
        draw = ImageDraw.Draw(panels[0])
        for cell in index[i].tolist():  # outline the kept cells
            r, c = divmod(cell, w)
            draw.rectangle([c * 256 // w, r * 256 // h, (c + 1) * 256 // w - 1, (r + 1) * 256 // h - 1],
                           outline=(255, 255, 0), width=2)
        common.save_panels(panels, [c for c, _ in maps], os.path.join(folder, f"sample{i}.png"), lines=5)


def run_both(args, argv):
    """--stage both (the demo): base/, then control/ (lambda_loc 0, if --control) and lrclr/ from base/, each one
    main() in the one process group (so torchrun runs it too), all evaluated after the last, on rank 0 alone.
    --resume continues each sub-run that has a ckpt.pt and starts the others (a run killed during base)."""
    ddp = common.setup_distributed(args.device or None)
    root = common.run_folder(args.out_dir, "lrclr", ddp)
    argv = [a for a in argv if a not in ("--resume", "--no-resume")]

    def stage(name, *flags):
        folder = os.path.join(root, name)
        resume = ["--resume"] if args.resume and os.path.exists(os.path.join(folder, "ckpt.pt")) else []
        return main([*argv, "--out-dir", folder, *flags, *resume], ddp)
    runs = [stage("base", "--stage", "base")]
    lrclr_flags = ["--stage", "lrclr", "--init", os.path.join(root, "base")]
    if args.control:
        runs.append(stage("control", *lrclr_flags, "--lambda-loc", "0", "--viz", "0"))
        lrclr_flags += ["--compare", os.path.join(root, "control")]
    runs.append(stage("lrclr", *lrclr_flags))
    common.cleanup_distributed()  # from here on rank 0 alone, with no collective
    if not ddp.is_main:
        return None
    result = None
    for run in runs:
        with common.after_training(run[-1]):
            result = finish(*run)
    return result


def main(argv=None, ddp=None):
    """One stage: train, export the best-validation model, evaluate. --stage both: run_both, which calls this for
    each stage with its process group `ddp`; such a stage returns finish()'s arguments instead (run_both evaluates)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = common.parse_args(Args, PRESETS, argv, default_preset="demo")
    if args.bench:  # N timed optimizer steps without accumulation after one warm-up step
        args = common.bench_args(args, accum=1, ckpt_every=0, stage="lrclr" if args.stage == "both" else args.stage)
    if args.stage == "both":
        return run_both(args, argv)
    args, one_of_both = stage_args(args), ddp is not None
    ddp = ddp or common.setup_distributed(args.device or None)
    dev, amp = ddp.device, common.amp_dtype(ddp.device, args.precision)
    micro_per_step = common.micro_batches_per_step(args.accum, ddp.world_size, args.batch_size)
    out = common.run_folder(args.out_dir, f"lrclr-{args.stage}", ddp, args)
    own_tokenizer = partial(report_tokenizer, args)  # stage lrclr: the --init run's
    train_set, val_set, test_set, (mean, std), tokenizer, external = common.datasets(args, own_tokenizer)
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = LRCLR(args, tokenizer)
    if args.init:
        load_run(model, args.init)
    model.to(dev)
    collate = partial(data.collate, tokenizer=tokenizer, max_length=args.max_length)
    sampler, loader, val_loader, test_loader = common.loaders(args, ddp, train_set, val_set, test_set, collate)
    augment = data.crop_augment(args.image_size, mean, std).to(dev) if args.augment else None
    n_micro = sampler.num_samples // args.batch_size
    steps_per_epoch = math.ceil(n_micro / micro_per_step)
    total = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    base = args.stage == "base"
    optimizer = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.999) if base else (0.9, 0.98))
    warmup = round(args.warmup * total) if base else args.ft_warmup_steps
    scheduler = common.cosine_with_warmup(optimizer, warmup, total, min_lr=1e-8)
    scaler = common.grad_scaler(dev, amp)
    run = common.TrainingRun(args, ddp, out, total, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler)
    state, net = run.progress, common.wrap_ddp(model, ddp)
    if ddp.is_main:
        print(f"LRCLR stage {args.stage}{' from ' + args.init if args.init else ''}: "
              f"{common.count_parameters(optimizer) / 1e6:.1f}M trainable parameters, {dev}, {amp or torch.float32}, "
              f"{steps_per_epoch} steps of {args.batch_size * micro_per_step * ddp.world_size} pairs per epoch")

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
            if run.stepped(lambda: {"lr": scheduler.get_last_lr()[0], "logit_scale": model.logit_scale().item()}):
                break
        else:  # the epoch is complete: validation loss, best checkpoint, early stopping
            run.end_epoch(common.validation_loss(model, val_loader, dev, amp), model)
    run.export(model, lambda: common.export_encoders(out, model.image_encoder, model.text_encoder, tokenizer, mean,
                                                     std, args.image_size, "lrclr", args))
    stage = (args, model, tokenizer, test_loader, (mean, std), external, dev, out)
    if one_of_both:
        if ddp.distributed:
            dist.barrier()  # the next stage reads this one's files
        return stage
    return run.evaluate(lambda: finish(*stage))

if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, data.BadRecord) as e:  # a NaN stop (check_finite) or bad training data: no traceback
        raise SystemExit(f"stopped: {e}")

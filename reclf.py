"""RECLF: relation-enhanced contrastive learning of chest X-rays and reports, in one file (a reconstruction).

Paper: M. Li, M. Meng, M. Fulham, D. D. Feng, L. Bi, J. Kim, "Enhancing Medical Vision-Language Contrastive Learning
via Inter-Matching Relation Modelling", IEEE TMI 2025 (doi 10.1109/TMI.2025.3534436), arXiv 2401.10501. No official
code. Only the abstract could be read: image sub-regions and report keywords form "local-matchings"; instead of the
"simple pooling" of earlier methods, a semantic-relation reasoning module (SRM) reasons across related matchings (a
disease word and a location word) and an importance-relation reasoning module (IRM) tells important matchings from
those of less meaningful words such as conjunctions. Everything beyond that is reconstructed on GLoRIA
(marshuang80/gloria, the local matching RECLF starts from) and SGRAF (Paranioar/SGRAF:model.py, whose similarity
graph reasoning and attention filtration match SRM and IRM in role); each piece says "as GLoRIA:", "as SGRAF:" or
"our choice:". Check every "our choice" against the paper's full text before treating it as RECLF's.

Model (one image a with regions v_j, one report b with words e_i; ^ = L2-normalised):
  encoders   as GLoRIA (gloria/models/vision_model.py, text_model.py): ResNet-50 on the image upsampled to 299 px
             (bilinear, align_corners=True); regions = 1x1 conv (no bias) of layer3 (19 x 19 = 361 x 768), global
             g = Linear(avg-pooled layer4); BERT (Bio_ClinicalBERT) with the hidden states of its last 4 layers
             summed; no text projection (D = 768 = the BERT width).
  text       as GLoRIA (the paper preset; gloria/datasets/pretraining_dataset.py, text_model.py, gloria_model.py):
             the report cleaned to lower-case \\w+ tokens (punctuation dropped, one-token sentences dropped) and cut
             at 97 word pieces incl. [CLS] / [SEP] (word_num) mid-sentence (--clean-text); word pieces summed into
             the merged sequence [CLS], words, [SEP] ([UNK] a word); report t = per layer the mean over the 97 slots
             of that sequence (zero padding included), summed over the 4 layers (--text-pool gloria); the local
             matching reads GLoRIA's columns: the first 1 + (words not starting with "[") slots, [CLS] first, so
             each [UNK] keeps its column and pushes the report's last word out (--word-columns gloria).
             our choice (--word-columns words, the demo): every word of the report ([CLS], [SEP], [UNK] and
             punctuation out); no stop-word removal in either: IRM exists to weight function words. A report with no
             word (every token unknown: real text against a vocabulary of other reports) keeps one empty word, a
             zero vector, so that its local score is defined (common.sum_pieces).
  contexts   as GLoRIA (AttnGAN Eqs. 7-9, common.word_region_attention): s_ij = v_j . e_i, softmax over words per
             region, softmax over regions of gamma1 = 4 times it per word: alpha_ij; c_i = sum_j alpha_ij v_j.
  matchings  as SGRAF (similarity vectors): m_i = norm2(W_l (e^_i - c^_i)^2) in R^256, the element sum of
             (e^_i - c^_i)^2 being 2 - 2 cos(e_i, c_i): GLoRIA's scalar, disentangled; the global node
             m_0 = norm2(W_g (g^ - t^)^2); nodes M = [m_0; m_1 .. m_T] with the padding masked.
  SRM        as SGRAF GraphReasoning (sgr_step 3, one module per step); our choice: a residual connection:
             A = softmax_row((M W_q)(M W_k)^T) (padded columns -inf), M <- M + ReLU((A M) W_r) (SGRAF: no "M +";
             without it the steps made all nodes identical and IRM's weights exactly uniform, measured).
             --srm transformer: 2 pre-LN encoder layers (4 heads, FFN 1024, dropout 0.1); --srm none: skipped.
  IRM        as SGRAF AttentionFiltration: beta_i = sigmoid(BN(w . m_i + b)), beta~_i = beta_i / sum_valid beta_k
             (padding exactly 0), z = norm2(sum_i beta~_i m_i).
  score      as SGRAF (model.py: sigmoid(sim_eval_w(z))): S_rel(a, b) = sigmoid(w_s . z + b_s) in (0, 1); our
             choice: SRM then IRM in sequence (--combine seq). IRM off: z = the global node after SRM (SGRAF's SGR
             read-out). --combine parallel (after SGRAF's SGR + SAF ensemble, which averages two separately trained
             models; here both read-outs share one model and train on the average):
             S_rel = (sigmoid(w_1 . M_0 after SRM) + sigmoid(w_2 . z of IRM on the unreasoned nodes)) / 2.
  baseline   --srm none --irm off is GLoRIA itself: scalar matchings cos(c_i, e_i) pooled by log-sum-exp,
             S_loc(a, b) = log sum_i exp(gamma2 cos(c_i, e_i)), gamma2 = 5 (gloria/loss/gloria_loss.py:local_loss).
Losses (reclf_loss; all B x B pairs; CE_rows = images -> reports, CE_cols = reports -> images; a mean over anchors):
  L_g    = CE_rows + CE_cols of cos(g_a, t_b) / 0.1                                   (as GLoRIA: the sum of both)
  L_rel  = CE_rows + CE_cols of S_rel(a, b) / 0.1                                      (our choice: InfoNCE, not
           SGRAF's hinge; a (0, 1) score over 0.1 gives logits in (0, 10), the positive half of GLoRIA's 10 cos)
  L      = L_g + L_rel;  --add-lse-local adds L_loc = CE_rows + CE_cols of 10 S_loc; the baseline is L_g + L_loc.
Scoring (zero-shot, retrieval): sim(a, b) = (cos(g_a, t_b) + S(a, b)) / 2, S = S_rel (S_loc for the baseline):
our choice, the training's local score. GLoRIA's get_similarities (gloria/gloria.py) averages the same way but its
zero-shot local score is gamma2 max_i cos(c_i, e_i) over its prompt columns, not the log-sum-exp; eval.json
reports it too (checks: auc_gloria_*; gloria_zero_shot_local).
Cost: the B x B all-pairs matching. For every pair, T x R attention and T contexts of D: 2 B^2 T R D
multiply-adds (1.3e11 at B 48, T 98, R 361, D 768), then B^2 graphs of T + 1 nodes. relation_matrix takes the
reports in chunks of --chunk and checkpoints each chunk (recomputed in the backward), as common.word_region_matrix
does, so the peak holds one chunk's B x chunk x T x (R + 4 D) activations. Measured (no GPU was available): the
all-pairs block alone at the paper's sizes (R 361, T 98, D 768, d_m 256, graph SRM + IRM, chunk 8), fp32 on CPU,
forward + backward, peak resident memory of the process 1.2 GB at 8 x 8 pairs and 1.7 GB at 16 x 16 pairs
(0.6 GB above the 8 x 8 run); the chunk term grows linearly with the number of images, so B = 48 should need about
3 x that term (~2-3 GB), which was not measured. The encoders (ResNet-50 at 299 px, BERT-base) come on top.
Under DDP the relation term needs the other ranks' local features: each rank scores its own images against all
gathered reports and its own reports against all gathered images (2 B x N B pairs); with DDP's gradient averaging
the loss and gradients equal one process on the full batch (tested).

Training (our choice, GLoRIA's recipe on MIMIC-CXR): Adam lr 5e-5 (relation modules 1e-4), weight decay 1e-6,
batch 48, <= 50 epochs, ReduceLROnPlateau on the validation loss (factor 0.5, patience 5) stepped every epoch,
early stopping (patience 10), gradient clipping 0.25, bf16 autocast where supported (losses fp32); 256-px cache,
random 224 crop, upsampled to 299. Where GLoRIA's code differs (gloria/builder.py, run.py, its config): Adam's
betas are (0.5, 0.999) there, torch's default (0.9, 0.999) here; its plateau scheduler is stepped once per
len(training set) optimizer steps, so it barely acts within 50 epochs; it trains in fp16. Training views reach
--image-size through the crop (data.crop_augment), or resized whole with --no-augment (data.train_view, every
method's rule). --batch-size is per process; --accum counts the whole job's
micro-batches per step (each of W processes does accum / W; the default 1 is one per process on any number of
processes).

Commands:
  python reclf.py                                                          # demo: synthetic data, CPU, minutes
  python reclf.py --preset paper --data mimic --data-root CACHE                                    # one GPU
  torchrun --nproc_per_node=4 reclf.py --preset paper --data mimic --data-root CACHE --batch-size 12
  torchrun --nproc_per_node=2 reclf.py --max-steps 5                       # DDP smoke test on CPU (gloo)
  python reclf.py --srm transformer | --srm none --irm off | --combine parallel | --add-lse-local   # ablations
  python reclf.py --resume --out-dir runs/reclf-XXXX                                   # continue a killed run
  python reclf.py --bench 20 [--preset paper --image-weights none --text-model bert-base]       # throughput
  CLAIMS=1 METHODS=reclf sh tests/compare.sh      # the ablation ladder GLoRIA -> +SRM -> +IRM -> +both, 3 seeds
CACHE is written once by `python data.py prepare-mimic ...`. The run folder (default runs/reclf-<time>) holds
args.json, metrics.csv, val.csv, ckpt.pt, best.pt, image_encoder.pt (the ResNet backbone; the 1x1 conv and Linear
heads are RECLF's and stay in ckpt.pt), text_encoder/, eval.json and viz/*.png.

Deviations / our choices (besides those marked above):
- Pre-training on MIMIC-CXR (frontal images, findings + impression sentences) instead of GLoRIA's CheXpert corpus.
- BN of IRM: the statistics are those of the valid nodes of each (image, report) graph, with BN's learned affine.
  SGRAF's BatchNorm1d(1) pools, in training, the nodes of one caption's pairs with every image of the batch
  (running statistics at test), which would make a pair's training score depend on which pairs share its chunk or
  its rank; per-graph statistics keep every score a function of its own pair (chunked == unchunked, DDP == one
  process) and training == evaluation.
- Zero-shot: CheXzero's pair prompts ("x" / "no x", common.zero_shot_auc_ci) instead of GLoRIA's prompt
  ensembles; retrieval Precision@K on the test pairs that show exactly one finding (the 5 x 200 sets' rule), that
  finding the class (unknown labels do not count).
- The demo preset (ResNet-18 from scratch at 128 px: 8 x 8 regions, a 2-layer BERT with the last 2 layers summed,
  the report vector the mean of its words (--text-pool mean: with [CLS] no term left log B in 125 steps), every
  real word a column (--word-columns words), the synthetic reports as written (--no-clean-text), 64-d matchings,
  batch 16, lr 1e-3, one epoch of 2,000 pairs, no augmentation) fits 2 CPU cores in a few minutes.
"""
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

import common
import data
from common import arg


@dataclass
class Args(common.RunArgs):
    """RECLF pre-training (defaults = the reconstruction's paper recipe; `--preset demo` without --data)."""
    # encoders (GLoRIA's)
    image_arch: str = arg("resnet50", "resnet50 | resnet18")
    image_weights: str = arg("imagenet", "imagenet | none | path to a state dict")
    image_size: int = arg(224, "training crop (the cache's 256-px squares, random 224 crop)")
    upsample: int = arg(299, "bilinear upsampling of the input before the ResNet (GLoRIA: 299; 0 = none)")
    text_model: str = arg("emilyalsentzer/Bio_ClinicalBERT", "name/path, or tiny | bert-base (random init, "
                          "vocabulary from the training reports)")
    text_layers: int = arg(4, "sum of the last k BERT hidden states (GLoRIA: 4)")
    max_length: int = arg(97, "word-piece tokens per report incl. [CLS]/[SEP] (GLoRIA's word_num)")
    clean_text: bool = arg(True, "GLoRIA's report text: lower-case \\w+ tokens, cut at --max-length mid-sentence "
                                 "(off: whole sentences while they fit)")
    text_pool: Literal["gloria", "cls", "mean"] = arg("gloria", "report vector: GLoRIA's (the mean over the "
                                                      "--max-length word slots), the [CLS] state, or the mean word")
    word_columns: Literal["gloria", "words"] = arg("gloria", "words of the local matching: GLoRIA's columns ([CLS] "
                                                   "first; an [UNK] drops the last word) or every real word")
    # RECLF
    match_dim: int = arg(256, "d_m of the matching vectors (SGRAF sim_dim)")
    srm: Literal["graph", "transformer", "none"] = arg("graph", "semantic-relation reasoning module")
    srm_steps: int = arg(3, "graph reasoning steps (SGRAF sgr_step)")
    irm: Literal["on", "off"] = arg("on", "importance-relation reasoning module")
    combine: Literal["seq", "parallel"] = arg("seq", "SRM then IRM | both read-outs averaged (after SGRAF's "
                                               "ensemble)")
    add_lse_local: bool = arg(False, "ablation: add GLoRIA's log-sum-exp local loss")
    gamma1: float = arg(4.0, "sharpening of the softmax over regions")
    gamma2: float = arg(5.0, "GLoRIA local score: log-sum-exp scale")
    gamma3: float = arg(10.0, "GLoRIA local loss: logit scale")
    tau_global: float = arg(0.1, "temperature of the global InfoNCE")
    tau_rel: float = arg(0.1, "temperature of the relation-score InfoNCE")
    chunk: int = arg(8, "reports per chunk of the all-pairs matching")
    # optimisation
    batch_size: int = arg(48, "batch per process (the relation term scores it against the whole job's)")
    accum: int = arg(1, "micro-batches per optimizer step, whole job: each of W processes does accum / W (1: one "
                        "per process, any W)")
    lr: float = arg(5e-5, "Adam learning rate of the encoders and their heads")
    lr_new: float = arg(1e-4, "Adam learning rate of the relation modules")
    weight_decay: float = arg(1e-6, "Adam weight decay")
    clip: float = arg(0.25, "max gradient norm")
    epochs: int = arg(50, "maximum epochs")
    lr_patience: int = arg(5, "ReduceLROnPlateau patience (epochs), factor 0.5")
    patience: int = arg(10, "early stopping: epochs without a validation-loss improvement")


PRESETS = {
    "paper": dict(data="mimic"),
    # 2 CPU cores, a few minutes including evaluation: small encoders from scratch, native 128 px, plain views.
    "demo": dict(data="synthetic", image_arch="resnet18", image_weights="none", image_size=128, upsample=0,
                 augment=False, text_model="tiny", text_layers=2, text_pool="mean", word_columns="words",
                 clean_text=False, max_length=96, match_dim=64,
                 batch_size=16, lr=1e-3, lr_new=1e-3, clip=1.0, epochs=1, train_samples=2000, eval_samples=500,
                 workers=0, chunk=16, ckpt_every=50, log_every=5),
}


# ==== METHOD: RECLF ====
# ---- local-matching vectors (SGRAF form) ----
def squared_difference(x, y):
    """(x^ - y^)^2 element-wise; its sum over the channels is 2 - 2 cos(x, y) (tested)."""
    return (F.normalize(x, dim=-1) - F.normalize(y, dim=-1)) ** 2


class GraphStep(nn.Module):
    """as SGRAF (model.py:GraphReasoning): one step of reasoning over the matching nodes, learned adjacency."""

    def __init__(self, d):
        super().__init__()
        self.query, self.key, self.out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, nodes, mask):
        """nodes N x K x d, mask N x K (True = valid) -> (new nodes N x K x d, adjacency A N x K x K)."""
        scores = self.query(nodes) @ self.key(nodes).transpose(1, 2)
        edges = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)  # padded columns get 0
        # our choice: a residual connection (SGRAF's step has none: M <- ReLU(A M W_r)). SGRAF reads out only the
        # global node after its steps, but IRM weighs every node: near-uniform rows of A (the learned scores start
        # small) make every node the mean of all, and without the residual 3 steps left the demo's nodes identical
        # (spread ~1e-9), so IRM's per-graph BN saw no differences and its weights stayed exactly 1/K (measured).
        # Residual steps are the usual remedy for over-smoothing in deep graph networks (Li et al., DeepGCNs, ICCV
        # 2019); the transformer SRM has them too.
        return nodes + F.relu(self.out(edges @ nodes)), edges


class IRM(nn.Module):
    """as SGRAF (model.py:AttentionFiltration): beta = sigmoid(BN(w . m + b)), L1-normalised over the valid nodes;
    z = norm2(sum beta~ m). our choice: BN statistics over each graph's valid nodes (module docstring)."""

    def __init__(self, d):
        super().__init__()
        self.logit = nn.Linear(d, 1)
        self.bn_weight, self.bn_bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

    def forward(self, nodes, mask):
        """nodes N x K x d, mask N x K -> (z N x d, weights beta~ N x K: sum 1 over valid nodes, padding 0)."""
        u, valid = self.logit(nodes).squeeze(-1), mask.to(nodes.dtype)
        n = valid.sum(-1, keepdim=True)
        mean = (u * valid).sum(-1, keepdim=True) / n
        var = ((u - mean) ** 2 * valid).sum(-1, keepdim=True) / n  # biased, as BatchNorm's training statistics
        beta = torch.sigmoid(self.bn_weight * (u - mean) / torch.sqrt(var + 1e-5) + self.bn_bias) * valid
        weights = beta / beta.sum(-1, keepdim=True)
        return F.normalize((weights[..., None] * nodes).sum(1), dim=-1), weights


class RelationHead(nn.Module):
    """Matching vectors, SRM, IRM and the relation score: forward(regions, img_g, words, word_mask, txt_g) -> S_rel
    for every image x report pair (I x C). The inputs: regions I x R x D, img_g I x D, words C x L x D, word_mask
    C x L, txt_g C x D."""

    def __init__(self, dim, match_dim=256, srm="graph", steps=3, irm="on", combine="seq", gamma1=4.0):
        super().__init__()
        if combine == "parallel" and (srm == "none" or irm == "off"):
            raise ValueError("--combine parallel ensembles SRM and IRM: it needs both (--srm graph|transformer "
                             "--irm on)")
        self.gamma1, self.srm_kind, self.combine = gamma1, srm, combine
        self.word_proj, self.global_proj = nn.Linear(dim, match_dim), nn.Linear(dim, match_dim)
        if srm == "graph":
            self.srm = nn.ModuleList(GraphStep(match_dim) for _ in range(steps))  # not shared across steps
        elif srm == "transformer":
            layer = nn.TransformerEncoderLayer(match_dim, 4, 1024, 0.1, batch_first=True, norm_first=True)
            self.srm = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.irm = IRM(match_dim) if irm == "on" else None
        self.score = nn.Linear(match_dim, 1)
        self.score_raw = nn.Linear(match_dim, 1) if combine == "parallel" else None
        for m in self.modules():  # as SGRAF (model.py:init_weights): uniform +-sqrt(6 / (in + out)), biases 0
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def nodes(self, regions, img_g, words, word_mask, txt_g):
        """-> matching nodes (I*C) x (1 + L) x d_m (the global node first), their mask, alpha I x C x L x R."""
        contexts, alpha = common.word_region_attention(regions[:, None], words[None], word_mask[None], self.gamma1)
        m_words = F.normalize(self.word_proj(squared_difference(words[None], contexts)), dim=-1)  # I x C x L x dm
        m_global = F.normalize(self.global_proj(squared_difference(img_g[:, None], txt_g[None])), dim=-1)
        nodes = torch.cat([m_global[:, :, None], m_words], 2).flatten(0, 1)
        mask = F.pad(word_mask, (1, 0), value=True)[None].expand(len(regions), -1, -1).flatten(0, 1)
        return nodes, mask, alpha

    def reason(self, nodes, mask):
        """SRM: -> refined nodes and the adjacency of every graph step (none for the transformer / no SRM)."""
        edges = []
        if self.srm_kind == "graph":
            for step in self.srm:
                nodes, A = step(nodes, mask)
                edges.append(A)
        elif self.srm_kind == "transformer":
            nodes = self.srm(nodes, src_key_padding_mask=~mask)
        return nodes, edges

    def relate(self, regions, img_g, words, word_mask, txt_g):
        """-> dict(score I x C, alpha I x C x L x R, edges [A (I*C) x K x K per step], weights (I*C) x K or None)."""
        nodes, mask, alpha = self.nodes(regions, img_g, words, word_mask, txt_g)
        refined, edges = self.reason(nodes, mask)
        weights = None
        if self.combine == "parallel":  # SGR read-out on the reasoned nodes, SAF on the unreasoned ones
            z, weights = self.irm(nodes, mask)
            score = (torch.sigmoid(self.score(refined[:, 0])) + torch.sigmoid(self.score_raw(z))) / 2
        else:
            z, weights = self.irm(refined, mask) if self.irm is not None else (refined[:, 0], None)
            score = torch.sigmoid(self.score(z))
        return dict(score=score.view(len(regions), len(words)), alpha=alpha, edges=edges, weights=weights)

    def forward(self, regions, img_g, words, word_mask, txt_g):
        return self.relate(regions, img_g, words, word_mask, txt_g)["score"]


def relation_matrix(head, regions, img_g, words, word_mask, txt_g, chunk=8, checkpoint_above=2**22):
    """S_rel[i, j] for every image i and report j (shapes as RelationHead) -> I x T, fp32, `chunk` reports at a time
    (common.report_chunks; big chunks checkpointed under autograd): the peak holds one chunk's I x chunk x L x
    (R + 4 D) activations instead of all of them. The values and gradients do not depend on the chunking (tested)."""
    regions, img_g, words, txt_g = map(common.fp32, (regions, img_g, words, txt_g))
    return common.report_chunks(head, (regions, img_g), words, word_mask, (txt_g,), chunk, checkpoint_above)


# ---- the loss: a pure function of tensors ----
def pair_ce(rows, cols, offset, scale):
    """rows B x N: own images vs all reports; cols N x B: all images vs own reports (the same matrix on one
    process) -> (CE_rows, CE_cols) of scale * score, positives at offset + arange(B)."""
    return common.contrastive_ce(scale * rows, scale * cols.T, offset)


def reclf_loss(global_rows, global_cols, rel_rows=None, rel_cols=None, lse_rows=None, lse_cols=None, *, offset=0,
               tau_global=0.1, tau_rel=0.1, gamma3=10.0):
    """RECLF's loss from its three pair scores: a dict of the terms (each direction apart) and their sum "loss",
        L = L_g + L_rel [+ L_loc],   L_g = CE_rows + CE_cols of cos(g_a, t_b) / tau_global,
        L_rel = CE_rows + CE_cols of S_rel(a, b) / tau_rel,   L_loc = CE_rows + CE_cols of gamma3 S_loc(a, b),
    CE_rows over the reports of each image, CE_cols over the images of each report, each a mean over its anchors;
    S_loc(a, b) = log sum_i exp(gamma2 cos(c_i, e_i)) is GLoRIA's local score (the baseline's local term, or the
    --add-lse-local ablation). A term is left out when its scores are None.

    Each score comes as rows B x N (this rank's images against every report of the job) and cols N x B (every image
    against this rank's reports), positives at offset + arange(B), offset = rank * B; on one process N = B, offset
    0 and both are the one B x B matrix. loss_scores computes them (the relation head's S_rel included) from the
    gathered features, so every term is a CE over own rows against all columns and own columns against all rows:
    with DDP's gradient averaging the loss and gradients equal the single-process full batch (tested)."""
    out = {}
    out["global_i2t"], out["global_t2i"] = pair_ce(global_rows, global_cols, offset, 1 / tau_global)
    if rel_rows is not None:
        out["rel_i2t"], out["rel_t2i"] = pair_ce(rel_rows, rel_cols, offset, 1 / tau_rel)
    if lse_rows is not None:
        out["lse_i2t"], out["lse_t2i"] = pair_ce(lse_rows, lse_cols, offset, gamma3)
    out["loss"] = sum(out.values())
    return out


def loss_scores(own, gathered=None, head=None, lse=False, gamma1=4.0, gamma2=5.0, chunk=8):
    """reclf_loss's scores, fp32, from the features regions, img_g, words, word_mask, txt_g of this rank (own) and
    of the whole job (gathered, common.gather_rows; None on one process, where the cols of S_rel and S_loc are the rows):
    the global cosine, S_rel of the RelationHead `head` (none without one) and S_loc (lse=True)."""
    regions, img_g, words, word_mask, txt_g = own
    R_all, g_all, E_all, M_all, t_all = gathered or own
    cos = lambda x, y: common.cosine(common.fp32(x)[:, None], common.fp32(y)[None])
    out = dict(global_rows=cos(img_g, t_all), global_cols=cos(g_all, txt_g))
    if head is not None:
        out["rel_rows"] = relation_matrix(head, regions, img_g, E_all, M_all, t_all, chunk)
        out["rel_cols"] = (out["rel_rows"] if gathered is None
                           else relation_matrix(head, R_all, g_all, words, word_mask, txt_g, chunk))
    if lse:
        out["lse_rows"] = common.word_region_matrix(regions, E_all, M_all, gamma1, gamma2, chunk)
        out["lse_cols"] = (out["lse_rows"] if gathered is None
                           else common.word_region_matrix(R_all, words, word_mask, gamma1, gamma2, chunk))
    return out


# ---- the model ----
class RECLF(nn.Module):
    """GLoRIA's encoders and projections, the relation modules; forward(batch) -> dict of loss terms."""

    def __init__(self, args, tokenizer):
        super().__init__()
        self.args = args
        self.image_encoder = common.ImageEncoder(args.image_arch, args.image_weights)
        self.text_encoder = common.TextEncoder(args.text_model, tokenizer)
        dim, channels = self.text_encoder.out_dim, self.image_encoder.stage_channels
        self.local_proj = nn.Conv2d(channels[3], dim, 1, bias=False)  # as GLoRIA: layer3 -> the sub-regions
        self.global_proj = nn.Linear(channels[4], dim)
        self.relation = None if args.srm == "none" and args.irm == "off" else RelationHead(
            dim, args.match_dim, args.srm, args.srm_steps, args.irm, args.combine, args.gamma1)
        if self.relation is None and args.add_lse_local:
            raise ValueError("--srm none --irm off already is GLoRIA's log-sum-exp local loss; drop --add-lse-local")
        for name, table in zip(("starts_word", "continues_word"), common.word_tables(tokenizer)):
            self.register_buffer(name, table, persistent=False)
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.register_buffer("bracket", torch.tensor([t.startswith("[") for t in tokens]), persistent=False)
        self.sep_id = tokenizer.sep_token_id

    def slots(self, input_ids):
        """GLoRIA's merged sequence: the slot of every token ([CLS], each word, [SEP]), B x L, -1 after [SEP]."""
        return common.merged_word_index(input_ids, self.continues_word, self.sep_id)

    def word_index(self, input_ids):
        """The word column of every token, B x L (-1: not in the local matching)."""
        if self.args.word_columns == "words":  # our choice: [CLS], [SEP], [UNK] and punctuation are not words
            return common.word_index(input_ids, self.starts_word, self.continues_word, input_ids.shape[1])
        # as GLoRIA (gloria_model.py:_calc_local_loss): the first 1 + (number of words not starting with "[")
        # slots, [CLS] first; an [UNK] keeps its column, so a report's last word drops out for each [UNK]
        index = self.slots(input_ids)
        opens = (index >= 0) & ~self.continues_word[input_ids]
        columns = (opens & ~self.bracket[input_ids]).sum(1, keepdim=True) + 1
        return torch.where(index < columns, index, -1)

    def image_features(self, images):
        """-> regions B x R x D (row-major layer3 grid), global B x D, grid (h, w)."""
        if self.args.upsample:
            images = F.interpolate(images, size=self.args.upsample, mode="bilinear", align_corners=True)  # GLoRIA
        maps = self.image_encoder.feature_maps(images)
        regions = self.local_proj(maps[3])
        return regions.flatten(2).transpose(1, 2), self.global_proj(maps[4].mean((2, 3))), tuple(regions.shape[2:])

    def text_features(self, batch):
        """-> words B x T x D, word mask B x T, report B x D (--text-pool)."""
        ids, attention = batch["input_ids"], batch["attention_mask"]
        states = self.text_encoder(ids, attention, sum_last=self.args.text_layers)
        words, mask = common.sum_pieces(states, self.word_index(ids))  # a report without a word: one empty word
        if self.args.text_pool == "gloria":  # as GLoRIA (text_model.py:forward): per layer the mean over the
            # word_num slots of the merged sequence (real slots summed, padding zero), summed over the layers;
            # the slots partition the tokens [CLS] .. [SEP], so that is their sum over the fixed slot count
            return words, mask, (states * attention[..., None]).sum(1) / self.args.max_length
        if self.args.text_pool == "cls":
            return words, mask, states[:, 0]
        # our choice (demo): a from-scratch 2-layer BERT's [CLS] state left the global InfoNCE at log B for all
        # 125 demo steps; the mean of the report's words gives the global term a signal from the first step
        weights = mask[..., None].to(words.dtype)
        return words, mask, (words * weights).sum(1) / weights.sum(1)

    def forward(self, batch):
        regions, img_g, _ = self.image_features(batch["images"])
        words, mask, txt_g = self.text_features(batch)
        own, gathered, offset = (regions, img_g, words, mask, txt_g), None, 0
        if common.distributed():  # the whole job's features; the words padded to its longest report (masked)
            own = (regions, img_g, *common.pad_to_longest_rank(words, mask), txt_g)
            *gathered, offset = common.gather_rows(*own)
        a = self.args
        with torch.autocast(regions.device.type, enabled=False):  # similarities and softmaxes in fp32
            scores = loss_scores(own, gathered, self.relation, self.relation is None or a.add_lse_local, a.gamma1,
                                 a.gamma2, a.chunk)  # the learned S_rel first: the loss is a function of tensors
            return reclf_loss(**scores, offset=offset, tau_global=a.tau_global, tau_rel=a.tau_rel, gamma3=a.gamma3)

    def encode_image(self, images):
        return F.normalize(common.fp32(self.image_features(images)[1]), dim=-1)

    def encode_text(self, batch):
        return F.normalize(common.fp32(self.text_features(batch)[2]), dim=-1)

    def score(self, images, batch):
        """B x B GLoRIA-'both' similarity (cos(g, t) + S) / 2 of every image and report."""
        return image_text_scores(self, images, batch)["both"]


# ==== TRAINING: evaluation, pictures, loop ====
def pad_cat(tensors, dim=1):
    """Concatenate batches along dim 0 after padding `dim` with zeros to the longest."""
    n = max(t.shape[dim] for t in tensors)
    return torch.cat([F.pad(t, [0, 0] * (t.dim() - dim - 1) + [0, n - t.shape[dim]]) for t in tensors])


@torch.no_grad()
def encode_split(model, loader, device):
    """Regions, image globals, words, word masks, report globals and finding labels of a split, on the device."""
    model.eval()
    parts = {k: [] for k in ("regions", "img_g", "words", "mask", "txt_g", "labels")}
    synthetic = False
    for batch in loader:
        b = common.to_device(batch, device)
        regions, img_g, _ = model.image_features(b["images"])
        words, mask, txt_g = model.text_features(b)
        synthetic = "masks" in batch
        labels = data.zero_shot_targets(batch)
        for k, v in zip(parts, (regions, img_g, words, mask, txt_g, labels.to(device))):
            parts[k].append(common.fp32(v) if v.is_floating_point() else v)
    return {k: pad_cat(v) if k in ("words", "mask") else torch.cat(v) for k, v in parts.items()}, synthetic


def pair_scores(model, img, txt):
    """(global cosine, local score S, both = their mean), each images x reports; S = S_rel, or GLoRIA's S_loc for
    the baseline. img: dict(regions, img_g), txt: dict(words, mask, txt_g), fp32."""
    a = model.args
    g = common.cosine(img["img_g"][:, None], txt["txt_g"][None])
    if model.relation is None:
        s = common.word_region_matrix(img["regions"], txt["words"], txt["mask"], a.gamma1, a.gamma2, a.chunk)
    else:
        s = relation_matrix(model.relation, img["regions"], img["img_g"], txt["words"], txt["mask"], txt["txt_g"],
                            a.chunk)
    return g, s, (g + s) / 2


def image_text_scores(model, images, batch):
    """The global, local and both scores (pair_scores) of images against a text batch (reports or prompts): the
    model's score, and common.external_zero_shot's."""
    regions, img_g, _ = model.image_features(images)
    words, mask, txt_g = model.text_features(batch)
    img = dict(regions=common.fp32(regions), img_g=common.fp32(img_g))
    txt = dict(words=common.fp32(words), mask=mask, txt_g=common.fp32(txt_g))
    return dict(zip(("global", "local", "both"), pair_scores(model, img, txt)))


def gloria_zero_shot_local(model, regions, prompts, texts, chunk=32):
    """GLoRIA's zero-shot local similarity (gloria_model.py:get_local_similarities), images x prompts: gamma2 times
    the largest cos(e, c) over the prompt's columns, c the word's image context (the training's attention). With
    --word-columns gloria the columns are GLoRIA's slice [1 : 1 + n] of the merged sequence zero-padded to
    --max-length slots, n the prompt's character count (process_text counts the characters of the string): the
    words, [SEP] and zero slots, whose cosine is 0. With --word-columns words: the prompt's words (our choice)."""
    a = model.args
    if a.word_columns == "gloria":
        ids = prompts["input_ids"]
        states = model.text_encoder(ids, prompts["attention_mask"], sum_last=a.text_layers)
        words = common.sum_pieces(states, model.slots(ids))[0]
        words = F.pad(words, (0, 0, 0, a.max_length - words.shape[1]))
        chars = torch.tensor([len(t) - t.count("[") for t in texts], device=words.device)
        position = torch.arange(a.max_length, device=words.device)
        columns = (position >= 1) & (position <= chars[:, None])
    else:
        words, columns, _ = model.text_features(prompts)
    words, out = common.fp32(words), []
    for s in range(0, len(regions), chunk):
        contexts, _ = common.word_region_attention(regions[s:s + chunk, None], words[None], columns[None], a.gamma1)
        cos = common.cosine(contexts, words[None]).masked_fill(~columns, float("-inf"))
        out.append(a.gamma2 * cos.amax(-1))
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, loader, tokenizer, device, n_boot=1000):
    """A model's eval.json entry (common.save_results), in fp32. zero_shot: AUC per finding and their mean with
    bootstrap 95 % CIs (pair prompts "x" / "no x") of the both score; checks: the mean AUC and CI of the global and
    local scores and of GLoRIA's zero-shot score (gloria: the global cosine averaged with gloria_zero_shot_local);
    retrieval: Recall@1/5/10 both ways over all test pairs with the global cosine (our choice: the relation score of
    every image against every report costs ~ N^2 graphs; the global cosine is the retrieval score LoVT, JoImTeRNet
    and PLACE report, so the suite's comparison table reads the same number) and image->text Precision@1/5/10 with
    the both score on the test pairs that show exactly one finding."""
    model.eval()
    test, synthetic = encode_split(model, loader, device)
    labels = test["labels"].cpu()
    names, phrases = data.zero_shot_findings(synthetic)
    texts = phrases + [f"no {p}" for p in phrases]
    # the prompts stay as written: they are lower-case words already, and GLoRIA's cleaning would drop a one-word one
    prompts = common.to_device(data.prompt_batch(texts, tokenizer), device)
    words, mask, txt_g = model.text_features(prompts)
    scores = [s.cpu() for s in pair_scores(model, test, dict(words=common.fp32(words), mask=mask,
                                                              txt_g=common.fp32(txt_g)))]
    gloria = (scores[0] + gloria_zero_shot_local(model, test["regions"], prompts, texts).cpu()) / 2
    checks, C = {}, len(names)
    for kind, s in zip(("global", "local", "gloria"), (scores[0], scores[1], gloria)):
        margin = (s[:, :C] - s[:, C:]).double()
        checks[f"auc_{kind}_mean"] = common.mean_auc(margin, labels)
        checks[f"auc_{kind}_low"], checks[f"auc_{kind}_high"] = common.bootstrap_ci(common.mean_auc, margin, labels,
                                                                                    n=n_boot)
    retrieval = common.retrieval(common.cosine(test["img_g"][:, None], test["txt_g"][None]).cpu())
    single = ((labels == 1).sum(1) == 1).nonzero().flatten()  # one finding: that finding is the class
    if len(single) > 10:
        idx = single.to(device)
        pick = lambda split, keys: {k: split[k][idx] for k in keys}
        _, _, both = pair_scores(model, pick(test, ("regions", "img_g")), pick(test, ("words", "mask", "txt_g")))
        classes = (labels[single] == 1).float().argmax(1)  # the one positive; argmax alone would pick a nan
        retrieval.update({f"i2t_{k}": v for k, v in common.precision_at_k(both.cpu(), classes, classes).items()})
    both = scores[2]
    zero_shot = common.zero_shot_summary(both[:, :C], both[:, C:], labels, names, n_boot)
    return dict(retrieval=retrieval, zero_shot=zero_shot, checks=checks)


FINDING_WORDS = set(data.SYNTH_FINDINGS) | {"opacity", "consolidation", "pleural", "heart", "enlarged", "nodule"}
LOCATION_WORDS = {"right", "left", "upper", "lower", "mid", "lobe", "zone", "base", "apex", "lung", "bilateral"}
FUNCTION_WORDS = {"the", "a", "an", "is", "are", "of", "and", "or", "in", "at", "with", "there", "to", "be", "this",
                  "which", "for", "on", "seen", "noted"}


@torch.no_grad()
def explain(model, batch, i, tokenizer):
    """For pair (image i, report i): its words (T), alpha T x R (word -> region), grid, SRM adjacencies [K x K] and
    IRM weights K (K = 1 + T nodes, the global one first)."""
    b = {k: v[i:i + 1] for k, v in batch.items()}
    regions, img_g, grid = model.image_features(b["images"])
    words, mask, txt_g = model.text_features(b)
    out = model.relation.relate(*map(common.fp32, (regions, img_g, words)), mask, common.fp32(txt_g))
    return dict(words=common.report_words(b["input_ids"][0], model.word_index(b["input_ids"])[0], tokenizer),
                alpha=out["alpha"][0, 0], grid=grid, edges=[A[0] for A in out["edges"]],
                weights=None if out["weights"] is None else out["weights"][0])


def irm_summary(model, batch, tokenizer):
    """Mean IRM weight x number of nodes (1 = uniform) of function, finding and location words in matched pairs."""
    seen = {"function": [], "finding": [], "location": []}
    for i in range(len(batch["images"])):
        ex = explain(model, batch, i, tokenizer)
        w = ex["weights"].cpu() * (len(ex["words"]) + 1)
        for k, word in enumerate(ex["words"]):
            for kind, vocab in (("function", FUNCTION_WORDS), ("finding", FINDING_WORDS),
                                ("location", LOCATION_WORDS)):
                if word in vocab:
                    seen[kind].append(float(w[k + 1]))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in seen.items()}


def draw_irm(words, weights, path):
    """Bars of the IRM weights beta~ over the nodes ([global], then the report's words)."""
    labels, w = ["[global]"] + words, weights.tolist()
    top = max(w)
    img = Image.new("RGB", (420, 14 * len(labels) + 24), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), "IRM weight (1/K = uniform, dashed)", fill="black")
    for k, (label, v) in enumerate(zip(labels, w)):
        y, v = 20 + 14 * k, v / top
        d.text((4, y), label[:16], fill="black")
        d.rectangle([110, y + 2, 110 + int(290 * v), y + 11], fill=(int(255 * v), 60, 200 - int(150 * v)))
    x = 110 + int(290 / len(w) / top)
    for y in range(20, 20 + 14 * len(labels), 6):
        d.line([x, y, x, y + 3], fill="gray")
    img.save(path)


def draw_relations(words, A, path, cell=12):
    """Word-labelled heat map of one SRM adjacency A (rows attend over columns)."""
    labels, K = ["[global]"] + words, len(A)
    margin = 100
    img = Image.new("RGB", (margin + cell * K + 4, margin + cell * K + 4), "white")
    d = ImageDraw.Draw(img)
    heat = (A / A.max()).cpu()
    for r in range(K):
        y = margin + cell * r
        d.text((2, y), labels[r][:15], fill="black")
        for c in range(K):
            x, v = margin + cell * c, float(heat[r, c])
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(255, int(255 * (1 - v)), int(255 * (1 - v))))
    top = Image.new("RGB", (margin, cell * K), "white")
    td = ImageDraw.Draw(top)
    for c in range(K):
        td.text((2, cell * c), labels[c][:15], fill="black")
    img.paste(top.rotate(90, expand=True), (margin, 0))
    img.save(path)


@torch.no_grad()
def write_viz(model, batch, tokenizer, folder, mean, std, n):
    """Per test pair: IRM weights over its words, the SRM adjacencies (graph SRM), word->region maps of its
    finding words overlaid on the image."""
    if model.relation is None:  # the baseline has no relation modules to picture
        return
    model.eval()
    os.makedirs(folder, exist_ok=True)
    for i in range(min(n, len(batch["images"]))):
        ex = explain(model, batch, i, tokenizer)
        words = ex["words"]
        if ex["weights"] is not None:
            draw_irm(words, ex["weights"], os.path.join(folder, f"pair{i}_irm.png"))
        for s, A in enumerate(ex["edges"]):
            draw_relations(words, A, os.path.join(folder, f"pair{i}_srm_step{s + 1}.png"))
        hits = [k for k, w in enumerate(words) if w in FINDING_WORDS][:4]
        gray = (batch["images"][i, 0] * std + mean).clamp(0, 1)
        if hits:
            common.save_panels([common.heat_overlay(gray, ex["alpha"][k].view(ex["grid"])) for k in hits],
                               [words[k] for k in hits], os.path.join(folder, f"pair{i}_words.png"))


def finish(args, model, tokenizer, test_loader, mean_std, device, out, external=None):
    """Once the best-validation model is exported: it next to the untrained one it started from (on the
    --zero-shot-csv set too, `external`), and the PNGs."""
    common.seed_everything(args.seed)
    initial = RECLF(args, tokenizer).to(device)  # the same initialisation the training started from
    models = (("untrained", initial), ("trained", model))
    results = {k: evaluate(m, test_loader, tokenizer, device, args.n_boot) for k, m in models}
    print(f"held-out {args.data} test split ({len(test_loader.dataset)} pairs):")
    if model.relation is not None and model.relation.irm is not None:  # the matched pairs of the first test batch
        batch = common.to_device(next(iter(test_loader)), device)
        for tag, m in models:
            results[tag]["checks"].update({f"irm_{k}_words": v for k, v in irm_summary(m, batch, tokenizer).items()})
        print("(irm_*_words: the mean IRM weight x nodes of function, finding and location words; 1 = uniform)")
    common.save_results(os.path.join(out, "eval.json"), results)
    common.score_external(out, external, dict(models), tokenizer, device, args, image_text_scores)
    if args.viz:
        write_viz(model, common.to_device(next(iter(test_loader)), device), tokenizer, os.path.join(out, "viz"),
                  *mean_std, args.viz)
    print(f"run folder: {out}")
    return results


def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv, default_preset="demo")
    if args.bench:
        args = common.bench_args(args, accum=1, ckpt_every=0)
    ddp = common.setup_distributed(args.device or None)
    dev, amp = ddp.device, common.amp_dtype(ddp.device, args.precision)
    micro_per_step = common.micro_batches_per_step(args.accum, ddp.world_size, args.batch_size)
    out = common.run_folder(args.out_dir, "reclf", ddp, args)
    train_set, val_set, test_set, (mean, std), tokenizer, external = common.datasets(args)
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = RECLF(args, tokenizer).to(dev)
    collate = partial(data.collate, tokenizer=tokenizer, max_length=args.max_length, clean=args.clean_text)
    sampler, loader, val_loader, test_loader = common.loaders(args, ddp, train_set, val_set, test_set, collate)
    augment = data.crop_augment(args.image_size, mean, std).to(dev) if args.augment else None
    n_micro = sampler.num_samples // args.batch_size
    steps_per_epoch = math.ceil(n_micro / micro_per_step)
    groups = [dict(params=[p for n, p in model.named_parameters() if not n.startswith("relation.")])]
    if model.relation is not None:  # our choice: the relation modules at their own learning rate
        groups.append(dict(params=list(model.relation.parameters()), lr=args.lr_new))
    optimizer = torch.optim.Adam(groups, args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=args.lr_patience)
    scaler = common.grad_scaler(dev, amp)
    run = common.TrainingRun(args, ddp, out, min(args.max_steps or math.inf, steps_per_epoch * args.epochs),
                             model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    state, net = run.progress, common.wrap_ddp(model, ddp)
    if ddp.is_main:
        print(f"RECLF ({args.srm} SRM, IRM {args.irm}{', + LSE local' if args.add_lse_local else ''}): "
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
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if run.stepped(lambda: {"lr": optimizer.param_groups[0]["lr"]}):
                break
        else:  # the epoch is complete: validation loss, plateau schedule, best checkpoint, early stopping
            val = common.validation_loss(model, val_loader, dev, amp)
            scheduler.step(val)
            run.end_epoch(val, model)
    run.export(model, lambda: common.export_encoders(out, model.image_encoder, model.text_encoder, tokenizer, mean,
                                                     std, args.image_size, "reclf", args))
    return run.evaluate(lambda: finish(args, model, tokenizer, test_loader, (mean, std), dev, out, external))

if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, data.BadRecord) as e:  # a NaN stop (check_finite) or bad training data: no traceback
        raise SystemExit(f"stopped: {e}")

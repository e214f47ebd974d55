"""PLACE: pathological-level cross-modal alignment and correlation exploration, in one file.

Paper: J. Wang, L. Zhu, X. Yu, A. Bhalerao, Y. He, "Improving Medical Visual Representation Learning with
Pathological-level Cross-Modal Alignment and Correlation Exploration", arXiv 2506.10573 (2025). No official code
was found. Only the abstract, the Fig. 1 caption and a third-party summary of the full text were available, so
everything below the encoders is a reconstruction on the MGCA code base the paper extends (HKU-MedAI/MGCA,
mgca/models/mgca/mgca_module.py). Each piece is marked where it is implemented: "paper:" (abstract / Fig. 1),
"third-party summary:" (a TL;DR that saw the full text), "as MGCA:" (checked in MGCA's code) or "our choice:".

Model. A ViT-B/16 gives the [CLS] feature g and 196 patch tokens P (as MGCA); a BERT gives the [CLS] report feature
t and word tokens W. as MGCA (the paper preset; mgca/models/backbones/encoder.py, mgca/configs/bert_config.json,
mgca/datasets/pretrain_dataset.py): the BERT is Bio_ClinicalBERT's first 6 layers (--bert-layers 6); the report is
cleaned to lower-case \\w+ tokens (punctuation dropped) and cut at 112 tokens mid-sentence (--clean-text); W is the
merged sequence after [CLS] (word pieces summed; [UNK] and [SEP] are words), padded to 111 slots, a report filling
all 112 tokens losing its last word and [SEP]; each word's TCA weight is the last layer's head-averaged [CLS]
attention, before dropout, of the token right of each of its pieces (--mgca-text). MGCA's BN-MLP heads
project g, t (and P, W per token) to 128-d. New modules:
  VPOE     K = 14 learnable pathology queries Q (K x d), 2 pre-LN decoder layers (self-attention among the queries,
           cross-attention to P, FFN) -> V-PORs V (K x d) -> Linear -> v_k (third-party summary: query tokens;
           our choice: K, depth, the layer)
  TPOE     the same architecture with the SAME query embeddings Q (separate decoder weights) over W, padding masked
           -> T-PORs -> u_k. Slot k of an image is paired with slot k of its report: no labels, no clustering
           (paper: annotation-free; our choice: the construction)
  CCE      target C* = the centred, L2-normalised patch-correlation matrix of the full view (N x N, stop-gradient);
           input: a random 50 % of the patches encoded MAE-style by the same ViT; predictor: visible tokens and
           mask tokens at their places + 2-D sin-cos positions, 2 decoder layers whose cross-attention reads the
           report words W, Linear(d -> 256) -> z; C^ = corr(z) (third-party summary: patch covariance predicted
           conditioned on the report; our choice: everything else)
Losses (cos-similarities of L2-normalised vectors, CE = mean cross-entropy over rows):
  ITA   S_ij = g_i . t_j / 0.07;  L_ITA = CE(S) + CE(S^T)      (as MGCA; our choice: negatives of every rank)
  TCA   MGCA's token-wise alignment within each pair (word <-> patch attention at 0.1, importance weights)
  PCMA  inter: l^k_ab = v_ak . u_bk / 0.1;  L_inter = (1/K) sum_k (CE(l^k) + CE(l^k^T)) / 2       (gathered)
        intra: l^a_kk' = v_ak . u_ak' / 0.1; L_intra = (1/B) sum_a (CE(l^a) + CE(l^a^T)) / 2
  CCE   L_CCE = (1/N^2) sum_ij (C^_ij - C*_ij)^2;  --cce-loss kl: row-wise KL(softmax(C*/0.05) || softmax(C^/0.1))
  total L = L_ITA + L_TCA + (L_inter + L_intra) + L_CCE   (MGCA's prototype term CPA is replaced by PCMA; our
        choice: the plain sum, where MGCA weighs ITA, its local term and CPA 1, 0.7 and 0.5); all of it is one
        pure function of the model's tensors, place_loss
Training (our choice on MGCA's defaults): AdamW (0.9, 0.999), wd 0.05, lr 2e-5 for the encoders (--lr) and 1e-4 for
the new modules and heads (--lr-new), linear warm-up over 40 % of the steps then cosine to 1e-8, 50 epochs, batch 144,
early stopping (patience 5) on the validation loss, seed 12345 (the suite's). As MGCA
(mgca/datasets/transforms.py:DataTransforms) the training view is randomly cropped, 224 of the 256-px square
(data.crop_augment); --no-augment (the demo) resizes it whole to --image-size (data.train_view, every method's rule).
--batch-size is per process; --accum counts the whole job's micro-batches per step (each of W processes does
accum / W; the default 1 is one per process on any number of processes).

Commands:
  python place.py                                              # demo: tiny ViT, synthetic data, minutes on 2 CPUs
  python place.py --preset paper --data mimic --data-root CACHE                          # ViT-B/16, one GPU
  torchrun --nproc_per_node=2 place.py --preset paper --data mimic --data-root CACHE --batch-size 72
  python place.py --preset paper-r50 --data mimic --data-root CACHE   # ResNet-50 for detection (no CCE)
  python place.py --resume --out-dir runs/place-XXXX                   # continue a killed run
  python place.py --bench 20                                           # images/s
The run folder (default runs/place-<time>) holds args.json, metrics.csv (with the PCMA slot accuracies), val.csv,
ckpt.pt, best.pt, image_encoder.pt, text_encoder/, eval.json and viz/ (per-slot V-POR maps with each slot's
T-POR words, CCE target vs prediction).

Deviations / our choices:
- our choice: the queries live in d = the text width (768 for both ViT-B and BERT); cross-attention reads
  memories of any width (kdim/vdim), so a ResNet's 2048-d regions need no extra projection.
- our choice: with a ResNet (--image-arch resnet50, for MGCA's detection protocol) CCE is off (--no-cce is
  required): a CNN cannot encode only the visible patches. TCA then weights the regions uniformly (as MGCA does
  for its ResNet).
- our choice: the report-conditioning check zeroes the word tokens the CCE predictor reads (the padding mask is
  kept) and compares L_CCE on the test split with the same masks.
- our choice (--preset paper-r50): the ResNet-50's regions are layer4 at the input size (7 x 7 at 224), the
  encoder interface every method exports; MGCA's ResNet branch upsamples to 299 and reads layer3 (19 x 19). The
  variant exists for the detection protocol, which fine-tunes the whole exported backbone.
- as MGCA: MGCA trains in fp32; here bf16 autocast where supported, fp32 on CPU; losses in fp32.
- our choice (--no-mgca-text): a report with no word (every token [UNK]: real text against a vocabulary of other
  reports) keeps one empty word, a zero vector with weight 0 (common.sum_pieces), so TPOE's attention and TCA are
  defined (not nan).
- our choice: the demo preset (tiny ViT at 128 px, 2-layer BERT from scratch, one lr for everything) trades the
  recipe for a 2-core CPU budget; it also takes the report feature t as the mean of the word tokens
  (--text-pool mean; default cls, as MGCA), as the RECLF and LRCLR demos do, and its words are the report's own
  (--no-mgca-text: [CLS], [SEP], [UNK] and padding are not words; a word's weight is the attention of its own
  pieces), as written (--no-clean-text: whole sentences while they fit, punctuation marks are words).
"""
import math
import os
import textwrap
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

import common
import data
from common import arg


@dataclass
class Args(common.RunArgs):
    """PLACE pre-training (defaults = the reconstruction's paper recipe; `--preset demo` without --data)."""
    # encoders and heads
    image_arch: str = arg("vit_b16", "vit_b16 | resnet50 (detection; needs --no-cce) | vit_tiny | resnet18")
    image_weights: str = arg("imagenet", "imagenet (DeiT-B / torchvision) | none | path to a state dict")
    image_size: int = arg(224, "input size (14 x 14 patches at 224)")
    text_model: str = arg("emilyalsentzer/Bio_ClinicalBERT", "name/path, or tiny | bert-base (random init, "
                          "vocabulary from the training reports)")
    text_width: int = arg(128, "hidden size of the tiny BERT (= the query width d in the demo)")
    bert_layers: int = arg(6, "BERT layers (MGCA: Bio_ClinicalBERT's first 6, its bert_config.json; 0 = all)")
    max_length: int = arg(112, "token limit of a report incl. [CLS]/[SEP] (as MGCA)")
    clean_text: bool = arg(True, "MGCA's report text: lower-case \\w+ tokens, cut at --max-length mid-sentence "
                                 "(off: whole sentences while they fit)")
    mgca_text: bool = arg(True, "MGCA's words exactly: [UNK] and [SEP] words, max_length - 1 slots, the weights "
                                "off by one (off: the report's words, our choice)")
    text_pool: Literal["cls", "mean"] = arg("cls", "global report feature t: the [CLS] state (as MGCA) or the mean "
                                            "of the word tokens")
    emb_dim: int = arg(128, "output of MGCA's heads, the V-POR / T-POR projections")
    head_hidden: int = arg(2048, "hidden width of MGCA's BN-MLP heads")
    # new modules
    num_queries: int = arg(14, "K pathology queries")
    decoder_layers: int = arg(2, "layers of the VPOE, the textual extractor and the CCE predictor")
    decoder_heads: int = arg(12, "attention heads of those decoders")
    decoder_ffn: int = arg(3072, "FFN width of those decoders")
    dropout: float = arg(0.1, "dropout of those decoders")
    cce_dim: int = arg(256, "output width of the CCE predictor")
    mask_ratio: float = arg(0.5, "CCE: fraction of the patches hidden from the masked view")
    cce_loss: Literal["mse", "kl"] = arg("mse", "CCE loss: mse, or row-wise KL of the softmaxed matrices")
    tau_ita: float = arg(0.07, "ITA temperature")
    tau_tca: float = arg(0.1, "TCA temperature")
    tau_pcma: float = arg(0.1, "PCMA temperature")
    ita: bool = arg(True, "L_ITA in the total (--no-ita: ablation)")
    tca: bool = arg(True, "L_TCA in the total (--no-tca: ablation)")
    pcma: bool = arg(True, "L_PCMA in the total (--no-pcma: ablation)")
    cce: bool = arg(True, "L_CCE in the total (--no-cce: ablation; required with a ResNet)")
    weight_ita: float = arg(1.0, "weight of L_ITA in the total (our choice: the plain sum)")
    weight_tca: float = arg(1.0, "weight of L_TCA in the total")
    weight_pcma: float = arg(1.0, "weight of L_PCMA in the total")
    weight_cce: float = arg(1.0, "weight of L_CCE in the total")
    # optimisation
    batch_size: int = arg(144, "micro-batch per process (negatives and BN statistics)")
    accum: int = arg(1, "micro-batches per optimizer step, whole job: each of W processes does accum / W (1: one "
                        "per process, any W)")
    lr: float = arg(2e-5, "AdamW lr of the image and text encoders")
    lr_new: float = arg(1e-4, "AdamW lr of the queries, decoders, CCE predictor and heads")
    weight_decay: float = arg(0.05, "AdamW weight decay")
    warmup: float = arg(0.4, "linear warm-up over this fraction of the steps, then cosine")
    min_lr: float = arg(1e-8, "end of the cosine")
    epochs: int = arg(50, "maximum epochs")
    patience: int = arg(5, "early stopping: epochs without a validation-loss improvement > 1e-5")


PRESETS = {
    "paper": dict(data="mimic"),
    "paper-r50": dict(data="mimic", image_arch="resnet50", cce=False),
    # 2 CPU cores, ~2.5 minutes: tiny ViT and BERT from scratch at one lr, almost no warm-up, t = the mean word,
    # 3 passes over 2,000 pairs (one pass left ITA near chance while the other terms learnt)
    "demo": dict(data="synthetic", image_arch="vit_tiny", image_weights="none", image_size=128, augment=False,
                 text_model="tiny", bert_layers=2, text_pool="mean", clean_text=False, mgca_text=False,
                 head_hidden=256, decoder_heads=4, decoder_ffn=256, cce_dim=64,
                 batch_size=32, lr=1e-3, lr_new=1e-3, weight_decay=1e-4, warmup=0.05, epochs=3,
                 train_samples=2000, eval_samples=300, workers=0, ckpt_every=50, log_every=5),
}


# ==== METHOD: PLACE ====
# ---- shared layer: a pre-LN Transformer decoder layer that returns its cross-attention ----
class DecoderLayer(nn.Module):
    """x += SA(LN x); x, attn = x + CA(LN x, memory); x += FFN(LN x). memory may have another width (kdim/vdim).
    Returns the cross-attention probabilities averaged over heads (B x Q x M): the slot maps."""

    def __init__(self, d, memory_dim, heads, ffn, dropout):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout, batch_first=True, kdim=memory_dim,
                                                vdim=memory_dim)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, memory_pad=None):
        """x B x Q x d, memory B x M x C, memory_pad B x M bool (True = padding) or None."""
        h = self.norm_self(x)
        x = x + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        h, attn = self.cross_attn(self.norm_cross(x), memory, memory, key_padding_mask=memory_pad)
        x = x + self.drop(h)
        return x + self.drop(self.ffn(self.norm_ffn(x))), attn


class ObservationExtractor(nn.Module):
    """VPOE (memory = patch tokens) or the textual extractor (memory = word tokens): the K shared queries through
    `layers` decoder layers, a final LayerNorm and Linear(d -> emb_dim). -> (PORs B x K x emb_dim, unnormalised;
    the last layer's cross-attention B x K x M)."""

    def __init__(self, d, memory_dim, emb_dim, layers, heads, ffn, dropout):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(d, memory_dim, heads, ffn, dropout) for _ in range(layers))
        self.norm, self.project = nn.LayerNorm(d), nn.Linear(d, emb_dim)

    def forward(self, queries, memory, memory_pad=None):
        x = queries.expand(len(memory), -1, -1)
        for layer in self.layers:
            x, attn = layer(x, memory, memory_pad)
        return self.project(self.norm(x)), attn


# ---- the losses: pure functions of tensors ----
def ita_loss(image_emb, text_emb, image_all, text_all, offset=0, tau=0.07):
    """MGCA's image-text alignment (Wang et al. 2022, Eq. 2; HKU-MedAI/MGCA:mgca/models/mgca/mgca_module.py:
    MGCA.forward) with the negatives of every process (our choice; MGCA: the local batch). image_emb, text_emb B x E:
    this process's head outputs; image_all, text_all: every process's, in rank order (in one process the same
    tensors); offset: this process's first row in them. All L2-normalised here, in fp32; i: own rows, j: all rows:
        S_ij = g_i . t_j / tau,   S'_ij = t_i . g_j / tau,   L_ITA = CE(S) + CE(S')   (row i's target: i + offset)
    Under DDP, with DDP's gradient averaging, the loss and gradients equal one process on the full batch (tested)."""
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    g, t = F.normalize(image_emb.to(dtype), dim=-1), F.normalize(text_emb.to(dtype), dim=-1)
    # one process passes the rows themselves as the columns: normalised once
    g_all = g if image_all is image_emb else F.normalize(image_all.to(dtype), dim=-1)
    t_all = t if text_all is text_emb else F.normalize(text_all.to(dtype), dim=-1)
    i2t, t2i = common.contrastive_ce(g @ t_all.T / tau, t @ g_all.T / tau, offset)
    return i2t + t2i


def pcma_loss(v, u, v_all=None, u_all=None, offset=0, tau=0.1):
    """Pathological-level cross-modal alignment. v, u: B x K x D V-PORs / T-PORs of this rank's pairs (normalised
    here, fp32); v_all, u_all: the gathered (world * B) x K x D ones (None = this batch; no DDP); offset: this rank's
    first row in them. -> (L_inter, L_intra, intra_acc, inter_acc), scalars, the accuracies detached.

      inter (per slot k, across samples):  l^k_ab = v_ak . u_bk / tau,
            L_inter = (1/K) sum_k (CE_rows(l^k) + CE_cols(l^k)) / 2      (rank r: its rows vs all columns, both ways)
      intra (per sample a, across slots):  l^a_kk' = v_ak . u_ak' / tau,
            L_intra = (1/B) sum_a (CE_rows(l^a) + CE_cols(l^a)) / 2      (needs no gather)
    Under DDP with gathered v_all / u_all and DDP's gradient averaging, the loss and gradients equal one process
    on the full batch (tested). intra_acc: share of (a, k) whose v_ak is closest to u_ak among a's slots (chance
    1/K); inter_acc: share of (a, k) whose v_ak retrieves u_ak among all samples' slot k."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    v, u = F.normalize(v.to(dtype), dim=-1), F.normalize(u.to(dtype), dim=-1)
    v_all = v if v_all is None else F.normalize(v_all.to(dtype), dim=-1)
    u_all = u if u_all is None else F.normalize(u_all.to(dtype), dim=-1)
    B, K = v.shape[:2]
    labels = (torch.arange(B, device=v.device) + offset).repeat(K)  # row (k, b) -> column b + offset
    v2u = torch.einsum("bkd,nkd->kbn", v, u_all) / tau  # K x B x NB
    u2v = torch.einsum("bkd,nkd->kbn", u, v_all) / tau
    inter = (F.cross_entropy(v2u.flatten(0, 1), labels) + F.cross_entropy(u2v.flatten(0, 1), labels)) / 2
    slots = torch.arange(K, device=v.device).repeat(B)
    within = v @ u.transpose(1, 2) / tau  # B x K x K
    intra = (F.cross_entropy(within.flatten(0, 1), slots)
             + F.cross_entropy(within.transpose(1, 2).flatten(0, 1), slots)) / 2
    intra_acc = (within.argmax(-1).flatten() == slots).to(dtype).mean().detach()
    inter_acc = (v2u.argmax(-1).flatten() == labels).to(dtype).mean().detach()
    return inter, intra, intra_acc, inter_acc


def patch_correlation(tokens):
    """B x N x C -> B x N x N correlation over patches (fp32): centre each channel across the N patches,
    L2-normalise each patch vector, Gram matrix. Symmetric, unit diagonal, entries in [-1, 1]."""
    t = common.fp32(tokens)
    t = F.normalize(t - t.mean(1, keepdim=True), dim=-1)
    return t @ t.transpose(1, 2)


def cce_loss(predicted, target, kind="mse", tau_target=0.05, tau_pred=0.1):
    """predicted C^, target C* (B x N x N, the target already detached).
    mse: (1/N^2) sum_ij (C^_ij - C*_ij)^2, averaged over the batch.
    kl:  (1/N) sum_i KL(softmax_j(C*_ij / tau_target) || softmax_j(C^_ij / tau_pred)), averaged over the batch."""
    predicted, target = common.fp32(predicted), common.fp32(target)
    if kind == "mse":
        return (predicted - target).pow(2).mean()
    log_p = F.log_softmax(target / tau_target, -1)
    return (log_p.exp() * (log_p - F.log_softmax(predicted / tau_pred, -1))).sum(-1).mean()


def place_loss(image_emb, text_emb, patch_emb, word_emb, word_mask, word_weights, patch_weights, v, u,
               gathered=None, offset=0, cce_tokens=None, *, tau_ita=0.07, tau_tca=0.1, tau_pcma=0.1, cce_kind="mse",
               weights=None):
    """PLACE's objective on one process's B pairs, every input a tensor the model computed:
        L = w_ita L_ITA + w_tca (L_TCA,word + L_TCA,patch) + w_pcma (L_inter + L_intra) + w_cce L_CCE
    ITA (ita_loss): image_emb, text_emb B x E, the global heads' outputs.
    TCA (common.mgca_tca, as MGCA): patch_emb B x N x E, word_emb B x T x E (the local heads' outputs), word_mask
        B x T (bool), word_weights B x T and patch_weights B x N (the [CLS] attentions; None: uniform, a ResNet).
    PCMA (pcma_loss): v, u B x K x E', the V-PORs and T-PORs.
    gathered: (image_emb, text_emb, v, u) of every process in rank order (all-gathered with gradient by the caller;
        None: one process) and offset: this process's first row in them; ITA and L_inter take their negatives there.
    CCE (cce_loss): cce_tokens = (z, P): the predictor's output from the masked view (B x N x C') and the full
        view's patch tokens (B x N x C); C^ = corr(z), C* = corr(stop-gradient P) (patch_correlation); None: no CCE.
    weights: {"ita", "tca", "pcma", "cce"} -> w (default 1; 0 ablates a term, which is still computed and logged).
    -> dict(loss, ita, tca_word, tca_patch, pcma_inter, pcma_intra[, cce], pcma_intra_acc, pcma_inter_acc): the
    terms unweighted, the accuracies detached."""
    image_all, text_all, v_all, u_all = gathered or (image_emb, text_emb, v, u)
    terms = dict(ita=ita_loss(image_emb, text_emb, image_all, text_all, offset, tau_ita))
    terms["tca_word"], terms["tca_patch"] = common.mgca_tca(patch_emb, word_emb, word_mask, word_weights,
                                                            patch_weights, tau_tca)
    terms["pcma_inter"], terms["pcma_intra"], intra_acc, inter_acc = pcma_loss(v, u, v_all, u_all, offset, tau_pcma)
    if cce_tokens is not None:
        z, patches = cce_tokens
        terms["cce"] = cce_loss(patch_correlation(z), patch_correlation(patches.detach()), cce_kind)
    weights = weights or {}
    loss = sum(weights.get(k.split("_")[0], 1.0) * t for k, t in terms.items())
    return dict(loss=loss, **terms, pcma_intra_acc=intra_acc, pcma_inter_acc=inter_acc)


# ---- CCE's masked view and predictor ----
def random_keep_index(batch, num_patches, mask_ratio, generator=None, device=None):
    """B x round((1 - mask_ratio) N) indices of the visible patches, a uniform random subset per image, sorted."""
    keep = round((1 - mask_ratio) * num_patches)
    if not 0 < keep <= num_patches:
        raise ValueError(f"mask ratio {mask_ratio} leaves {keep} of {num_patches} patches visible")
    noise = torch.rand(batch, num_patches, generator=generator)
    return noise.argsort(1)[:, :keep].sort(1).values.to(device)


def sincos_2d(h, w, dim):
    """MAE's fixed 2-D sin-cos positional embedding (facebookresearch/mae:util/pos_embed.py): half the channels
    encode the row, half the column, each as sin/cos of geometric frequencies. -> (h * w) x dim, row-major."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    parts = [f(pos.flatten()[:, None] * omega) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1)


class CCEPredictor(nn.Module):
    """The masked view's visible tokens (B x V x d) at their places, a shared learnable mask token elsewhere, plus
    2-D sin-cos positions; `layers` decoder layers whose cross-attention reads the report words; LayerNorm and
    Linear(d -> out_dim). -> z: B x N x out_dim (C^ = patch_correlation(z))."""

    def __init__(self, d, text_dim, out_dim, layers, heads, ffn, dropout):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(d, text_dim, heads, ffn, dropout) for _ in range(layers))
        self.norm, self.project = nn.LayerNorm(d), nn.Linear(d, out_dim)

    def forward(self, visible, keep_index, grid, words, word_pad):
        B, _, d = visible.shape
        x = self.mask_token.to(visible.dtype).expand(B, grid[0] * grid[1], d)
        x = x.scatter(1, keep_index[..., None].expand(-1, -1, d), visible)
        x = x + sincos_2d(*grid, d).to(x)
        for layer in self.layers:
            x, _ = layer(x, words, word_pad)
        return self.project(self.norm(x))


# ---- the model ----
class PLACE(nn.Module):
    """Image and text encoders, MGCA's heads, the K shared pathology queries, VPOE, the textual extractor and (ViT)
    the CCE predictor. forward(batch) -> place_loss's dict: `loss` (weighted total), every term unweighted and the
    PCMA accuracies."""

    def __init__(self, args, tokenizer):
        super().__init__()
        self.args, vit = args, args.image_arch.startswith("vit")
        if not vit and args.cce:  # our choice: CCE only with the ViT
            raise SystemExit(f"CCE encodes only the visible patches, which needs a ViT: with --image-arch "
                             f"{args.image_arch} pass --no-cce (as --preset paper-r50 does)")
        self.image_encoder = common.ImageEncoder(args.image_arch, args.image_weights,
                                                 config=dict(image_size=args.image_size) if vit else None)
        self.text_encoder = common.TextEncoder(args.text_model, tokenizer, hidden_size=args.text_width,
                                               num_layers=args.bert_layers or None,
                                               num_heads=max(1, args.text_width // 32))
        ci, ct, e, h = self.image_encoder.out_dim, self.text_encoder.out_dim, args.emb_dim, args.head_hidden
        self.global_image, self.global_text, self.local_image, self.local_text = (
            common.mgca_head(c, e, h) for c in (ci, ct, ci, ct))  # as MGCA
        for name, table in zip(("starts_word", "continues_word"), common.word_tables(tokenizer, punctuation=True)):
            self.register_buffer(name, table, persistent=False)
        self.sep_id = tokenizer.sep_token_id
        decoder = (args.decoder_layers, args.decoder_heads, args.decoder_ffn, args.dropout)
        # third-party summary: pathology query tokens; our choice: N(0, 0.02^2), shared by both extractors
        self.queries = nn.Parameter(torch.randn(args.num_queries, ct) * 0.02)
        self.vpoe = ObservationExtractor(ct, ci, e, *decoder)
        self.tpoe = ObservationExtractor(ct, ct, e, *decoder)
        self.cce = CCEPredictor(ci, ct, args.cce_dim, *decoder) if vit else None

    def word_index(self, input_ids):
        """The word of every token, B x L (-1: not a word)."""
        if not self.args.mgca_text:  # our choice: [CLS], [SEP], [UNK] and padding are not words
            return common.word_index(input_ids, self.starts_word, self.continues_word, input_ids.shape[1])
        # as MGCA (encoder.py:BertEncoder.aggregate_tokens): the merged sequence after [CLS], [UNK] and [SEP]
        # words; it reads the first max_length - 1 tokens only
        index = common.merged_word_index(input_ids, self.continues_word, self.sep_id, self.args.max_length - 1)
        return torch.where(index > 0, index - 1, -1)

    def text_features(self, batch):
        """-> report feature B x C ([CLS]; --text-pool mean: the mean word), words B x T x C (as MGCA: the sum of
        their pieces' last-layer states), word mask B x T (bool), word weights B x T (as MGCA: the last layer's
        head-averaged [CLS] attention before dropout, summed over the word's pieces; --mgca-text: each piece
        takes the attention of the token to its right, as MGCA's zip of the 112 tokens with the attention to
        tokens 1 .. 111 does, and the words are padded to max_length - 1 slots)."""
        ids, attention = batch["input_ids"], batch["attention_mask"]
        out = self.text_encoder.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        tokens, index = out.last_hidden_state, self.word_index(ids)
        words, mask = common.sum_pieces(tokens, index)
        with torch.no_grad():
            cls_attn = common.last_layer_cls_attention(self.text_encoder.bert, out.hidden_states[-2], attention)
        if self.args.mgca_text:
            cls_attn = F.pad(cls_attn[:, 1:], (0, 1))
        weights = common.sum_pieces(cls_attn.float()[..., None], index)[0][..., 0] * mask
        if self.args.mgca_text:  # MGCA pads every report to 111 word slots: more [PAD] negatives, BN rows
            pad = self.args.max_length - 1 - words.shape[1]
            words, mask, weights = F.pad(words, (0, 0, 0, pad)), F.pad(mask, (0, pad)), F.pad(weights, (0, pad))
        if self.args.text_pool == "cls":
            return tokens[:, 0], words, mask, weights
        # our choice (demo): the mean of the report's words feeds the global term from the first step, where a
        # from-scratch 2-layer BERT's [CLS] state has yet to learn to summarise (the RECLF and LRCLR demos' fix)
        m = mask[..., None].to(words.dtype)
        return (words * m).sum(1) / m.sum(1).clamp_min(1), words, mask, weights

    def keep_index(self, images, generator=None):
        """The masked view's visible patches (B x V), or None without CCE (a ResNet)."""
        if self.cce is None:
            return None
        return random_keep_index(len(images), self.image_encoder.num_patches(images.shape[-1]), self.args.mask_ratio,
                                 generator, images.device)

    def cce_prediction(self, images, keep_index, grid, words, mask, zero_report=False):
        """CCE's z (B x N x cce_dim): the masked view's visible patches alone through the same ViT (MAE-style), the
        predictor reading the report words (zeroed: zero_report, the conditioning check)."""
        visible = self.image_encoder.encode_visible(images, keep_index)  # B x V x C
        return self.cce(visible, keep_index, grid, torch.zeros_like(words) if zero_report else words, ~mask)

    def forward(self, batch, keep_index=None, zero_report=False):
        """keep_index: the masked view's visible patches (default: drawn); zero_report: CCE reads zeroed words."""
        a = self.args
        img = self.image_encoder(batch["images"])  # a ViT's cls_attn: MGCA's patch weights (a ResNet has none)
        report, words, mask, word_weights = self.text_features(batch)
        g, t = self.global_image(img["global_feat"]), self.global_text(report)
        patches, word_emb = self.local_image(img["local_feats"]), self.local_text(words)
        v, u = self.vpoe(self.queries, img["local_feats"])[0], self.tpoe(self.queries, words, ~mask)[0]
        cce_tokens = None
        if self.cce is not None:
            keep_index = self.keep_index(batch["images"]) if keep_index is None else keep_index
            z = self.cce_prediction(batch["images"], keep_index, img["grid"], words, mask, zero_report)
            cce_tokens = (z, img["local_feats"])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        gathered = tuple(common.gather_with_grad(x) for x in (g, t, v, u))  # every rank's rows, with gradient
        # ablations zero a weight; every term is still computed (logged, and DDP sees every parameter used)
        weights = {k: getattr(a, "weight_" + k) if getattr(a, k) else 0.0 for k in ("ita", "tca", "pcma", "cce")}
        return place_loss(g, t, patches, word_emb, mask, word_weights, img.get("cls_attn"), v, u, gathered,
                          rank * len(v), cce_tokens, tau_ita=a.tau_ita, tau_tca=a.tau_tca, tau_pcma=a.tau_pcma,
                          cce_kind=a.cce_loss, weights=weights)

    def cce_matrices(self, batch, keep_index):
        """-> (target C* = corr of the full view's patch tokens, prediction C^ from the masked view), B x N x N."""
        img = self.image_encoder(batch["images"])
        _, words, mask, _ = self.text_features(batch)
        z = self.cce_prediction(batch["images"], keep_index, img["grid"], words, mask)
        return patch_correlation(img["local_feats"].detach()), patch_correlation(z)

    def encode_image(self, images):
        """-> B x 128 L2-normalised global image embeddings."""
        return F.normalize(self.global_image(self.image_encoder(images)["global_feat"]).float(), dim=-1)

    def encode_text(self, batch):
        """-> B x 128 L2-normalised global report embeddings."""
        return F.normalize(self.global_text(self.text_features(batch)[0]).float(), dim=-1)

    def slot_maps(self, batch, tokenizer=None):
        """-> V-POR attention B x K x N (last VPOE layer, head-averaged), T-POR attention B x K x T, the patch grid,
        and (with a tokenizer) each report's words."""
        img = self.image_encoder(batch["images"])
        _, words, mask, _ = self.text_features(batch)
        v_attn = self.vpoe(self.queries, img["local_feats"])[1]
        u_attn = self.tpoe(self.queries, words, ~mask)[1]
        ids = batch["input_ids"]
        names = None if tokenizer is None else [
            common.report_words(i, index, tokenizer) for i, index in zip(ids, self.word_index(ids))]
        return v_attn, u_attn, img["grid"], names


# ==== TRAINING: loop, evaluation, pictures ====

def slot_statistics(v_attn):
    """V-POR maps B x K x N -> (mean entropy / log N: 1 = uniform over the patches, lower = localised;
    mean cosine between two slots' maps of the same image: 1 = all slots look at the same place)."""
    p = v_attn.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(-1).mean() / math.log(p.shape[-1])
    unit = F.normalize(p, dim=-1)
    cos = unit @ unit.transpose(1, 2)
    K = p.shape[1]
    overlap = (cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (K * (K - 1))
    return entropy.item(), overlap.mean().item()


@torch.no_grad()
def evaluate(model, loader, tokenizer, device, n_boot):
    """On held-out pairs, in fp32: retrieval R@1/5/10 both ways, zero-shot AUC with pair prompts ("x" vs "no x";
    synthetic: one finding per SYNTH_FINDINGS, present = non-empty mask; real data: the CheXpert labels) and its
    bootstrap intervals, and PLACE's checks: the PCMA slot accuracies (per batch), slot-map statistics and L_CCE
    with the real report vs with its word tokens zeroed (the same masks for both: a seeded generator).
    -> dict(retrieval, zero_shot, checks), common.save_results' layout."""
    model.eval()
    images, reports, labels, rows = [], [], [], []
    masks = torch.Generator().manual_seed(0)
    for batch in loader:
        b = common.to_device(batch, device)
        images.append(model.encode_image(b["images"]))
        reports.append(model.encode_text(b))
        keep = model.keep_index(b["images"], masks)
        real, zeroed = model(b, keep), model(b, keep, zero_report=True)
        entropy, overlap = slot_statistics(model.slot_maps(b)[0])
        row = dict(pcma_intra_acc=real["pcma_intra_acc"], pcma_inter_acc=real["pcma_inter_acc"],
                   vpor_entropy=entropy, vpor_slot_overlap=overlap)
        if keep is not None:
            row.update(cce_real_report=real["cce"], cce_zeroed_report=zeroed["cce"])
        rows.append({k: float(v) * len(batch["images"]) for k, v in row.items()})
        labels.append(data.zero_shot_targets(batch))
    img, txt = torch.cat(images), torch.cat(reports)
    sim = img @ txt.t()
    retrieval = common.retrieval(sim)
    names, phrases = data.zero_shot_findings("masks" in batch)
    pos = model.encode_text(common.to_device(data.prompt_batch(phrases, tokenizer), device))
    neg = model.encode_text(common.to_device(data.prompt_batch([f"no {p}" for p in phrases], tokenizer), device))
    return dict(retrieval=retrieval,
                zero_shot=common.zero_shot_summary(img @ pos.t(), img @ neg.t(), torch.cat(labels), names, n_boot),
                checks={k: sum(r[k] for r in rows) / len(loader.dataset) for k in rows[0]})


def finish(args, model, tokenizer, test_loader, mean_std, device, out, external=None):
    """The end of a run, once the best-validation model is exported: it is evaluated next to the untrained model it
    started from (printed, eval.json; on the --zero-shot-csv set too, `external`), then the report-conditioning check
    and the slot / CCE pictures."""
    common.seed_everything(args.seed)
    initial = PLACE(args, tokenizer).to(device)  # the same initialisation the training started from
    results = {name: evaluate(m, test_loader, tokenizer, device, args.n_boot)
               for name, m in (("untrained", initial), ("trained", model))}
    print(f"held-out {args.data} test split ({len(test_loader.dataset)} pairs; chance: PCMA intra-sample slot "
          f"accuracy 1/K = {1 / args.num_queries:.3f}, per-slot retrieval 1/B = {1 / args.batch_size:.3f}):")
    common.save_results(os.path.join(out, "eval.json"), results)
    common.score_external(out, external, dict(untrained=initial, trained=model), tokenizer, device, args)
    r = results["trained"]["checks"]
    if "cce_real_report" in r:
        verdict = "uses the report" if r["cce_real_report"] < r["cce_zeroed_report"] else "does NOT use the report"
        print(f"CCE report conditioning (trained, test split): L_CCE {r['cce_real_report']:.5f} with the real report "
              f"vs {r['cce_zeroed_report']:.5f} with its word tokens zeroed -> the predictor {verdict}")
    if args.viz:
        write_viz(model, next(iter(test_loader)), tokenizer, os.path.join(out, "viz"), *mean_std, args.viz, device)
    print(f"run folder: {out}")


def correlation_picture(matrix, size=256):
    """N x N matrix in [-1, 1] -> RGB: red positive, blue negative, white 0."""
    m = F.interpolate(matrix[None, None].float(), size=size, mode="nearest")[0, 0].clamp(-1, 1)
    rgb = torch.stack([1 - m.clamp(max=0).abs(), 1 - m.abs(), 1 - m.clamp(min=0)], -1)
    return Image.fromarray((rgb * 255).round().byte().numpy())


@torch.no_grad()
def write_viz(model, batch, tokenizer, folder, mean, std, n, device):
    """Per test image: slots_<i>.png, each of the K slots' V-POR cross-attention over the patches (last VPOE layer,
    head-averaged) with the report words its T-POR attends to most; cce_<i>.png, the CCE target C* and prediction
    C^ (ViT only)."""
    model.eval()
    os.makedirs(folder, exist_ok=True)
    b = common.to_device(batch, device)
    v_attn, u_attn, grid, words = model.slot_maps(b, tokenizer)
    keep = model.keep_index(b["images"], torch.Generator().manual_seed(0))
    matrices = model.cce_matrices(b, keep) if keep is not None else None
    K, size, cols = v_attn.shape[1], 160, 7
    for i in range(min(n, len(v_attn))):
        gray = (batch["images"][i, 0] * std + mean).clamp(0, 1).float()
        canvas = Image.new("RGB", (size * cols, (size + 44) * math.ceil(K / cols)), "white")
        for k in range(K):
            x, y = size * (k % cols), (size + 44) * (k // cols)
            canvas.paste(common.heat_overlay(gray, v_attn[i, k].view(grid), size), (x, y))
            top = u_attn[i, k, :len(words[i])].topk(min(3, len(words[i])))
            caption = f"slot {k}: " + ", ".join(f"{words[i][j]} {100 * p:.0f}%" for p, j in
                                                zip(top.values.tolist(), top.indices.tolist()))
            ImageDraw.Draw(canvas).text((x + 3, y + size + 2), "\n".join(textwrap.wrap(caption, 26)[:3]),
                                        fill="black")
        canvas.save(os.path.join(folder, f"slots_{i}.png"))
        if matrices is not None:
            pair = Image.new("RGB", (2 * 256 + 8, 256 + 16), "white")
            for j, (name, m) in enumerate(zip(("target C*", "predicted C^"), matrices)):
                pair.paste(correlation_picture(m[i].cpu()), (j * 264, 16))
                ImageDraw.Draw(pair).text((j * 264 + 2, 2), name, fill="black")
            pair.save(os.path.join(folder, f"cce_{i}.png"))


def optimizer_groups(model, args):
    """Two learning rates (our choice): the pre-trained encoders at lr, the new modules and heads at lr_new."""
    encoders = {id(p) for m in (model.image_encoder, model.text_encoder) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if id(p) in encoders], lr=args.lr),
            dict(params=[p for p in params if id(p) not in encoders], lr=args.lr_new)]


def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv, default_preset="demo")
    if args.bench:  # N timed optimizer steps without accumulation after one warm-up step
        args = common.bench_args(args, accum=1, ckpt_every=0)
    ddp = common.setup_distributed(args.device or None)
    dev, amp = ddp.device, common.amp_dtype(ddp.device, args.precision)
    micro_per_step = common.micro_batches_per_step(args.accum, ddp.world_size, args.batch_size)
    out = common.run_folder(args.out_dir, "place", ddp, args)
    train_set, val_set, test_set, (mean, std), tokenizer, external = common.datasets(args)
    common.seed_everything(args.seed)  # the same initial model on every rank
    model = PLACE(args, tokenizer).to(dev)
    collate = partial(data.collate, tokenizer=tokenizer, max_length=args.max_length, clean=args.clean_text)
    sampler, loader, val_loader, test_loader = common.loaders(args, ddp, train_set, val_set, test_set, collate)
    augment = data.crop_augment(args.image_size, mean, std).to(dev) if args.augment else None
    n_micro = sampler.num_samples // args.batch_size
    steps_per_epoch = math.ceil(n_micro / micro_per_step)
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    optimizer = torch.optim.AdamW(optimizer_groups(model, args), weight_decay=args.weight_decay)
    scheduler = common.cosine_with_warmup(optimizer, round(args.warmup * total_steps), total_steps, args.min_lr)
    scaler = common.grad_scaler(dev, amp)
    run = common.TrainingRun(args, ddp, out, total_steps, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler)
    state, net = run.progress, common.wrap_ddp(model, ddp)
    if ddp.is_main:
        print(f"PLACE: {common.count_parameters(optimizer) / 1e6:.1f}M trainable parameters ({args.image_arch}, "
              f"K = {args.num_queries}), {dev}, {amp or torch.float32}, {steps_per_epoch} steps of "
              f"{args.batch_size * micro_per_step * ddp.world_size} pairs per epoch")

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
            if run.stepped(lambda: {"lr": scheduler.get_last_lr()[1]}):
                break
        else:  # the epoch is complete: validation loss, best checkpoint, early stopping
            run.end_epoch(common.validation_loss(model, val_loader, dev, amp), model)
    run.export(model, lambda: common.export_encoders(out, model.image_encoder, model.text_encoder, tokenizer, mean,
                                                     std, args.image_size, "place", args))
    return run.evaluate(lambda: finish(args, model, tokenizer, test_loader, (mean, std), dev, out, external))

if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, data.BadRecord) as e:  # a NaN stop (check_finite) or bad training data: no traceback
        raise SystemExit(f"stopped: {e}")

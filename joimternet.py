"""JoImTeRNet: joint chest X-ray / report learning with word-region alignment, in one file.

Paper: Z. Ji*, M. A. Shaikh*, D. Moukheiber, S. N. Srihari, Y. Peng, M. Gao, "Improving Joint Learning of Chest
X-Ray and Radiology Report by Word Region Alignment", MLMI 2021 (LNCS 12966, pp. 110-119), arXiv 2109.01949.
Official code: github.com/mshaikh2/JoImTeR_MLMI_2021 @ 965bca9 (JoImTeR/, misc/losses.py, misc/GlobalAttention.py).
The paper's text was not available; this follows the official code (spec: specs/joimternet.md, cited by section).

Model (section 3). Image: a small ResNet (stem 7x7 1->8, six stages of 2 BasicBlocks, widths 16..512) with
soft-attention blocks after stages 4 and 5; regions V = 1x1 conv of the stage-5 map (16 x 16 x 512 at 2048 px,
or at 512 px with --stem-stride 1), global v = Linear(avgpool_2x2(stage 6)). Text: a 3-layer 512-wide BERT from
scratch on a word-level vocabulary; sentence e = Linear(h_[CLS]), words E = Linear(h_t) for t >= 1 ([SEP] counts
as a word, [CLS] does not). Cosines are taken inside the losses; nothing is L2-normalised.

Losses (section 5), gamma1 = 4, gamma2 = 5, gamma3 = 10, CE_rows(S) = mean_i -log softmax_j(S_ij)[i]:
  global CE   S^g_ij = gamma3 cos(v_i, e_j);          L^g = CE_rows(S^g) + CE_rows(S^g^T)
  word-region a_rw = V_r . E_w;  abar = softmax over words w (AttnGAN Eq. 8);  alpha_wr = softmax over regions r
              of gamma1 abar (Eq. 9);  c_w = sum_r alpha_wr V_r;  R(i,j) = log sum_w exp(gamma2 cos(E_w, c_w))
              (Eq. 10 without the 1/gamma2);  S^l_ij = gamma3 R(i,j);  L^l = CE_rows(S^l) + CE_rows(S^l^T)
  triplets    one random in-batch negative n(b) per anchor, shared by the four terms, margins 0.5:
              [d(v_b,e_b) - d(v_b,e_n(b)) + 0.5]_+ and [d(e_b,v_b) - d(e_b,v_n(b)) + 0.5]_+ with d = 1 - cos;
              [R(b,n(b)) - R(b,b) + 0.5]_+ and [R(n(b),b) - R(b,b) + 0.5]_+ (distance -R, no gamma3)
  ITM step    L = 1.0 (L^g + L^l) + 2.0 (four triplet terms), both encoders updated
  MLM step    with probability 0.7 a step is masked-LM on the text encoder alone (BERT 80/10/10 masking of 15 %
              of the non-special words); an epoch = len(ITM loader) ITM steps.

Run (CACHE from `python data.py prepare-mimic --root MIMIC --out CACHE --size 512`; --resume: from RUN/ckpt.pt):
  python joimternet.py                       # demo preset: synthetic data, CPU, a few minutes, prints numbers
  torchrun --nproc_per_node=8 joimternet.py --preset paper --data mimic --data-root CACHE   # (python: one GPU)
At the end, untrained vs trained: retrieval R@1/5/10 both ways (global cosine, 1k blocks and full gallery),
per-class AUC of the image-only classifier on the frozen encoder, word->region attention PNGs in RUN/viz.

Deviations and choices (all "our choice" unless the spec marks them otherwise):
  - 512-px cached squares with stem stride 1 instead of 2048-px crops with stride 4 (spec 9.1): the same grids
    from stage 1 on; no random 2048 crop, rotation +-15 deg and brightness/contrast [0.5, 1.8] kept
    (BatchAugment, on the device). Normalisation uses the dataset's scalar mean/std, not (0.5, 0.5).
  - Report text: findings + impression sentences (the suite's loader); the code used the whole normalised
    report. data.collate drops whole trailing sentences beyond 160 tokens instead of cutting mid-sentence.
  - Numbers -> NUMBER: whole numbers and decimals (regex below); the MIT normalisation's exact rule is not visible.
  - Local image->text triplet: the negative report keeps its own length; --triplet-quirk reproduces the code,
    which cuts or pads the negative report's words to the anchor's length (spec 5.3).
  - DDP (not in the code, single GPU): the global and local CE use gathered features with gradient (each rank
    scores its rows against all columns, common.md 5); triplet negatives are drawn over the global batch.
  - Same-study masking of off-diagonal logits is omitted: every study appears once per batch.
  - ckpt.pt at epoch ends (and at --max-steps); StepLR per epoch as in the code. bf16 autocast on GPU, losses fp32.
  - Classification: the image-only head of section 7.2 trained on cached features of the frozen encoder (eval
    mode, no augmentation), Adam lr 1e-4 wd 1e-4, 20 epochs, StepLR at 10, batch 32, weighted BCE of the code with
    counts from the training labels; labels 1 -> positive, anything else negative. Avg = mean over classes other
    than No Finding that have both outcomes in the test set.
  - demo preset (synthetic data on CPU, ~5 min): 128 px, widths 4..128, dim 128, 2-layer BERT, batch 32, 2000 pairs,
    4 epochs (248 ITM steps). From scratch the [CLS] vector of every report is nearly the same (cosine 0.9999 at
    init), so both encoders sit on a plateau (global CE = log B) until the text encoder becomes content-aware:
    - no augmentation (--no-augment): with rotation and brightness/contrast the tiny CNN does not leave the plateau
      within the demo's steps (the LoVT demo trains on plain views too).
    - lr 1e-3 (not 1e-4) and no StepLR drop within the 4 epochs (lr_drop 4): the plateau lasts ~80 ITM steps at 1e-3,
      longer at 5e-4, and the remaining steps are all needed to learn.
  - image_encoder.pt has arch "joimternet-smallresnet" (not a torchvision ResNet); text_encoder/ = BERT + tokenizer
    (save_pretrained) + joimternet_heads.pt (sentence/word projections, MLM head).
"""
import dataclasses
import functools
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.models.resnet import BasicBlock
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

import common
import data
from common import arg


@dataclasses.dataclass
class Args:
    """JoImTeRNet pre-training (defaults = the official code, spec section 6)."""
    preset: str = arg(None, "named set of overrides: paper | demo (demo is used when --data is not given)")
    data: str = arg("synthetic", "synthetic | mimic | csv")
    data_root: str = arg("", "prepare-mimic cache folder or pairs CSV")
    out_dir: str = arg("runs/joimternet", "run folder: ckpt.pt, metrics.csv, exported encoders, viz/")
    resume: bool = arg(False, "continue from out_dir/ckpt.pt")
    device: str = arg(None, "cuda / cpu (default: cuda if available)")
    precision: str = arg("auto", "auto (bf16 on GPU, none on CPU) | bf16 | fp16 | fp32")
    seed: int = arg(42, "seed (model init identical on every rank, data seed + rank)")
    workers: int = arg(4, "DataLoader workers per process")
    train_size: int = arg(None, "synthetic only: number of training pairs")
    eval_size: int = arg(None, "synthetic only: number of validation / test pairs")
    image_size: int = arg(512, "input side (cached 512 px with stem stride 1 = the 2048 px grids)")
    stem_stride: int = arg(1, "stride of the 7x7 stem (4 in the code at 2048 px)")
    widths: tuple[int, ...] = arg((16, 32, 64, 128, 256, 512), "channels of the six ResNet stages")
    dim: int = arg(512, "embedding size = BERT hidden size (dim / 64 heads, FFN 4 dim: 8 and 2048 in the code)")
    bert_layers: int = arg(3, "BERT layers")
    dropout: float = arg(0.1, "BERT hidden and attention dropout")
    max_length: int = arg(160, "tokens per report including [CLS] and [SEP]")
    min_word_count: int = arg(2, "vocabulary = words seen at least this often in the training reports")
    gamma1: float = arg(4.0, "sharpening of the softmax over regions (AttnGAN Eq. 9)")
    gamma2: float = arg(5.0, "log-sum-exp pooling of word relevances (Eq. 10)")
    gamma3: float = arg(10.0, "logit scale of the global and local CE (1/temperature)")
    margin_sent: float = arg(0.5, "global triplet margin")
    margin_word: float = arg(0.5, "local triplet margin")
    lambda_ce: float = arg(1.0, "weight of the four CE terms (LAMBDA_DAMSM)")
    lambda_triplet: float = arg(2.0, "weight of the four triplet terms (LAMBDA_TRIPLET)")
    triplet_quirk: bool = arg(False, "reproduce the code: negative report cut/padded to the anchor's length")
    local_chunk: int = arg(16, "reports per chunk of the B x B word-region attention")
    p_mlm: float = arg(0.7, "probability that a step is an MLM step (0 = ITM only)")
    mlm_prob: float = arg(0.15, "fraction of non-special tokens chosen for MLM")
    batch_size: int = arg(128, "global ITM/MLM batch (split over ranks)")
    eval_batch_size: int = arg(100, "evaluation batch")
    epochs: int = arg(35, "epochs of len(ITM loader) ITM steps")
    lr: float = arg(1e-4, "AdamW learning rate of both encoders")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    lr_drop: int = arg(20, "StepLR: x 0.1 every lr_drop epochs")
    clip: float = arg(1.5, "max grad norm, per encoder")
    augment: bool = arg(True, "augment ITM images (rotation +-15 deg, brightness/contrast [0.5, 1.8], spec 9.1)")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = all epochs); for tests")
    log_every: int = arg(10, "log every N steps")
    block: int = arg(1000, "retrieval block size (the '1k' protocol)")
    cls_lr: float = arg(1e-4, "classifier Adam learning rate")
    cls_train_size: int = arg(None, "cap on classifier training images (None = whole train split)")
    viz: int = arg(4, "validation images to draw word->region maps for")


PRESETS = {
    "paper": {},
    # Small enough for 2 CPU cores in a few minutes: 128 px (4 x 4 regions), a 2-layer 128-wide BERT. Plain views,
    # lr 1e-3 and no lr drop: from scratch both encoders first sit on a plateau (see the deviations in the docstring).
    "demo": dict(image_size=128, widths=(4, 8, 16, 32, 64, 128), dim=128, bert_layers=2, batch_size=32, epochs=4,
                 lr_drop=4, lr=1e-3, augment=False, workers=1, train_size=2000, eval_size=300, cls_lr=1e-3,
                 cls_train_size=800, out_dir="runs/joimternet-demo"),
}


# ==== TOKENIZER: word level, lower-case \w+, numbers -> NUMBER (spec 2.1) ====

SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")  # ids 0..3; [MASK] is the last id


def _word_pipeline(vocab: dict) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                           normalizers.Replace(Regex(r"\b\d+(?:\.\d+)?\b"), "NUMBER")])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\W+"), behavior="removed")  # keep \w+ runs (incl. "___")
    return tok


def build_word_tokenizer(texts, min_count: int = 2, max_length: int = 160) -> PreTrainedTokenizerFast:
    """Vocabulary of the words seen >= min_count times in `texts` (most frequent first), [PAD]=0 [CLS]=1 [SEP]=2
    [UNK]=3 ... [MASK]=last. A Hugging Face fast tokenizer: works with data.collate and save_pretrained."""
    probe = _word_pipeline({"[UNK]": 0})
    counts = {}
    for text in texts:
        for word, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate([*SPECIALS, *words, "[MASK]"])}
    return PreTrainedTokenizerFast(tokenizer_object=_word_pipeline(vocab), model_max_length=max_length,
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
                                   mask_token="[MASK]")


# ==== MODEL: small ResNet with soft attention (spec 3.1), word-level BERT (3.2) ====

class SoftAttention(nn.Module):
    """16 logit maps h_k = W_k F + b_k (the code's Conv3d with kernel (C,1,1) == a 1x1 conv), LeakyReLU, softmax over
    positions per head, summed: A (B x 1 x H x W, sums to 16). Output F + gamma (F * A), gamma ~ U(0,1) learned."""

    def __init__(self, channels: int, heads: int = 16):
        super().__init__()
        self.logits = nn.Conv2d(channels, heads, 1)
        self.gamma = nn.Parameter(torch.rand(1))

    def forward(self, x):
        b, _, h, w = x.shape
        attn = F.leaky_relu(self.logits(x)).flatten(2).softmax(-1).sum(1).view(b, 1, h, w)
        return x + self.gamma * (x * attn), attn


class ImageEncoder(nn.Module):
    """1-channel image -> global v (B x D), regions V (B x R x D, row-major h x w grid), soft-attention maps."""

    def __init__(self, dim=512, widths=(16, 32, 64, 128, 256, 512), stem_stride=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 7, stem_stride, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(True))
        stages, c = [], 8
        for w in widths:  # every stage halves the map; its first block has a strided 1x1 conv + BN shortcut
            down = nn.Sequential(nn.Conv2d(c, w, 1, 2, bias=False), nn.BatchNorm2d(w))
            stages.append(nn.Sequential(BasicBlock(c, w, 2, down), BasicBlock(w, w)))
            c = w
        self.stages = nn.ModuleList(stages)
        self.region = nn.Conv2d(widths[4], dim, 1, bias=False)
        self.global_fc = nn.Linear(4 * widths[5], dim)
        for m in self.modules():  # before the attention blocks exist: the code's init skips their Conv3d
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
        self.sa4, self.sa5 = SoftAttention(widths[3]), SoftAttention(widths[4])

    def forward(self, images):
        x = self.stem(images)
        for stage in self.stages[:4]:
            x = stage(x)
        x, attn4 = self.sa4(x)                                       # 128 x 32 x 32 at 2048 px
        x, attn5 = self.sa5(self.stages[4](x))                       # 256 x 16 x 16
        regions = self.region(x)                                     # B x D x 16 x 16
        pooled = F.adaptive_avg_pool2d(self.stages[5](x), 2)         # B x 512 x 2 x 2
        return dict(global_feat=self.global_fc(pooled.flatten(1)), local_feats=regions.flatten(2).transpose(1, 2),
                    grid=tuple(regions.shape[-2:]), attn4=attn4, attn5=attn5)


class TextEncoder(nn.Module):
    """BERT from a config (no pooler) -> sentence e = Linear(h_[CLS]), words E = Linear(h_1..) with their mask
    (attention mask without [CLS]: real words and [SEP]); MLM head on the raw states, vocab - 1 outputs."""

    def __init__(self, vocab_size, dim=512, layers=3, heads=8, ffn=2048, dropout=0.1):
        super().__init__()
        config = BertConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=ffn, hidden_act="gelu", hidden_dropout_prob=dropout,
                            attention_probs_dropout_prob=dropout, max_position_embeddings=512, type_vocab_size=2,
                            pad_token_id=0)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.sent_fc, self.word_fc = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlm = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=1e-12),
                                 nn.Linear(dim, vocab_size - 1))  # [MASK] (the last id) is never a target

    def forward(self, input_ids, attention_mask, task="itm"):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # B x L x H
        if task == "mlm":
            return self.mlm(h)                                                                # B x L x V-1
        return dict(sent=self.sent_fc(h[:, 0]), words=self.word_fc(h[:, 1:]), word_mask=attention_mask[:, 1:].bool())


# The word-region attention (AttnGAN DAMSM, Eqs. 7-10) lives in common.py: RECLF uses it too.


# ==== LOSSES (spec 5), pure functions of tensors ====

def global_ce(v, e, v_all, e_all, offset, gamma3):
    """Global CE matching, per direction. v, e: this rank's B x D image / sentence vectors; v_all, e_all: the
    gathered N*B x D (the same tensors on one process); rows offset..offset+B are this rank's. Returns
    (image->text, text->image) = CE over gamma3 cos of own images vs all reports, own reports vs all images."""
    labels = torch.arange(v.shape[0], device=v.device) + offset
    cos = lambda x, y: common.cosine(common.fp32(x)[:, None], common.fp32(y)[None])          # B x NB
    return F.cross_entropy(gamma3 * cos(v, e_all), labels), F.cross_entropy(gamma3 * cos(e, v_all), labels)


def local_ce(V, E, M, V_all, E_all, M_all, offset, gamma1, gamma2, gamma3, chunk=16):
    """Local (word-region) CE matching, per direction, same layout as global_ce: V B x R x D regions, E B x L x D
    words, M B x L word mask, *_all gathered. S^l = gamma3 R. One process: one B x B matrix serves both."""
    labels = torch.arange(V.shape[0], device=V.device) + offset
    i2t = gamma3 * common.word_region_matrix(V, E_all, M_all, gamma1, gamma2, chunk)          # own images x all reports
    t2i = i2t.T if V_all is V else gamma3 * common.word_region_matrix(V_all, E, M, gamma1, gamma2, chunk).T
    return F.cross_entropy(i2t, labels), F.cross_entropy(t2i, labels)


def sample_negatives(n, generator=None, device=None):
    """One index per anchor, uniform over the other n - 1 batch members (the code's np.random.choice)."""
    shift = torch.randint(1, n, (n,), generator=generator)
    return ((torch.arange(n) + shift) % n).to(device)


def triplet_terms(v, e, V, E, M, pos, neg, gamma1, gamma2, margin_sent, margin_word, quirk=False):
    """The four triplet terms (spec 5.3) for anchors `pos` with negatives `neg` (index tensors into the batch
    tensors v, e: N x D, V: N x R x D, E: N x L x D, M: N x L). Returns (global i2t, global t2i, local i2t,
    local t2i), each a mean over anchors. quirk=True: the negative report's words are cut/padded to the
    anchor's length L_b (the code's words_triplet_loss), else each report keeps its own mask."""
    d = lambda x, y: 1 - common.cosine(common.fp32(x), common.fp32(y))
    g_i2t = F.relu(d(v[pos], e[pos]) - d(v[pos], e[neg]) + margin_sent).mean()
    g_t2i = F.relu(d(e[pos], v[pos]) - d(e[pos], v[neg]) + margin_sent).mean()
    V, E = common.fp32(V), common.fp32(E)
    R = lambda i, j, mask: common.word_region_score(V[i], E[j], mask, gamma1, gamma2)   # aligned pairs -> P
    anchor_len = M[pos].sum(1, keepdim=True)
    neg_mask = torch.arange(M.shape[1], device=M.device) < anchor_len if quirk else M[neg]
    r_pos = R(pos, pos, M[pos])
    l_i2t = F.relu(R(pos, neg, neg_mask) - r_pos + margin_word).mean()           # delta = -R
    l_t2i = F.relu(R(neg, pos, M[pos]) - r_pos + margin_word).mean()
    return g_i2t, g_t2i, l_i2t, l_t2i


def mlm_mask(input_ids, mask_id, prob=0.15, generator=None):
    """The code's BERT masking: each token with id > 3 (not [PAD]/[CLS]/[SEP]/[UNK]) is chosen with probability
    `prob`; chosen tokens become [MASK] with p 0.8, a random word id in [4, mask_id) with p 0.1, stay with p 0.1.
    Returns (masked ids, labels) with labels = the original id at chosen positions, -100 elsewhere."""
    rand = lambda: torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    chosen = (rand() < prob) & (input_ids > 3)
    to_mask = chosen & (rand() < 0.9)
    to_random = to_mask & (rand() < 1 / 9)                                 # 0.9 * 1/9 = 0.1 of the chosen
    random_ids = torch.randint(4, mask_id, input_ids.shape, generator=generator).to(input_ids.device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, torch.where(chosen, input_ids, torch.full_like(input_ids, -100))


TERMS = ("global_ce_i2t", "global_ce_t2i", "local_ce_i2t", "local_ce_t2i", "global_trip_i2t", "global_trip_t2i",
         "local_trip_i2t", "local_trip_t2i")


def itm_losses(v, V, e, E, M, neg, cfg, pad_to=None, gather=True):
    """All eight matching terms of one ITM step and the weighted total (spec 5.4).

    v: B x D global image, V: B x R x D regions, e: B x D sentence, E: B x L x D words, M: B x L word mask
    (this rank's part of the batch). neg: (world * B,) negative index per anchor of the whole batch (identical on
    every rank). Under DDP the features are gathered with gradient (words padded to pad_to so that shapes match):
    CE rows are this rank's anchors against all columns, the triplets use this rank's anchors with negatives
    from the whole batch; with DDP's gradient averaging this equals the single-process full batch (tested)."""
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if pad_to is not None and E.shape[1] < pad_to:
            E, M = F.pad(E, (0, 0, 0, pad_to - E.shape[1])), F.pad(M, (0, pad_to - M.shape[1]))
        v_all, V_all, e_all, E_all = (common.gather_with_grad(t) for t in (v, V, e, E))
        M_all = common.gather_with_grad(M.to(v.dtype)) > 0  # the mask needs no gradient
        offset = dist.get_rank() * v.shape[0]
    else:
        v_all, V_all, e_all, E_all, M_all, offset = v, V, e, E, M, 0
    out = {}
    out["global_ce_i2t"], out["global_ce_t2i"] = global_ce(v, e, v_all, e_all, offset, cfg.gamma3)
    out["local_ce_i2t"], out["local_ce_t2i"] = local_ce(V, E, M, V_all, E_all, M_all, offset, cfg.gamma1,
                                                        cfg.gamma2, cfg.gamma3, cfg.local_chunk)
    pos = torch.arange(v.shape[0], device=v.device) + offset
    terms = triplet_terms(v_all, e_all, V_all, E_all, M_all, pos, neg.to(v.device)[pos], cfg.gamma1, cfg.gamma2,
                          cfg.margin_sent, cfg.margin_word, cfg.triplet_quirk)
    out.update(zip(TERMS[4:], terms))
    ce = sum(v for k, v in out.items() if "_ce_" in k)
    out["loss"] = cfg.lambda_ce * ce + cfg.lambda_triplet * sum(terms)
    return out


def mlm_loss(logits, labels):
    """Cross-entropy over the chosen positions (labels != -100) and the accuracy there."""
    chosen = labels != -100
    loss = F.cross_entropy(common.fp32(logits)[chosen], labels[chosen], reduction="sum") / chosen.sum().clamp(min=1)
    acc = (logits[chosen].argmax(-1) == labels[chosen]).float().mean() if chosen.any() else loss.new_zeros(())
    return loss, acc


class JoImTeRNet(nn.Module):
    """Both encoders; forward(batch, task) -> dict with `loss` and every term (unweighted)."""

    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg
        self.image = ImageEncoder(cfg.dim, cfg.widths, cfg.stem_stride)
        self.text = TextEncoder(vocab_size, cfg.dim, cfg.bert_layers, cfg.dim // 64, 4 * cfg.dim, cfg.dropout)

    def forward(self, batch, task="itm", neg=None, gather=True):
        if task == "mlm":  # input_ids already masked, mlm_labels from mlm_mask
            loss, acc = mlm_loss(self.text(batch["input_ids"], batch["attention_mask"], task="mlm"), batch["mlm_labels"])
            return dict(loss=loss, mlm=loss, mlm_acc=acc)
        img = self.image(batch["images"])
        txt = self.text(batch["input_ids"], batch["attention_mask"])
        n = img["global_feat"].shape[0] * (dist.get_world_size() if gather and dist.is_initialized() else 1)
        neg = sample_negatives(n) if neg is None else neg
        with torch.autocast(batch["images"].device.type, enabled=False):  # similarities and softmaxes in fp32
            return itm_losses(img["global_feat"], img["local_feats"], txt["sent"], txt["words"], txt["word_mask"],
                              neg, self.cfg, pad_to=self.cfg.max_length - 1, gather=gather)

    def encode_image(self, images):
        return F.normalize(common.fp32(self.image(images)["global_feat"]), dim=-1)

    def encode_text(self, batch):
        return F.normalize(common.fp32(self.text(batch["input_ids"], batch["attention_mask"])["sent"]), dim=-1)


# ==== EVALUATION: retrieval (spec 7.1), image-only classification (7.2), word->region maps ====

class ClassifierHead(nn.Module):
    """Image-only head of the code (ImageEncoder_Classification): pooled regions and global vector, each
    Dropout(0.5) -> Linear(D, 256) -> ReLU, concatenated -> Dropout -> Linear(512, 256) -> ReLU -> Dropout -> 14."""

    def __init__(self, dim, n_classes=14):
        super().__init__()
        self.region, self.glob = nn.Linear(dim, 256), nn.Linear(dim, 256)
        self.fc, self.out, self.drop = nn.Linear(512, 256), nn.Linear(256, n_classes), nn.Dropout(0.5)

    def forward(self, pooled, glob):
        h = torch.cat([F.relu(self.region(self.drop(pooled))), F.relu(self.glob(self.drop(glob)))], 1)
        return self.out(self.drop(F.relu(self.fc(self.drop(h)))))


@torch.no_grad()
def encode_split(model, loader, device, amp):
    """Frozen features of a split: global image/sentence vectors, pooled regions, labels (all on the CPU)."""
    model.eval()
    out = {k: [] for k in ("v", "e", "pooled", "labels")}
    for batch in loader:
        with common.autocast(device, amp):
            img = model.image(batch["images"].to(device))
            txt = model.text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        # pooled = the classifier head's global average pool of the region map
        for k, x in zip(out, (img["global_feat"], txt["sent"], img["local_feats"].mean(1), batch["labels"])):
            out[k].append(common.fp32(x).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def retrieval(feats, block):
    """Global-cosine Recall@1/5/10, image->text and text->image, on `block`-sized blocks and the full gallery."""
    sim = F.normalize(feats["v"], dim=-1) @ F.normalize(feats["e"], dim=-1).T  # images x reports
    res = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        for gallery, r in ((f"{min(block, len(s))}", common.block_recall_at_k(s, block)),
                           (f"{len(s)}", common.recall_at_k(s))):
            res.update({f"{name}_{gallery}/{k}": v for k, v in r.items()})
    return res


def classification(train, test, cfg, device):
    """Train the image-only head on frozen features, return per-class test AUC and "Avg" (spec 7.2)."""
    torch.manual_seed(cfg.seed)
    y, y_test = (train["labels"] == 1).float(), (test["labels"] == 1).float()  # 1 -> positive, else negative
    q = y.sum(0)
    pos_weight = (q[0] / q.clamp(min=1)).clamp(max=5) if q[0] > 0 else torch.ones_like(q)  # No Finding count
    class_weight = (len(y) - q) / len(y)
    head = ClassifierHead(train["v"].shape[1], y.shape[1]).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.cls_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10, 0.1)  # frozen regime: 20 epochs, step at 10, batch 32
    pooled, glob, y, pos_weight, class_weight = (t.to(device) for t in (train["pooled"], train["v"], y, pos_weight,
                                                                        class_weight))
    for _ in range(20):
        head.train()
        for idx in torch.randperm(len(y), device=device).split(32):
            logits = head(pooled[idx], glob[idx])
            loss = F.binary_cross_entropy_with_logits(logits, y[idx], weight=class_weight, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    head.eval()
    with torch.no_grad():
        scores = head(test["pooled"].to(device), test["v"].to(device)).cpu()
    auc = {name: common.roc_auc(scores[:, c], y_test[:, c]) for c, name in enumerate(data.CHEXPERT_LABELS)}
    rest = [a for n, a in auc.items() if n != "No Finding" and not math.isnan(a)]
    return auc, float(np.mean(rest)) if rest else float("nan")


FINDING_WORDS = set(data.SYNTH_FINDINGS) | {"consolidation", "edema", "atelectasis", "pneumonia", "heart",
                                            "opacities", "effusions", "nodules", "fracture", "devices"}


@torch.no_grad()
def save_attention_maps(model, batch, tokenizer, mean, std, folder, prefix, n=4, gamma1=4.0):
    """For the first n pairs, overlay one word's map alpha_w (spec 5.2 step 3) on its image as a PNG: the first
    finding word of the report, else the word with the most peaked map."""
    model.eval()
    images, ids, mask = (batch[k][:n].to(next(model.parameters()).device) for k in ("images", "input_ids",
                                                                                    "attention_mask"))
    img, txt = model.image(images), model.text(ids, mask)
    os.makedirs(folder, exist_ok=True)
    for b in range(len(images)):
        L = int(txt["word_mask"][b].sum())
        _, alpha = common.word_region_attention(common.fp32(img["local_feats"][b]), common.fp32(txt["words"][b, :L]),
                                         txt["word_mask"][b, :L], gamma1)              # L x R
        tokens = tokenizer.convert_ids_to_tokens(ids[b, 1:1 + L].tolist())
        hits = [i for i, t in enumerate(tokens) if t in FINDING_WORDS]
        w = hits[0] if hits else int(alpha[:L - 1].max(-1).values.argmax())          # skip [SEP] in the fallback
        heat = alpha[w].view(1, 1, *img["grid"])
        heat = F.interpolate(heat, size=images.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        heat = ((heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)).cpu()
        gray = (images[b, 0].cpu() * std + mean).clamp(0, 1)  # heat in red/orange over the half-dimmed film
        rgb = torch.stack([0.5 * gray + 0.5 * heat, 0.5 * gray + 0.2 * heat, 0.5 * gray], -1)
        picture = Image.fromarray((rgb * 255).byte().numpy()).resize((256, 256), Image.BILINEAR)
        ImageDraw.Draw(picture).text((4, 4), tokens[w], fill=(255, 255, 0))
        picture.save(os.path.join(folder, f"{prefix}_{b}_{tokens[w]}.png"))


def evaluate(model, loaders, tokenizer, mean, std, cfg, device, amp, tag):
    """Retrieval on the test split, classification trained on the train split, attention PNGs. Returns a dict."""
    test = encode_split(model, loaders["test"], device, amp)
    res = retrieval(test, cfg.block)
    auc, res["cls/Avg"] = classification(encode_split(model, loaders["cls_train"], device, amp), test, cfg, device)
    res.update({f"cls/{k}": v for k, v in auc.items()})
    save_attention_maps(model, next(iter(loaders["val"])), tokenizer, mean, std, os.path.join(cfg.out_dir, "viz"),
                        tag, cfg.viz, cfg.gamma1)
    return res


# ==== TRAINING ====

def main(argv=None):
    argv = list(os.sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--preset", "--data") for a in argv):
        argv = ["--preset", "demo", *argv]  # no data given: the synthetic demo
    cfg = common.parse_args(Args, PRESETS, argv)
    ctx = common.setup_distributed(cfg.device)
    dev, t_start = ctx.device, time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    size = lambda n: n if cfg.data == "synthetic" else None
    make = lambda split, train, n=None: data.make_dataset(cfg.data, cfg.data_root or None, split, cfg.image_size,
                                                          train, cfg.seed, num_samples=n)
    train_ds = make("train", True, size(cfg.train_size))
    val_ds, test_ds = make("validate", False, size(cfg.eval_size)), make("test", False, size(cfg.eval_size))

    tok_dir = os.path.join(cfg.out_dir, "tokenizer")  # built from the training reports, identical on every rank
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir) if cfg.resume and os.path.isdir(tok_dir) else \
        build_word_tokenizer(data.report_texts(train_ds), cfg.min_word_count, cfg.max_length)
    if ctx.is_main:
        tokenizer.save_pretrained(tok_dir)
    collate = functools.partial(data.collate, tokenizer=tokenizer, max_length=cfg.max_length)

    common.seed_everything(cfg.seed)  # same initialisation on every rank
    model = JoImTeRNet(cfg, len(tokenizer)).to(dev)
    opt_img = torch.optim.AdamW(model.image.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_txt = torch.optim.AdamW(model.text.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched_img, sched_txt = (torch.optim.lr_scheduler.StepLR(o, cfg.lr_drop, 0.1) for o in (opt_img, opt_txt))
    amp = common.amp_dtype(dev, cfg.precision)
    scaler = common.grad_scaler(dev, amp)
    # Task choice and triplet negatives must agree across ranks: one generator, same seed everywhere.
    task_rng = torch.Generator().manual_seed(cfg.seed + 1)
    stateful = dict(model=model, opt_img=opt_img, opt_txt=opt_txt, sched_img=sched_img, sched_txt=sched_txt, scaler=scaler)
    epoch = step = itm_step = 0
    if cfg.resume and os.path.exists(ckpt_path):
        ck = common.load_checkpoint(ckpt_path)
        for key, obj in stateful.items():
            obj.load_state_dict(ck[key])
        task_rng.set_state(ck["task_rng"])
        epoch, step, itm_step = ck["epoch"], ck["step"], ck["itm_step"]
        common.restore_rng(ck, ctx.rank)
    else:
        common.seed_everything(cfg.seed + ctx.rank)  # data order and augmentation differ per rank
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if ctx.distributed else model

    per_rank = cfg.batch_size // ctx.world_size
    def loader(ds, batch, train, seed=0):  # training order: a function of (seed, epoch), also on one process
        sampler = DistributedSampler(ds, ctx.world_size, ctx.rank, True, cfg.seed + seed, True) if train else None
        return DataLoader(ds, batch, sampler=sampler, drop_last=train, num_workers=cfg.workers, collate_fn=collate,
                          persistent_workers=cfg.workers > 0)
    itm_loader, mlm_loader = loader(train_ds, per_rank, True), loader(train_ds, per_rank, True, seed=1)
    val_loader = loader(val_ds, cfg.eval_batch_size, False)
    augment = data.BatchAugment(cfg.image_size, train_ds.mean, train_ds.std, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                rotation=15.0, translate=0.0, scale=(1.0, 1.0), brightness=(0.5, 1.8),
                                contrast=(0.5, 1.8), blur_sigma=(1e-3, 1e-3))  # sigma -> 0: no blur (the code has none)
    to_dev = lambda b: {k: b[k].to(dev, non_blocking=True) for k in ("images", "input_ids", "attention_mask")}
    steps_per_epoch = len(itm_loader)
    logger = common.Logger(cfg.out_dir, ctx.is_main, cfg.epochs * steps_per_epoch, itm_step)
    count = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M"
    if ctx.is_main:
        print(f"JoImTeRNet: {count(model.image)} image + {count(model.text)} text parameters, vocab {len(tokenizer)}, "
              f"{steps_per_epoch} ITM steps/epoch, {ctx.world_size} x {per_rank} pairs, amp {amp}, device {dev}")
    mlm_epoch, mlm_iter, sums, done = epoch - 1, iter(()), {}, False
    while epoch < cfg.epochs and not done:
        ddp.train()
        itm_loader.sampler.set_epoch(epoch)
        itm_iter, itm_in_epoch = logger.iterate(itm_loader), 0
        while itm_in_epoch < steps_per_epoch:
            task = "mlm" if torch.rand((), generator=task_rng) < cfg.p_mlm else "itm"
            if task == "mlm":  # MLM step: the text encoder alone (spec 5.4)
                batch = next(mlm_iter, None)
                if batch is None:  # the MLM stream runs through the training set at its own pace
                    mlm_epoch += 1
                    mlm_loader.sampler.set_epoch(mlm_epoch)
                    mlm_iter = iter(mlm_loader)
                    batch = next(mlm_iter)
                ids, labels = mlm_mask(batch["input_ids"], tokenizer.mask_token_id, cfg.mlm_prob)
                with common.autocast(dev, amp):
                    out = ddp(dict(input_ids=ids.to(dev), attention_mask=batch["attention_mask"].to(dev),
                                   mlm_labels=labels.to(dev)), task="mlm")
                opts, params = (opt_txt,), (model.text.parameters(),)
            else:  # ITM step: both encoders, the eight matching terms
                b = to_dev(next(itm_iter))
                if cfg.augment:
                    b["images"] = augment(b["images"])
                neg = sample_negatives(per_rank * ctx.world_size, task_rng)
                with common.autocast(dev, amp):
                    out = ddp(b, neg=neg)
                opts, params = (opt_img, opt_txt), (model.image.parameters(), model.text.parameters())
                itm_in_epoch, itm_step = itm_in_epoch + 1, itm_step + 1
            for o in opts:
                o.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            for o, p in zip(opts, params):  # clip each encoder separately, as the code does
                scaler.unscale_(o)
                nn.utils.clip_grad_norm_(p, cfg.clip)
                scaler.step(o)
            scaler.update()
            step += 1
            for k, v in out.items():  # running means since the last log line, every term unweighted
                k = "total" if k == "loss" and task == "itm" else k
                if k != "loss":
                    sums.setdefault(k, []).append(v.detach())
            if task == "itm" and itm_step % cfg.log_every == 0:  # one row per log_every ITM steps
                common.check_finite(out["loss"], step, ckpt_path, out)
                logger.log(itm_step, epoch, {**{f"loss/{k}": float(torch.stack(sums[k]).mean()) if k in sums else
                                                math.nan for k in ("total", *TERMS, "mlm", "mlm_acc")},
                                             "lr": opt_img.param_groups[0]["lr"]},
                           images=cfg.batch_size * len(sums.get("total", [])))
                sums = {}
            if cfg.max_steps and step >= cfg.max_steps:
                done = True
                break
        epoch += 1
        sched_img.step(), sched_txt.step()
        val = validate(model, val_loader, tokenizer, cfg, dev, amp)
        logger.write("val.csv", {"epoch": epoch, "step": step, **val})
        if ctx.is_main:
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
            common.save_checkpoint(ckpt_path, {**{k: o.state_dict() for k, o in stateful.items()}, "epoch": epoch,
                                               "step": step, "itm_step": itm_step, "task_rng": task_rng.get_state(),
                                               "args": cfg})
    logger.close()
    train_time = time.time() - t_start
    common.cleanup_distributed()  # evaluation below runs on rank 0 alone
    if not ctx.is_main:
        return None

    export(model, tokenizer, train_ds.mean, train_ds.std, cfg)
    cls_train = make("train", False, size(cfg.train_size))
    if cfg.cls_train_size and cfg.cls_train_size < len(cls_train):
        cls_train = Subset(cls_train, range(cfg.cls_train_size))
    loaders = {"test": loader(test_ds, cfg.eval_batch_size, False), "val": val_loader,
               "cls_train": loader(cls_train, cfg.eval_batch_size, False)}
    common.seed_everything(cfg.seed)
    untrained = JoImTeRNet(cfg, len(tokenizer)).to(dev)  # the same seed gives the trained model's initialisation
    results = {tag: evaluate(m, loaders, tokenizer, train_ds.mean, train_ds.std, cfg, dev, amp, tag)
               for tag, m in (("untrained", untrained), ("trained", model))}
    print(f"\nheld-out split ({len(test_ds)} pairs), trained {train_time:.0f}s, total {time.time() - t_start:.0f}s")
    print(f"{'metric':28s} {'untrained':>10s} {'trained':>10s}")
    for k in results["trained"]:
        print(f"{k:28s} {results['untrained'][k]:10.3f} {results['trained'][k]:10.3f}")
    print(f"word->region maps: {os.path.join(cfg.out_dir, 'viz')}")
    return results


@torch.no_grad()
def validate(model, loader, tokenizer, cfg, device, amp):
    """The code's per-epoch validation: mean CE / triplet losses and MLM loss + accuracy (fixed masking seed)."""
    model.eval()
    g, rows = torch.Generator().manual_seed(0), []
    for batch in loader:  # every rank runs the whole validation set, without gathering
        b = {k: batch[k].to(device) for k in ("images", "input_ids", "attention_mask")}
        ids, labels = mlm_mask(batch["input_ids"], tokenizer.mask_token_id, cfg.mlm_prob, g)
        with common.autocast(device, amp):
            itm = model(b, neg=sample_negatives(len(b["images"]), g), gather=False)
            mlm = model({**b, "input_ids": ids.to(device), "mlm_labels": labels.to(device)}, task="mlm")
        rows.append({f"val/{k}": float(v) for k, v in {**itm, **mlm}.items() if k != "loss"})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def export(model, tokenizer, mean, std, cfg):
    """image_encoder.pt (our own architecture, not a torchvision ResNet) and text_encoder/ (save_pretrained)."""
    payload = dict(arch="joimternet-smallresnet", state_dict={k: v.cpu() for k, v in model.image.state_dict().items()},
                   in_chans=1, mean=float(mean), std=float(std), image_size=cfg.image_size, method="joimternet",
                   args=common.plain(cfg))
    torch.save(payload, os.path.join(cfg.out_dir, "image_encoder.pt"))
    folder = os.path.join(cfg.out_dir, "text_encoder")
    common.export_text_encoder(folder, model.text, tokenizer)
    heads = {k: v.cpu() for k, v in model.text.state_dict().items() if not k.startswith("bert.")}
    torch.save(heads, os.path.join(folder, "joimternet_heads.pt"))  # sentence/word projections and MLM head


if __name__ == "__main__":
    main()

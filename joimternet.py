"""JoImTeRNet: joint chest X-ray / report learning with word-region alignment, in one file.

Paper: Z. Ji*, M. A. Shaikh*, D. Moukheiber, S. N. Srihari, Y. Peng, M. Gao, "Improving Joint Learning of Chest
X-Ray and Radiology Report by Word Region Alignment", MLMI 2021 (LNCS 12966, pp. 110-119), arXiv 2109.01949.
Official code: github.com/mshaikh2/JoImTeR_MLMI_2021 @ 965bca9, cited below as path:function in that repository.
The paper's text was not available; this follows the official code and the authors' notebooks.

Model (JoImTeR/model_img.py, JoImTeR/model_txt.py). Image: a small ResNet (stem 7x7 1->8, six stages of 2
BasicBlocks, widths 16..512) with soft-attention blocks after stages 4 and 5, common.SoftAttentionResNet (kept in
common.py so that eval_seg.py / eval_det.py can rebuild an exported encoder); regions V = 1x1 conv of the stage-5
map (16 x 16 x 512 at 2048 px, or at 512 px with --stem-stride 1), global v = Linear(avgpool_2x2(stage 6)).
Text: a 3-layer 512-wide BERT from scratch on a word-level vocabulary; sentence e = Linear(h_[CLS]), words
E = Linear(h_t) for t >= 1 ([SEP] counts as a word, [CLS] does not). Cosines are taken inside the losses; nothing is
L2-normalised.

Losses (misc/losses.py, misc/GlobalAttention.py), gamma1 = 4, gamma2 = 5, gamma3 = 10,
CE_rows(S) = mean_i -log softmax_j(S_ij)[i]:
  global CE   S^g_ij = gamma3 cos(v_i, e_j);          L^g = CE_rows(S^g) + CE_rows(S^g^T)          (sent_loss)
  word-region a_rw = V_r . E_w;  abar = softmax over words w (AttnGAN Eq. 8);  alpha_wr = softmax over regions r
              of gamma1 abar (Eq. 9);  c_w = sum_r alpha_wr V_r;  R(i,j) = log sum_w exp(gamma2 cos(E_w, c_w))
              (Eq. 10 without the 1/gamma2);  S^l_ij = gamma3 R(i,j);  L^l = CE_rows(S^l) + CE_rows(S^l^T)
                                                                                  (func_attention, words_loss)
  triplets    one random in-batch negative n(b) per anchor, shared by the four terms, margins 0.5:
              [d(v_b,e_b) - d(v_b,e_n(b)) + 0.5]_+ and [d(e_b,v_b) - d(e_b,v_n(b)) + 0.5]_+ with d = 1 - cos;
              [R(b,n(b)) - R(b,b) + 0.5]_+ and [R(n(b),b) - R(b,b) + 0.5]_+ (distance -R, no gamma3)
                                                                     (sent_triplet_loss, words_triplet_loss)
  ITM step    L = 1.0 (L^g + L^l) + 2.0 (four triplet terms), both encoders updated (joimternet_loss: a pure
              function of the features, which the model's forward calls)
  MLM step    with probability 0.7 a step is masked-LM on the text encoder alone (BERT 80/10/10 masking of 15 %
              of the non-special words); an epoch = len(ITM loader) ITM steps.
Training (JoImTeR/trainer_pretrain.py, misc/config.py): one AdamW per encoder, lr 1e-4, wd 1e-4; StepLR x 0.1 at
epoch 20 of 35; grad-norm clipping 1.5 per encoder; batch 128. Gradients are zeroed with zeros, not None, as the
code's module.zero_grad() did (PyTorch < 2.0): once a head has had a gradient, AdamW keeps stepping it on the steps
that do not use it (its moments decay and weight decay applies): the projection heads on MLM steps, the MLM head on
ITM steps (--no-step-idle-heads skips them). The image encoder is not stepped on MLM steps.

Run (CACHE from `python data.py prepare-mimic --root MIMIC --out CACHE --image-size 512`):
  python joimternet.py                       # demo preset: synthetic data, CPU, a few minutes, prints numbers
  python joimternet.py --preset paper --data mimic --data-root CACHE                                 # one GPU
  torchrun --nproc_per_node=8 joimternet.py --preset paper --data mimic --data-root CACHE --batch-size 16
  python joimternet.py --resume --out-dir runs/joimternet-XXXX                        # continue a killed run
  python joimternet.py --bench 20 [--preset paper]        # throughput of the image-text steps (images/s, memory)
  python joimternet.py --no-local                      # ablation: global terms only (no word-region CE / triplets)
--batch-size is per process (JoImTeRNet has no accumulation): with W processes, 128 / W keeps the code's 128 pairs
per step (the CE terms score each rank's pairs against all W x B gathered columns). Training views reach --image-size
through the augmentation below, or resized whole with --no-augment (data.train_view, every method's rule). Without
--data the demo preset runs on the built-in synthetic data. The run folder (default runs/joimternet-<time>) holds
args.json, metrics.csv, val.csv, ckpt.pt, image_encoder.pt, text_encoder/ (BERT, tokenizer, joimternet_heads.pt),
eval.json and viz/. At the end, untrained vs trained, in fp32, on the test split: retrieval R@1/5/10 both ways
(global cosine, the whole gallery; 1k blocks too once it is larger), zero-shot AUC with the suite's prompt pairs,
per-class AUC of the image-only classifier on the frozen encoder, word->region attention PNGs.

Deviations and choices (all "our choice" unless said otherwise):
  - 512-px cached squares with stem stride 1 instead of 2048-px crops with stride 4: the same grids from stage 1 on;
    no random 2048 crop, rotation +-15 deg and brightness/contrast [0.5, 1.8] kept (BatchAugment, on the device).
    Normalisation uses the dataset's scalar mean/std, not (0.5, 0.5).
  - Report text: findings + impression sentences (the suite's loader); the code used the whole normalised
    report. data.collate drops whole trailing sentences beyond 160 tokens instead of cutting mid-sentence.
  - Numbers -> NUMBER: whole numbers and decimals (regex below); the MIT normalisation's exact rule is not visible.
  - Local image->text triplet: the negative report keeps its own length; --triplet-quirk reproduces the code
    (misc/losses.py:words_triplet_loss), which cuts or pads the negative report's words to the anchor's length.
  - DDP (not in the code, single GPU): the global and local CE use gathered features with gradient (each rank
    scores its rows against all columns); triplet negatives are drawn over the global batch. Text batches are padded
    to the longest report of any rank before the BERT, so the gathered word states have one length and
    --triplet-quirk reads the pad-position states of other ranks' reports, exactly as one process would.
  - Same-study masking of off-diagonal logits is omitted: every study appears once per batch.
  - ckpt.pt every --ckpt-every steps, at epoch ends and at the end; --resume continues mid-epoch where the run
    stopped (both data streams' places, the task RNG and the logger's interval are in it). StepLR per epoch as in
    the code. bf16 autocast on GPU, losses fp32; the end-of-run evaluation in fp32. --log-every counts ITM steps.
    Seed 12345, the suite's (the code's: 42).
  - Validation as the code's (means over batches of the matching terms and the MLM loss / accuracy); a batch of one
    pair (a split of 1 mod the batch size) has no negative, so its triplet terms are left out.
  - Retrieval: the authors' notebook (JoImTeR/TestingR1k.ipynb) builds its TextEncoder with the default pool='avg',
    i.e. the report vector from the masked mean of all token states ([CLS] and [SEP] included), while training used
    [CLS]: --eval-text-pool mean reproduces it. The notebook loads the epoch-30 checkpoint; StepLR does not depend
    on the number of epochs, so --epochs 30 ends in exactly that state. eval.json: Recall@K on the whole test
    gallery under retrieval, on the code's blocks (--block) under checks (i2t_block1000_R@1, ...) once it is larger.
  - Zero-shot (not in the code; the suite's one protocol): AUC of the global cosine margin between the prompts "x"
    and "no x" (synthetic: its five findings; else the CheXpert findings but No Finding), bootstrap intervals.
  - Classification: the image-only head (Downstream/Classification/model_phrase_cls.py:ImageEncoder_Classification)
    trained on cached features of the frozen encoder (eval mode, no augmentation), Adam lr 1e-4 wd 1e-4, 20 epochs,
    StepLR at 10, batch 32, weighted BCE of the code with counts from the training labels; labels 1 -> positive,
    anything else negative. Avg = mean over classes other than No Finding that have both outcomes in the test set.
  - demo preset (synthetic data on CPU, a few minutes): 128 px, widths 4..128, dim 128, 2-layer BERT, batch 32,
    2000 pairs, 5 epochs (310 ITM steps). From scratch the [CLS] vector of every report is nearly the same (cosine
    0.9999 at init), so both encoders sit on a plateau (global CE = log B) until the text encoder becomes
    content-aware:
    - no augmentation (--no-augment): with rotation and brightness/contrast the tiny CNN does not leave the plateau
      within the demo's steps (the LoVT demo trains on plain views too).
    - lr 1e-3 (not 1e-4) and no StepLR drop within the 5 epochs (lr_drop 5): the plateau lasts ~90-150 ITM steps at
      1e-3, longer at 5e-4, and the remaining steps are all needed to learn.
    - p_mlm 0.5 (not 0.7): ~310 MLM steps instead of ~720, so that the 2-core budget goes to image-text steps
      (4 epochs at p_mlm 0.7: ~150 s on 2 cores, R@10 0.05-0.20 over our runs; 5 epochs at 0.5: 125-145 s, 0.16-0.20).
    Two runs of the same command log the same losses on one machine and thread count (tested). They used to
    drift apart from ITM step 6 at the 1e-7 level and then by whole R@10 points after the plateau: advanced
    indexing's backward (the triplet negatives, x[idx]) accumulated the repeated rows with atomic adds on a
    multi-threaded CPU; index_select's backward adds them in order. The plateau's length (90-150 ITM steps on
    earlier runs) still decides what one pass buys, so other seeds give other numbers.
  - MLM steps read the training reports without their images (Reports): same batches, no image decoded or rendered.
  - image_encoder.pt: arch "joimternet-resnet" with its config; eval_seg.py / eval_det.py rebuild it (c1 .. c5 =
    stages 1 .. 5, strides 2 .. 32 with stem stride 1).
"""
import dataclasses
import functools
import math
import os
import time
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

import common
import data
from common import arg


@dataclasses.dataclass
class Args(common.RunArgs):
    """JoImTeRNet pre-training (defaults = the official code; `--preset demo` is used when no --data is given)."""
    # encoders
    image_size: int = arg(512, "input side (cached 512 px with stem stride 1 = the 2048 px grids)")
    stem_stride: int = arg(1, "stride of the 7x7 stem (4 in the code at 2048 px)")
    widths: tuple[int, ...] = arg((16, 32, 64, 128, 256, 512), "channels of the six ResNet stages")
    dim: int = arg(512, "embedding size = BERT hidden size (dim / 64 heads, FFN 4 dim: 8 and 2048 in the code)")
    bert_layers: int = arg(3, "BERT layers")
    dropout: float = arg(0.1, "BERT hidden and attention dropout")
    max_length: int = arg(160, "tokens per report including [CLS] and [SEP]")
    min_word_count: int = arg(2, "vocabulary = words seen at least this often in the training reports")
    # objective
    gamma1: float = arg(4.0, "sharpening of the softmax over regions (AttnGAN Eq. 9)")
    gamma2: float = arg(5.0, "log-sum-exp pooling of word relevances (Eq. 10)")
    gamma3: float = arg(10.0, "logit scale of the global and local CE (1/temperature)")
    margin_sent: float = arg(0.5, "global triplet margin")
    margin_word: float = arg(0.5, "local triplet margin")
    lambda_ce: float = arg(1.0, "weight of the four CE terms (LAMBDA_DAMSM)")
    lambda_triplet: float = arg(2.0, "weight of the four triplet terms (LAMBDA_TRIPLET)")
    no_local: bool = arg(False, "ablation: global terms only (no word-region CE or triplet terms)")
    triplet_quirk: bool = arg(False, "reproduce the code: negative report cut/padded to the anchor's length")
    local_chunk: int = arg(16, "reports per chunk of the B x B word-region attention")
    p_mlm: float = arg(0.7, "probability that a step is an MLM step (0 = ITM only)")
    mlm_prob: float = arg(0.15, "fraction of non-special tokens chosen for MLM")
    # optimisation
    batch_size: int = arg(128, "ITM / MLM batch per process (the code: 128 on one GPU)")
    eval_batch_size: int = arg(100, "validation and evaluation batch (the code's; the validation means depend on it)")
    epochs: int = arg(35, "epochs of len(ITM loader) ITM steps")
    lr: float = arg(1e-4, "AdamW learning rate of both encoders")
    weight_decay: float = arg(1e-4, "AdamW weight decay")
    lr_drop: int = arg(20, "StepLR: x 0.1 every lr_drop epochs")
    clip: float = arg(1.5, "max grad norm, per encoder")
    step_idle_heads: bool = arg(True, "zero, not None, gradients (the code's zero_grad): AdamW keeps stepping the "
                                      "heads a step leaves unused")
    # evaluation
    block: int = arg(1000, "retrieval block size (the '1k' protocol)")
    eval_text_pool: Literal["cls", "mean"] = arg("cls", "report vector for retrieval: [CLS] (as trained) | mean "
                                                        "(masked mean of the token states: the authors' notebook)")
    cls_lr: float = arg(1e-4, "classifier Adam learning rate")
    cls_train_samples: int = arg(0, "train the classifier on the first N training images (0 = as many as train)")


PRESETS = {
    "paper": dict(data="mimic"),  # the defaults are the code's
    # Small enough for 2 CPU cores in a few minutes: 128 px (4 x 4 regions), a 2-layer 128-wide BERT, fewer MLM steps.
    # Plain views, lr 1e-3 and no lr drop: from scratch both encoders first sit on a plateau (see the docstring).
    "demo": dict(image_size=128, widths=(4, 8, 16, 32, 64, 128), dim=128, bert_layers=2, batch_size=32, epochs=5,
                 lr_drop=5, lr=1e-3, augment=False, workers=1, train_samples=2000, eval_samples=300, cls_lr=1e-3,
                 cls_train_samples=800, p_mlm=0.5, ckpt_every=50),
}


# ==== TOKENIZER: word level, lower-case \w+, numbers -> NUMBER (ScratchPads/DatasetPreprocess_MIMIC_temp.ipynb) ====

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


# ==== MODEL: the small ResNet with soft attention (common.SoftAttentionResNet) and a word-level BERT ====

class TextEncoder(nn.Module):
    """BERT from a config (no pooler) -> sentence e = Linear(h_[CLS]), words E = Linear(h_1..) with their mask
    (attention mask without [CLS]: real words and [SEP]); MLM head on the raw states, vocab - 1 outputs
    (JoImTeR/model_txt.py:TextEncoder, MLMHead). pool="mean": e from the masked mean of all token states instead
    (the code's pool='avg', which the retrieval notebook used)."""

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

    def forward(self, input_ids, attention_mask, task="itm", pool="cls"):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # B x L x H
        if task == "mlm":
            return self.mlm(h)                                                                # B x L x V-1
        if pool == "cls":
            sent = h[:, 0]
        else:
            m = attention_mask[..., None].to(h.dtype)
            sent = (h * m).sum(1) / m.sum(1)
        return dict(sent=self.sent_fc(sent), words=self.word_fc(h[:, 1:]), word_mask=attention_mask[:, 1:].bool())


# The word-region attention (AttnGAN DAMSM, Eqs. 7-10) lives in common.py: RECLF uses it too.


# ==== LOSSES (misc/losses.py), pure functions of tensors ====

def global_ce(v, e, v_all, e_all, offset, gamma3):
    """Global CE matching, per direction. v, e: this rank's B x D image / sentence vectors; v_all, e_all: the
    gathered N*B x D (the same tensors on one process); rows offset..offset+B are this rank's. Returns
    (image->text, text->image) = CE over gamma3 cos of own images vs all reports, own reports vs all images."""
    cos = lambda x, y: common.cosine(common.fp32(x)[:, None], common.fp32(y)[None])          # B x NB
    return common.contrastive_ce(gamma3 * cos(v, e_all), gamma3 * cos(e, v_all), offset)


def local_ce(V, E, M, V_all, E_all, M_all, offset, gamma1, gamma2, gamma3, chunk=16):
    """Local (word-region) CE matching, per direction, same layout as global_ce: V B x R x D regions, E B x L x D
    words, M B x L word mask, *_all gathered. S^l = gamma3 R. One process: one B x B matrix serves both."""
    i2t = gamma3 * common.word_region_matrix(V, E_all, M_all, gamma1, gamma2, chunk)          # own images x all reports
    t2i = i2t.T if V_all is V else gamma3 * common.word_region_matrix(V_all, E, M, gamma1, gamma2, chunk).T
    return common.contrastive_ce(i2t, t2i, offset)


def sample_negatives(n, generator=None, device=None):
    """One index per anchor, uniform over the other n - 1 batch members (the code's np.random.choice). A batch of
    one has no negative: callers leave the triplet terms out (joimternet_loss with neg=None)."""
    if n < 2:
        raise ValueError(f"a batch of {n} pair(s) has no negative: pass neg=None to leave the triplet terms out")
    shift = torch.randint(1, n, (n,), generator=generator)
    return ((torch.arange(n) + shift) % n).to(device)


def triplet_terms(v, e, V, E, M, pos, neg, gamma1, gamma2, margin_sent, margin_word, quirk=False, local=True):
    """The four triplet terms (sent_triplet_loss, words_triplet_loss) for anchors `pos` with negatives `neg` (index
    tensors into the batch tensors v, e: N x D, V: N x R x D, E: N x L x D, M: N x L). Returns (global i2t,
    global t2i, local i2t, local t2i), each a mean over anchors; local=False returns the two global terms only and
    never computes the word-region scores. quirk=True: the negative report's words are cut/padded to the anchor's
    length L_b (the code's words_triplet_loss), else each report keeps its own mask."""
    # rows by index_select, not x[idx]: the backward of advanced indexing accumulates the repeated negatives with
    # atomic adds on a multi-threaded CPU, so two runs differed in the last bits (and then everywhere); this one's
    # backward (index_add) is sequential and bitwise reproducible
    rows = lambda x, idx: x.index_select(0, idx)
    d = lambda x, y: 1 - common.cosine(common.fp32(x), common.fp32(y))
    g_i2t = F.relu(d(rows(v, pos), rows(e, pos)) - d(rows(v, pos), rows(e, neg)) + margin_sent).mean()
    g_t2i = F.relu(d(rows(e, pos), rows(v, pos)) - d(rows(e, pos), rows(v, neg)) + margin_sent).mean()
    if not local:
        return g_i2t, g_t2i
    V, E = common.fp32(V), common.fp32(E)
    R = lambda i, j, mask: common.word_region_score(rows(V, i), rows(E, j), mask, gamma1, gamma2)
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


def joimternet_loss(v, V, e, E, M, neg, *, gathered=None, offset=0, gamma1=4.0, gamma2=5.0, gamma3=10.0,
                    margin_sent=0.5, margin_word=0.5, lambda_ce=1.0, lambda_triplet=2.0, triplet_quirk=False, chunk=16,
                    local=True):
    """The image-text matching objective of one ITM step: its eight terms and the weighted total
    (JoImTeR/trainer_pretrain.py:train), a pure function of tensors (the caller gathers across processes):

      loss = lambda_ce (L^g_i2t + L^g_t2i + L^l_i2t + L^l_t2i) + lambda_triplet (T^g_i2t + T^g_t2i + T^l_i2t + T^l_t2i)
      L^g = CE_rows(gamma3 cos(v_i, e_j)) per direction (global_ce), L^l = CE_rows(gamma3 R(i, j)) (local_ce),
      T^g = [d(v_b, e_b) - d(v_b, e_n(b)) + margin_sent]_+ and its text->image twin, d = 1 - cos, T^l = [R(b, n(b))
      - R(b, b) + margin_word]_+ and [R(n(b), b) - R(b, b) + margin_word]_+ (triplet_terms), each a mean over anchors.
    MLM steps have their own loss (mlm_loss).

    v: B x D global image, V: B x R x D regions, e: B x D sentence, E: B x L x D words, M: B x L word mask: this
    rank's part of the batch. neg: (N,) one negative index per anchor of the whole batch of N pairs (identical on
    every rank: sample_negatives), or None to leave the four triplet terms out (a batch of one has no negative).
    gathered: (v, V, e, E, M) of the whole batch, every rank's in rank order with gradient (common.gather_rows), and
    offset = rank * B; None on one process. CE rows are this rank's anchors against all columns, the triplets use
    this rank's anchors with negatives from the whole batch; with DDP's gradient averaging this equals the
    single-process full batch (tested). local=False (--no-local, the global-only ablation) leaves out the four
    word-region terms. -> {term: value, "loss": the total}."""
    v_all, V_all, e_all, E_all, M_all = gathered or (v, V, e, E, M)
    out = {}
    out["global_ce_i2t"], out["global_ce_t2i"] = global_ce(v, e, v_all, e_all, offset, gamma3)
    if local:
        out["local_ce_i2t"], out["local_ce_t2i"] = local_ce(V, E, M, V_all, E_all, M_all, offset, gamma1, gamma2,
                                                            gamma3, chunk)
    out["loss"] = lambda_ce * sum(out.values())
    if neg is not None:
        pos = torch.arange(v.shape[0], device=v.device) + offset
        terms = triplet_terms(v_all, e_all, V_all, E_all, M_all, pos, neg.to(v.device)[pos], gamma1, gamma2,
                              margin_sent, margin_word, triplet_quirk, local)
        terms = dict(zip(("global_trip_i2t", "global_trip_t2i", "local_trip_i2t", "local_trip_t2i"), terms))
        out.update(terms)
        out["loss"] = out["loss"] + lambda_triplet * sum(terms.values())
    return out


def mlm_loss(logits, labels):
    """Cross-entropy over the chosen positions (labels != -100) and the accuracy there."""
    chosen = labels != -100
    loss = F.cross_entropy(common.fp32(logits)[chosen], labels[chosen], reduction="sum") / chosen.sum().clamp(min=1)
    acc = (logits[chosen].argmax(-1) == labels[chosen]).float().mean() if chosen.any() else loss.new_zeros(())
    return loss, acc


class JoImTeRNet(nn.Module):
    """Both encoders; forward(batch, task) -> dict with `loss` and every term (unweighted)."""

    def __init__(self, args, vocab_size):
        super().__init__()
        self.args = args
        self.image = common.SoftAttentionResNet(args.dim, args.widths, args.stem_stride)
        self.text = TextEncoder(vocab_size, args.dim, args.bert_layers, args.dim // 64, 4 * args.dim, args.dropout)

    def forward(self, batch, task="itm", neg=None, gather=True):
        """task "mlm": input_ids already masked, mlm_labels from mlm_mask. "itm": the eight matching terms, under DDP
        (gather) against the whole batch; neg: the negatives (default: drawn here; None for a batch of one)."""
        if task == "mlm":
            logits = self.text(batch["input_ids"], batch["attention_mask"], task="mlm")
            loss, acc = mlm_loss(logits, batch["mlm_labels"])
            return dict(loss=loss, mlm=loss, mlm_acc=acc)
        gather = gather and common.distributed()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if gather:  # [PAD] (id 0) to the longest report of any rank: the gathered words need one length
            ids, mask = common.pad_to_longest_rank(ids, mask)
        img, txt = self.image(batch["images"]), self.text(ids, mask)
        feats = (img["global_feat"], img["local_feats"], txt["sent"], txt["words"], txt["word_mask"])
        gathered, offset = None, 0
        if gather:  # the whole batch's, every rank's in rank order, with gradient
            *gathered, offset = common.gather_rows(*feats)
        n = len(feats[0]) * (dist.get_world_size() if gather else 1)
        if neg is None and n > 1:
            neg = sample_negatives(n)
        a = self.args
        with torch.autocast(batch["images"].device.type, enabled=False):  # similarities and softmaxes in fp32
            return joimternet_loss(*feats, neg, gathered=gathered, offset=offset, gamma1=a.gamma1, gamma2=a.gamma2,
                                   gamma3=a.gamma3, margin_sent=a.margin_sent, margin_word=a.margin_word,
                                   lambda_ce=a.lambda_ce, lambda_triplet=a.lambda_triplet,
                                   triplet_quirk=a.triplet_quirk, chunk=a.local_chunk, local=not a.no_local)

    def encode_image(self, images):
        return F.normalize(common.fp32(self.image(images)["global_feat"]), dim=-1)

    def encode_text(self, batch):
        txt = self.text(batch["input_ids"], batch["attention_mask"], pool=self.args.eval_text_pool)
        return F.normalize(common.fp32(txt["sent"]), dim=-1)


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
def encode_split(model, loader, device, text=True):
    """Frozen features of a split in fp32 on the CPU: global image vectors v, pooled regions, the labels and (text)
    the report vectors e and the zero-shot targets (synthetic: a finding's mask is not empty; else the CheXpert
    labels without No Finding, which the prompt pair would invert)."""
    model.eval()
    out = {k: [] for k in ("v", "pooled", "labels", "e", "findings")[:5 if text else 3]}
    for batch in loader:
        img = model.image(batch["images"].to(device))
        # pooled = the classifier head's global average pool of the region map
        feats = [img["global_feat"], img["local_feats"].mean(1), batch["labels"]]
        if text:
            feats.append(model.encode_text(common.to_device(batch, device)))
            feats.append(data.zero_shot_targets(batch))
        for k, x in zip(out, feats):
            out[k].append(common.fp32(x).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def classification(train, test, args, device):
    """Train the image-only head on frozen features, return per-class test AUC and "Avg" (the mean over the
    classes other than No Finding that have both outcomes in the test set; nan if none has)."""
    torch.manual_seed(args.seed)
    y, y_test = (train["labels"] == 1).float(), (test["labels"] == 1).float()  # 1 -> positive, else negative
    q = y.sum(0)
    pos_weight = (q[0] / q.clamp(min=1)).clamp(max=5) if q[0] > 0 else torch.ones_like(q)  # No Finding count
    class_weight = (len(y) - q) / len(y)
    head = ClassifierHead(train["v"].shape[1], y.shape[1]).to(device)
    opt = torch.optim.Adam(head.parameters(), lr=args.cls_lr, weight_decay=1e-4)
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
    return auc, common.mean_auc(scores[:, 1:], y_test[:, 1:])  # No Finding is the first column


FINDING_WORDS = set(data.SYNTH_FINDINGS) | {"consolidation", "edema", "atelectasis", "pneumonia", "heart",
                                            "opacities", "effusions", "nodules", "fracture", "devices"}


@torch.no_grad()
def save_attention_maps(model, batch, tokenizer, mean, std, folder, prefix, n=4, gamma1=4.0):
    """For the first n pairs, overlay one word's map alpha_w (AttnGAN Eq. 9) on its image as a PNG: the first
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
        panel = common.heat_overlay((images[b, 0] * std + mean).clamp(0, 1), alpha[w].view(img["grid"]))
        common.save_panels([panel], [tokens[w]], os.path.join(folder, f"{prefix}_{b}_{tokens[w]}.png"), lines=1)


def evaluate(model, loaders, tokenizer, mean_std, args, device, tag, out):
    """One model on the test split, in fp32: Recall@1/5/10 both ways on the whole gallery (global cosine; the
    code's blocks of --block pairs among the checks when the gallery is larger), zero-shot AUC of the global cosine
    with the pair prompts "x" / "no x" (common.zero_shot_summary), the image-only classifier trained on the
    training images (checks cls/: per-class AUC and Avg), attention PNGs. -> common.save_results' model entry."""
    test = encode_split(model, loaders["test"], device)
    sim = F.normalize(test["v"], dim=-1) @ F.normalize(test["e"], dim=-1).T  # images x reports
    retrieval, checks = common.retrieval(sim), {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        if len(s) > args.block:
            blocks = common.block_recall_at_k(s, args.block)
            checks.update({f"{name}_block{args.block}_{k}": v for k, v in blocks.items()})
    names, phrases = data.zero_shot_findings(data.is_synthetic(loaders["test"].dataset))
    prompts = common.to_device(data.prompt_batch(phrases + [f"no {p}" for p in phrases], tokenizer), device)
    with torch.no_grad():
        scores = F.normalize(test["v"], dim=-1) @ model.encode_text(prompts).cpu().T  # images x (C "x", C "no x")
    zero_shot = common.zero_shot_summary(scores[:, :len(names)], scores[:, len(names):], test["findings"], names,
                                         args.n_boot)
    cls_train = encode_split(model, loaders["cls_train"], device, text=False)
    auc, checks["cls/Avg"] = classification(cls_train, test, args, device)
    checks.update({f"cls/{k}": v for k, v in auc.items()})
    if args.viz:
        save_attention_maps(model, next(iter(loaders["test"])), tokenizer, *mean_std, os.path.join(out, "viz"), tag,
                            args.viz, args.gamma1)
    return dict(retrieval=retrieval, zero_shot=zero_shot, checks=checks)


# ==== TRAINING ====

class Reports(torch.utils.data.Dataset):
    """The reports of an image-report dataset without its images: what MLM steps read, so that they never decode or
    render an image (the same sentences, so the same batches). Samples carry a 1x1x1 placeholder image for collate."""

    def __init__(self, dataset):
        self.sentences = data.dataset_reports(dataset)

    def __len__(self):
        return len(self.sentences)

    def __getitem__(self, index):
        sentences = self.sentences[index]
        return dict(image=torch.zeros(1, 1, 1), sentences=list(sentences), text=" ".join(sentences),
                    labels=torch.zeros(len(data.CHEXPERT_LABELS)), study_id=str(index))


def datasets(args, out):
    """common.datasets with the word-level tokenizer of the training reports (kept in the run folder for --resume),
    and JoImTeRNet's two own sets: the training reports alone (Reports, for the MLM steps) and the classifier's
    training images (eval views). -> (train, val, test, reports, cls_train), (mean, std), tokenizer, external."""
    reports = []

    def word_tokenizer(train_set):
        reports.append(Reports(train_set))  # rendered once: the vocabulary's texts and the MLM steps'
        folder = os.path.join(out, "tokenizer")
        if args.resume and os.path.isdir(folder):
            return PreTrainedTokenizerFast.from_pretrained(folder)
        return build_word_tokenizer([" ".join(s) for s in reports[0].sentences], args.min_word_count, args.max_length)
    train_set, val_set, test_set, mean_std, tokenizer, external = common.datasets(args, word_tokenizer)
    cls_set = data.make_dataset(args.data, args.data_root, "train", args.image_size, False, skip_bad=args.skip_bad,
                                num_samples=(args.cls_train_samples or args.train_samples) or None)
    return (train_set, val_set, test_set, reports[0], cls_set), mean_std, tokenizer, external


def collate_pairs(samples, tokenizer, max_length):
    """data.collate without the synthetic masks and boxes, which JoImTeRNet's training never reads: every tensor a
    DataLoader worker hands over costs a file-descriptor transfer (a tenth of the CPU demo's time went there)."""
    batch = data.collate(samples, tokenizer, max_length)
    return {k: v for k, v in batch.items() if k not in ("masks", "boxes", "box_labels")}


def loaders(args, ddp, tokenizer, sets):
    """The ITM stream is common.loaders' training loader. JoImTeRNet's own: the MLM stream (its own order, a function
    of (seed + 1, epoch); resumable mid-epoch too) and the evaluation loaders at the code's batch (--eval-batch-size:
    the validation means depend on it): validation whole on every rank (the code's per-epoch means), the test split
    (with the synthetic masks: the zero-shot targets) and the classifier's images for rank 0. Each draws its
    workers' seeds from a generator of its own, never from the global RNG, so that when a loader starts does not
    change the MLM masks and dropout after it."""
    train_set, val_set, test_set, reports, cls_set = sets
    collate = functools.partial(collate_pairs, tokenizer=tokenizer, max_length=args.max_length)
    _, itm, _, _ = common.loaders(args, ddp, train_set, val_set, test_set, collate)  # its val / test: --batch-size

    def loader(dataset, batch_size, sampler=None, collate_fn=collate):
        return DataLoader(dataset, batch_size, sampler=sampler, drop_last=sampler is not None, collate_fn=collate_fn,
                          num_workers=args.workers, persistent_workers=args.workers > 0,
                          generator=torch.Generator().manual_seed(args.seed + ddp.rank))
    mlm = common.ResumableSampler(reports, ddp.world_size, ddp.rank, True, args.seed + 1, True)
    with_masks = functools.partial(data.collate, tokenizer=tokenizer, max_length=args.max_length)
    return dict(itm=itm, mlm=loader(reports, args.batch_size, mlm), val=loader(val_set, args.eval_batch_size),
                test=loader(test_set, args.eval_batch_size, collate_fn=with_masks),
                cls_train=loader(cls_set, args.eval_batch_size))


@torch.no_grad()
def validate(model, loader, tokenizer, args, device, amp):
    """The code's per-epoch validation (JoImTeR/trainer_pretrain.py:evaluate_itm, evaluate_mlm): means over batches
    of the matching terms and of the MLM loss and accuracy (fixed masking seed). Every rank runs the whole split."""
    model.eval()
    g, rows = torch.Generator().manual_seed(0), []
    for batch in loader:
        b = {k: batch[k].to(device) for k in ("images", "input_ids", "attention_mask")}
        ids, labels = mlm_mask(batch["input_ids"], tokenizer.mask_token_id, args.mlm_prob, g)
        n = len(b["images"])
        with common.autocast(device, amp):
            itm = model(b, neg=sample_negatives(n, g) if n > 1 else None, gather=False)
            mlm = model({**b, "input_ids": ids.to(device), "mlm_labels": labels.to(device)}, task="mlm")
        rows.append({f"val/{k}": float(v) for k, v in {**itm, **mlm}.items() if k != "loss"})
    keys = dict.fromkeys(k for r in rows for k in r)  # a batch of one has no triplet terms
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def export(args, model, tokenizer, mean_std, out):
    """Both encoders as every method exports them, and the text side's projections and MLM head."""
    common.export_encoders(out, model.image, model.text, tokenizer, *mean_std, args.image_size, "joimternet", args)
    heads = {k: v.cpu() for k, v in model.text.state_dict().items() if not k.startswith("bert.")}
    torch.save(heads, os.path.join(out, "text_encoder", "joimternet_heads.pt"))


def finish(args, model, tokenizer, loader, mean_std, device, out, started, external=None):
    """Once the encoders are exported: the trained model next to the untrained one it started from (evaluate; and
    zero-shot on the --zero-shot-csv set, `external`), printed and written to eval.json (common.save_results)."""
    trained_in = time.time() - started
    common.seed_everything(args.seed)
    untrained = JoImTeRNet(args, len(tokenizer)).to(device)  # the same seed gives the trained model's initialisation
    results = {tag: evaluate(m, loader, tokenizer, mean_std, args, device, tag, out)
               for tag, m in (("untrained", untrained), ("trained", model))}
    print(f"\nheld-out {args.data} test split ({len(loader['test'].dataset)} pairs), trained {trained_in:.0f}s, "
          f"total {time.time() - started:.0f}s")
    common.save_results(os.path.join(out, "eval.json"), results)
    common.score_external(out, external, dict(untrained=untrained, trained=model), tokenizer, device, args)
    print(f"run folder: {out} (word->region maps in viz/)")
    return results


def mlm_batches(loader, progress):
    """The MLM stream: through the training reports at its own pace, epoch after epoch, from where `progress` stands
    (mlm_epoch, mlm_in_epoch: in ckpt.pt, so that a resumed run continues the stream)."""
    while True:
        loader.sampler.set_epoch(progress["mlm_epoch"])
        loader.sampler.skip = progress["mlm_in_epoch"] * loader.batch_size
        for batch in loader:
            progress["mlm_in_epoch"] += 1
            yield batch
        progress.update(mlm_epoch=progress["mlm_epoch"] + 1, mlm_in_epoch=0)


def main(argv=None):
    args = common.parse_args(Args, PRESETS, argv, default_preset="demo")
    if args.bench:  # N timed image-text steps (no MLM steps interleaved) after one warm-up step
        args = common.bench_args(args, p_mlm=0.0, ckpt_every=0)
    ddp = common.setup_distributed(args.device or None)
    dev, amp, started = ddp.device, common.amp_dtype(ddp.device, args.precision), time.time()
    out = common.run_folder(args.out_dir, "joimternet", ddp, args)
    sets, mean_std, tokenizer, external = datasets(args, out)  # a bad --zero-shot-csv stops the run here
    if ddp.is_main:
        tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    loader = loaders(args, ddp, tokenizer, sets)
    common.seed_everything(args.seed)  # same initialisation on every rank
    model = JoImTeRNet(args, len(tokenizer)).to(dev)
    opt_img = torch.optim.AdamW(model.image.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    opt_txt = torch.optim.AdamW(model.text.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched_img, sched_txt = (torch.optim.lr_scheduler.StepLR(o, args.lr_drop, 0.1) for o in (opt_img, opt_txt))
    scaler = common.grad_scaler(dev, amp)
    task_rng = torch.Generator().manual_seed(args.seed + 1)  # task choice and negatives: the same on every rank
    steps_per_epoch, pairs = loader["itm"].sampler.num_samples // args.batch_size, args.batch_size * ddp.world_size
    # where the two streams stand: ITM batches of this epoch, the MLM stream's own epoch and batches in it
    progress = dict(epoch=0, step=0, itm_step=0, itm_in_epoch=0, mlm_epoch=0, mlm_in_epoch=0)
    run = common.TrainingRun(args, ddp, out, args.epochs * steps_per_epoch, progress, log_step="itm_step",
                             extra=lambda: dict(task_rng=task_rng.get_state()), model=model, opt_img=opt_img,
                             opt_txt=opt_txt, sched_img=sched_img, sched_txt=sched_txt, scaler=scaler)
    if args.resume:
        task_rng.set_state(run.resumed["task_rng"])
        if args.step_idle_heads:  # the zero gradients a parameter keeps once it was stepped (AdamW steps them again)
            for o in (opt_img, opt_txt):
                for p in o.state:
                    p.grad = torch.zeros_like(p)
    net = common.wrap_ddp(model, ddp, find_unused_parameters=True)  # MLM steps leave the image encoder unused
    augment = data.BatchAugment(args.image_size, *mean_std, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=15.0,
                                translate=0.0, scale=(1.0, 1.0), brightness=(0.5, 1.8), contrast=(0.5, 1.8),
                                blur_sigma=(1e-3, 1e-3)).to(dev) if args.augment else None  # sigma -> 0: no blur
    if ddp.is_main:
        print(f"JoImTeRNet: {common.count_parameters(opt_img) / 1e6:.1f}M image + "
              f"{common.count_parameters(opt_txt) / 1e6:.1f}M text parameters, vocab {len(tokenizer)}, "
              f"{steps_per_epoch} ITM steps/epoch of {ddp.world_size} x {args.batch_size} pairs, {dev}, {amp}")
    mlm_stream = mlm_batches(loader["mlm"], progress)
    while not run.done:  # epochs and --max-steps (a --resume of a finished run trains no further)
        net.train()
        run.start_epoch(loader["itm"], progress["itm_in_epoch"])  # resume mid-epoch
        itm_iter = run.logger.iterate(loader["itm"])
        while progress["itm_in_epoch"] < steps_per_epoch:
            task = "mlm" if torch.rand((), generator=task_rng) < args.p_mlm else "itm"
            if task == "mlm":  # MLM step: the text encoder alone
                batch = next(mlm_stream)
                ids, labels = mlm_mask(batch["input_ids"], tokenizer.mask_token_id, args.mlm_prob)
                with common.autocast(dev, amp):
                    terms = net(dict(input_ids=ids.to(dev), attention_mask=batch["attention_mask"].to(dev),
                                     mlm_labels=labels.to(dev)), task="mlm")
                optimizers = (opt_txt,)
                run.logger.add({k: terms[k] for k in ("mlm", "mlm_acc")})
            else:  # ITM step: both encoders, the eight matching terms
                batch = common.to_device(next(itm_iter), dev)
                batch["images"] = data.train_view(batch["images"], args.image_size, augment)
                neg = sample_negatives(pairs, task_rng)
                with common.autocast(dev, amp):
                    terms = net(batch, neg=neg)
                optimizers = (opt_img, opt_txt)
                run.logger.add(terms, images=pairs)
                progress["itm_in_epoch"] += 1
                progress["itm_step"] += 1
            for o in optimizers:  # zeros (the code's): AdamW keeps stepping the heads this step leaves unused
                o.zero_grad(set_to_none=not args.step_idle_heads)
            scaler.scale(terms["loss"]).backward()
            for o in optimizers:  # clip each encoder separately, as the code does
                scaler.unscale_(o)
                nn.utils.clip_grad_norm_(o.param_groups[0]["params"], args.clip)
                scaler.step(o)
            scaler.update()
            progress["step"] += 1
            if task == "itm" and (progress["itm_step"] % args.log_every == 0 or progress["step"] == args.max_steps
                                  or progress["itm_step"] == 1):  # one row per log_every ITM steps
                common.check_finite(terms["loss"], progress["step"], run.ckpt_path, terms)
                run.logger.log(progress["itm_step"], progress["epoch"], {"lr": opt_img.param_groups[0]["lr"],
                                                                         "loss/mlm": math.nan, "loss/mlm_acc": math.nan})
            if args.ckpt_every and progress["step"] % args.ckpt_every == 0:
                run.save()
            if run.done:  # --max-steps
                break
        if args.bench or run.done:
            break
        progress.update(epoch=progress["epoch"] + 1, itm_in_epoch=0)
        sched_img.step(), sched_txt.step()
        val = validate(model, loader["val"], tokenizer, args, dev, amp)
        run.logger.write("val.csv", {"epoch": progress["epoch"], "step": progress["step"], **val})
        if ddp.is_main:
            print(f"epoch {progress['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        run.save()
    run.export(model, lambda: export(args, model, tokenizer, mean_std, out))  # no best.pt: the last epoch's model
    return run.evaluate(lambda: finish(args, model, tokenizer, loader, mean_std, dev, out, started, external))


if __name__ == "__main__":
    try:
        main()
    except (FloatingPointError, data.BadRecord) as e:  # a NaN stop (check_finite) or bad training data: no traceback
        raise SystemExit(f"stopped: {e}")

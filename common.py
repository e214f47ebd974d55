"""Shared building blocks of cxr-vlp: encoders, heads, the DDP-correct InfoNCE, metrics and training plumbing.

Every method file (lovt.py, joimternet.py, ...) imports this module; nothing here knows about a particular method's
losses. Read top to bottom:

1. encoders      ImageEncoder (torchvision ResNet or ViT, 1-channel; the ViT with [CLS] attention and MAE-style
                 visible subsets), SoftAttentionResNet (JoImTeRNet's image encoder, here so that the evaluation
                 scripts can rebuild it), TextEncoder (transformers BERT), pool_sentences,
                 word_tables / word_index / sum_pieces / report_words (word pieces summed into words)
2. heads         ProjectionHead (LoVT BN-MLP), mgca_head, AttentionPool (LoVT GlobalAvgAttentionAggregator)
3. contrastive   gather_with_grad, gather_rows, contrastive_ce (each rank: own rows vs. gathered columns);
                 word_region_attention / _score / _matrix (AttnGAN DAMSM), report_chunks (I x T scores in chunks);
                 mgca_tca (MGCA's token-wise alignment within each pair)
4. metrics       recall_at_k, retrieval, block_recall_at_k, precision_at_k, roc_auc, bootstrap_ci, zero_shot_auc_ci,
                 mean_auc; external_zero_shot / save_external_zero_shot / score_external (--zero-shot-csv: a set
                 other than the training data, each method's own score); heat_overlay / save_panels (viz PNGs)
5. plumbing      arg/parse_args (RunArgs), setup_distributed, run_folder, datasets / loaders, ResumableSampler,
                 to_device, seeding, AMP, LR schedules
6. training run  checkpoints, Logger, validation_loss, check_finite, after_training, bench report, TrainingRun
                 (resume, val / best / early stopping, export, evaluation after training), encoder export/import,
                 print_comparison

Shapes: B batch, N local tokens (regions), L text tokens, S sentences, D/C channels.
"""
from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import tempfile
import textwrap
import time
import traceback
import types
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

import data

# ================================================================================================================
# 1. Encoders
# ================================================================================================================

def _fail(message: str):
    """Stop with a one-paragraph message instead of a stack trace (SystemExit prints its argument and exits 1)."""
    raise SystemExit("\n" + message + "\n")


def _torchvision_state_dict(arch: str, weights: str) -> dict:
    """State dict for `weights` = "imagenet" (torchvision download or cache) or a local file; the classifier
    (fc.* / heads.*) removed."""
    if weights == "imagenet":
        # IMAGENET1K_V1: the weights LoVT loaded through torch.hub (`resnet50-19c8e357`); for the ViT torchvision's
        # vit_b_16 (our choice: MGCA loads DeiT-B/16, which torchvision does not ship).
        name = {"vit_b16": "vit_b_16"}.get(arch, arch)
        try:
            sd = torchvision.models.get_model_weights(name).IMAGENET1K_V1.get_state_dict(progress=True)
        except Exception as e:  # no internet, proxy, corrupt cache: all end the same way for the user
            _fail(f"Could not get the torchvision ImageNet weights for {arch} ({type(e).__name__}: {e}). "
                  f"On a machine without internet, download them elsewhere (torchvision.models.{name}"
                  f"(weights='IMAGENET1K_V1').state_dict() saved with torch.save) and pass that file's path "
                  f"as the image weights, or pass `none` to start from random initialisation.")
    else:
        if not os.path.isfile(weights):
            _fail(f"Image encoder weights '{weights}' are neither 'imagenet', 'none' nor an existing file. Pass a "
                  f"torchvision state-dict file, an exported image_encoder.pt, or `none` for random init.")
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)  # our image_encoder.pt wraps the state dict with metadata
    return {k: v for k, v in sd.items() if not k.startswith(("fc.", "heads."))}


# ViT-B/16 (MGCA's vit_base: HKU-MedAI/MGCA:mgca/models/backbones/vits.py) and a tiny CPU config.
VIT_CONFIGS = dict(vit_b16=dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp=3072),
                   vit_tiny=dict(image_size=128, patch_size=16, width=192, layers=4, heads=3, mlp=768))


class ImageEncoder(nn.Module):
    """Torchvision ResNet-18/50 or ViT (torchvision VisionTransformer) on 1-channel images.

    The first layer (ResNet conv1, ViT patch embedding) holds the RGB kernel summed over its input channels:
    conv(x repeated to 3 channels, W) equals conv(x, W.sum(1)), so this is exactly LoVT's "grayscale repeated to
    RGB" at a third of the cost. `weights`: None / "none" (random init), "imagenet" (torchvision IMAGENET1K_V1;
    for a ViT only ViT-B/16 at 224 px) or a path to a torchvision state dict (3- or 1-channel first layer) or to
    an exported image_encoder.pt. `self.backbone` is a plain torchvision model (classifier = Identity), so its state
    dict is torchvision-compatible. ViTs: arch "vit_b16" or "vit_tiny" (VIT_CONFIGS), `config` overrides fields.
    Every image encoder of the suite offers feature_maps(images) (ResNets: [c1 .. c5] at strides 2 .. 32; ViT: the
    one patch map at stride patch_size) with `stage_channels`, `arch` and `config` (the constructor keywords that
    rebuild it): what the evaluation scripts use.
    """

    def __init__(self, arch: str = "resnet50", weights: str | None = None, channels_last: bool = False,
                 config: dict | None = None):
        super().__init__()
        self.arch, self.channels_last, self.is_vit = arch, channels_last, arch in VIT_CONFIGS
        if self.is_vit:
            self._build_vit(weights, config or {})
            return
        if arch not in ("resnet18", "resnet50"):
            raise ValueError(f"arch must be resnet18, resnet50, {' or '.join(VIT_CONFIGS)}, got {arch}")
        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        if weights not in (None, "none", ""):
            sd = _torchvision_state_dict(arch, weights)
            sd["conv1.weight"] = sd["conv1.weight"].sum(1, keepdim=True)  # 64x3x7x7 -> 64x1x7x7 (no-op for 1 ch)
            net.load_state_dict(sd, strict=True)
        self.config, self.backbone = {}, net
        wide = 4 if arch == "resnet50" else 1  # Bottleneck blocks expand their width 4 times
        self.stage_channels = [64, 64 * wide, 128 * wide, 256 * wide, 512 * wide]
        self.out_dim = self.stage_channels[-1]  # layer4 channels
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _build_vit(self, weights, config):
        unknown = set(config) - set(VIT_CONFIGS[self.arch])
        if unknown:
            raise ValueError(f"unknown ViT config fields {sorted(unknown)} (known: {sorted(VIT_CONFIGS[self.arch])})")
        c = self.config = {**VIT_CONFIGS[self.arch], **config}
        if weights == "imagenet" and c != VIT_CONFIGS["vit_b16"]:
            raise ValueError(f"ImageNet weights exist only for ViT-B/16 at 224 px ({VIT_CONFIGS['vit_b16']}), "
                             f"not for {self.arch} {c}: pass `none` or a state-dict file")
        p = c["patch_size"]
        net = torchvision.models.VisionTransformer(c["image_size"], p, c["layers"], c["heads"], c["width"], c["mlp"])
        net.conv_proj = nn.Conv2d(1, c["width"], kernel_size=p, stride=p)
        nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / p ** 2))  # torchvision's init, fan-in 1 ch
        nn.init.zeros_(net.conv_proj.bias)
        net.heads = nn.Identity()
        if weights not in (None, "none", ""):
            sd = _torchvision_state_dict(self.arch, weights)
            sd["conv_proj.weight"] = sd["conv_proj.weight"].sum(1, keepdim=True)  # 768x3x16x16 -> 768x1x16x16
            net.load_state_dict(sd, strict=True)
        self.backbone, self.patch_size = net, p
        self.grid = (c["image_size"] // p,) * 2
        self.out_dim, self.stage_channels = c["width"], [c["width"]]

    def num_patches(self, image_size: int) -> int:
        return (image_size // self.patch_size) ** 2

    def _vit_tokens(self, images, visible=None):
        """-> (tokens B x (1 + n) x C after the final LayerNorm, the last block's head-averaged attention
        B x (1 + n) x (1 + n)). Position embeddings are added before `visible` selects the patches, so a subset
        is encoded exactly as an image with the other patches removed (MAE, He et al. 2022, Sec. 3). torchvision's
        VisionTransformer.forward, with the last block written out to return its attention weights."""
        net, enc = self.backbone, self.backbone.encoder
        x = net._process_input(images) + enc.pos_embedding[:, 1:]             # B x N x C
        if visible is not None:
            x = x.gather(1, visible[..., None].expand(-1, -1, x.shape[-1]))    # B x n x C
        cls = (net.class_token + enc.pos_embedding[:, :1]).expand(len(x), -1, -1)
        x = enc.layers[:-1](enc.dropout(torch.cat([cls, x], 1)))
        last = enc.layers[-1]
        y = last.ln_1(x)
        y, attn = last.self_attention(y, y, y, need_weights=True, average_attn_weights=True)
        x = x + last.dropout(y)
        return enc.ln(x + last.mlp(last.ln_2(x))), attn

    def feature_maps(self, images: torch.Tensor) -> list:
        """images B x 1 x H x W -> ResNet: [c1 (stem after ReLU, stride 2), c2 .. c5 (layer1 .. layer4, stride 32)];
        ResNet-50 at 224 px: 64 x 112^2, 256 x 56^2, 512 x 28^2, 1024 x 14^2, 2048 x 7^2.
        ViT: [the patch tokens after the final LayerNorm as a map B x C x h x w] (ViT-B/16 at 224: 768 x 14^2)."""
        if self.is_vit:
            patches = self._vit_tokens(images)[0][:, 1:]
            return [patches.transpose(1, 2).reshape(len(images), -1, *self.grid)]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        net = self.backbone
        maps = [net.relu(net.bn1(net.conv1(images)))]
        for i, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            maps.append(layer(net.maxpool(maps[-1]) if i == 0 else maps[-1]))
        return maps

    def forward(self, images: torch.Tensor, visible: torch.Tensor | None = None) -> dict:
        """images B x 1 x H x W -> dict(global_feat B x C, local_feats B x N x C (row-major grid, region index =
        w_grid * row + col), grid (h, w), and
        ResNet: global = avg pool of layer4, local = the layer4 grid, stages = feature_maps(images);
        ViT: global = [CLS] and local = the patches, both after the final LayerNorm (MGCA's vit_forward),
        cls_attn B x N = the last block's [CLS] -> patch attention averaged over heads, renormalised over the
        patches (MGCA's patch-importance weights, HKU-MedAI/MGCA:mgca/models/mgca/mgca_module.py:MGCA.forward).
        visible (ViT only): LongTensor B x n of patch indices; only those are encoded (MAE-style) and returned
        in the given order (local_feats B x n x C, cls_attn B x n); grid stays the full grid."""
        if self.is_vit:
            tokens, attn = self._vit_tokens(images, visible)
            cls_attn = fp32(attn[:, 0, 1:])
            return dict(global_feat=tokens[:, 0], local_feats=tokens[:, 1:], grid=self.grid,
                        cls_attn=cls_attn / cls_attn.sum(-1, keepdim=True))
        if visible is not None:
            raise ValueError(f"encoding a subset of visible patches needs a ViT, not {self.arch}")
        stages = self.feature_maps(images)
        x = stages[-1]
        return dict(global_feat=x.mean((2, 3)), local_feats=x.flatten(2).transpose(1, 2),
                    grid=tuple(x.shape[2:]), stages=stages)

    def encode_visible(self, images: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """The visible patches only, MAE-style: B x n x C (= self(images, visible)["local_feats"])."""
        return self(images, visible)["local_feats"]


class SoftAttention(nn.Module):
    """JoImTeRNet's soft attention (mshaikh2/JoImTeR_MLMI_2021:JoImTeR/model_img.py): 16 logit maps
    h_k = W_k F + b_k (the code's Conv3d with kernel (C,1,1) == a 1x1 conv), LeakyReLU, softmax over positions per
    head, summed: A (B x 1 x H x W, sums to 16). Output F + gamma (F * A), gamma ~ U(0,1) learned."""

    def __init__(self, channels: int, heads: int = 16):
        super().__init__()
        self.logits = nn.Conv2d(channels, heads, 1)
        self.gamma = nn.Parameter(torch.rand(1))

    def forward(self, x):
        b, _, h, w = x.shape
        attn = F.leaky_relu(self.logits(x)).flatten(2).softmax(-1).sum(1).view(b, 1, h, w)
        return x + self.gamma * (x * attn), attn


class SoftAttentionResNet(nn.Module):
    """JoImTeRNet's image encoder (mshaikh2/JoImTeR_MLMI_2021:JoImTeR/model_img.py:ImageEncoder), from scratch:
    stem 7x7 1->8 (stride `stem_stride`, no max-pool), six stages of 2 BasicBlocks (the first strided, with a 1x1
    conv + BN shortcut), soft attention after stages 4 and 5; regions V = 1x1 conv of the stage-5 map, global
    v = Linear(avgpool_2x2(stage 6)). It lives here, not in joimternet.py, so that eval_seg.py / eval_det.py can
    rebuild an exported JoImTeRNet encoder. With stem_stride 1, c1 .. c5 = stages 1 .. 5 (after the attention) have
    the ResNet strides 2 .. 32."""
    arch = "joimternet-resnet"

    def __init__(self, dim=512, widths=(16, 32, 64, 128, 256, 512), stem_stride=4):
        super().__init__()
        from torchvision.models.resnet import BasicBlock
        self.config = dict(dim=dim, widths=list(widths), stem_stride=stem_stride)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 7, stem_stride, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(True))
        stages, c = [], 8
        for w in widths:  # every stage halves the map
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
        self.stage_channels = list(widths[:5])

    def _trunk(self, images):
        """-> stage 1 .. 5 maps (soft attention applied after 4 and 5) and the two attention maps."""
        maps = [self.stages[0](self.stem(images))]
        for stage in self.stages[1:4]:
            maps.append(stage(maps[-1]))
        maps[3], attn4 = self.sa4(maps[3])                           # 128 x 32 x 32 at 2048 px
        x, attn5 = self.sa5(self.stages[4](maps[3]))                 # 256 x 16 x 16
        return maps + [x], attn4, attn5

    def feature_maps(self, images):
        return self._trunk(images)[0]

    def forward(self, images):
        """images B x 1 x H x W -> dict(global_feat B x D, local_feats B x R x D (row-major regions), grid (h, w),
        attn4, attn5 (the soft-attention maps))."""
        maps, attn4, attn5 = self._trunk(images)
        regions = self.region(maps[4])                                # B x D x 16 x 16
        pooled = F.adaptive_avg_pool2d(self.stages[5](maps[4]), 2)    # B x 512 x 2 x 2
        return dict(global_feat=self.global_fc(pooled.flatten(1)), local_feats=regions.flatten(2).transpose(1, 2),
                    grid=tuple(regions.shape[-2:]), attn4=attn4, attn5=attn5)


class TextEncoder(nn.Module):
    """transformers BertModel (no pooler) from a name/path, or a tiny random-init BERT for offline runs.

    name_or_path: "tiny" builds BertConfig(vocab_size=len(tokenizer), hidden 128, 2 layers, 4 heads, intermediate
        512, 512 positions) -- small enough for a 2-core CPU demo, deep enough to contextualise; "bert-base" the
        same with BERT-base's sizes (768, 12 layers, 12 heads, 3072 = Bio_ClinicalBERT's), random init, for
        benchmarks of the paper configurations offline; anything else is passed to BertModel.from_pretrained (e.g.
        "emilyalsentzer/Bio_ClinicalBERT" or a save_pretrained folder).
    freeze_layers: k freezes the embeddings and the first k encoder layers (requires_grad False; LoVT: k = 6).
        Their dropout stays active in train mode, as in LoVT. Pass only trainable parameters to the optimizer.
    num_layers: the encoder depth; None = 2 for "tiny", 12 for "bert-base", all of a pretrained model's layers; k
        for a pretrained model keeps its first k layers (MGCA's text encoder: Bio_ClinicalBERT's first 6).
    """

    def __init__(self, name_or_path: str = "tiny", tokenizer=None, freeze_layers: int = 0, hidden_size: int = 128,
                 num_layers: int | None = None, num_heads: int = 4, intermediate_size: int = 512):
        super().__init__()
        from transformers import BertConfig, BertModel
        if name_or_path == "bert-base":
            name_or_path, hidden_size, num_heads, intermediate_size = "tiny", 768, 12, 3072
            num_layers = num_layers or 12
        if name_or_path == "tiny":
            num_layers = num_layers or 2
            if tokenizer is None:
                raise ValueError("a random-init BERT needs the tokenizer (for its vocabulary size and [PAD] id)")
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                                num_attention_heads=num_heads, intermediate_size=intermediate_size,
                                max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
            self.bert = BertModel(config, add_pooling_layer=False)
        else:
            try:
                depth = {} if num_layers is None else dict(num_hidden_layers=num_layers)
                self.bert = BertModel.from_pretrained(name_or_path, add_pooling_layer=False, **depth)
            except (OSError, ValueError) as e:
                _fail(f"Could not load the BERT model '{name_or_path}' ({type(e).__name__}: {str(e)[:300]}). "
                      f"Without internet, pass a local folder written by save_pretrained (copy the model from a "
                      f"machine with access, e.g. huggingface-cli download {name_or_path}), or use the tiny offline "
                      f"config (`tiny`, vocabulary built from the training reports).")
        self.out_dim = self.bert.config.hidden_size
        if freeze_layers:
            for module in [self.bert.embeddings, *self.bert.encoder.layer[:freeze_layers]]:
                module.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sum_last: int = 1) -> torch.Tensor:
        """input_ids, attention_mask B x L -> token states B x L x D: the last layer, or the sum of the last
        `sum_last` layers (GLoRIA/RECLF use 4)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=sum_last > 1)
        if sum_last == 1:
            return out.last_hidden_state
        return torch.stack(out.hidden_states[-sum_last:]).sum(0)

    def save_pretrained(self, directory: str):
        self.bert.save_pretrained(directory)


def pool_sentences(token_states: torch.Tensor, sentence_index: torch.Tensor, num_sentences: int,
                   mode: str = "max") -> torch.Tensor:
    """Token states B x L x D -> sentence features B x S x D, vectorised with scatter_reduce.

    sentence_index B x L: the sentence of each token, -1 for [CLS]/[SEP]/padding (ignored; so are indices >= S).
    mode "max": channel-wise max over the sentence's tokens (LoVT's max with -inf masking); "mean": their average.
    Sentence slots without any token (padded sentences) are 0 (LoVT sets padded sentence features to 0).
    """
    B, L, D = token_states.shape
    S = num_sentences
    valid = (sentence_index >= 0) & (sentence_index < S)
    # Invalid tokens go to an extra slot S that is dropped at the end, so that no masking of the values is needed.
    index = torch.where(valid, sentence_index, torch.full_like(sentence_index, S))
    out = token_states.new_zeros(B, S + 1, D)
    reduce = {"max": "amax", "mean": "mean"}[mode]
    # include_self=False: a slot's initial 0 is ignored where tokens arrive and kept where none do.
    out = out.scatter_reduce(1, index.unsqueeze(-1).expand(B, L, D), token_states, reduce=reduce, include_self=False)
    return out[:, :S]


# Word pieces -> words (GLoRIA's and MGCA's text side): a BERT's word-piece states summed per word, vectorised.
def word_tables(tokenizer, punctuation=False):
    """-> (starts, continues): bool per vocabulary id. A word starts at a piece that is neither special nor a '##'
    continuation nor (unless `punctuation`: MGCA keeps punctuation marks as words, GLoRIA-style RECLF drops them)
    punctuation, and continues over the '##' pieces after it."""
    vocab = tokenizer.get_vocab()
    starts, continues = torch.zeros(len(tokenizer), dtype=torch.bool), torch.zeros(len(tokenizer), dtype=torch.bool)
    special = set(tokenizer.all_special_tokens)
    for token, i in vocab.items():
        continues[i] = token.startswith("##")
        starts[i] = not continues[i] and token not in special and (punctuation or any(ch.isalnum() for ch in token))
    return starts, continues


def word_index(input_ids, starts, continues, max_words):
    """input_ids B x L -> the word of every token, B x L (-1: special, punctuation, padding, beyond max_words)."""
    start, cont = starts[input_ids], continues[input_ids]
    index = start.long().cumsum(1) - 1
    return torch.where((start | cont) & (index >= 0) & (index < max_words), index, -1)


def sum_pieces(token_states, index):
    """token states B x L x D, word index B x L -> words B x T x D (GLoRIA and MGCA: the sum of their pieces),
    word mask B x T. A report without a word (every token special, unknown or beyond the cap; real reports against
    a vocabulary of other reports) keeps one empty word, a zero vector marked valid, so that attention over its
    words and its local scores are defined (a similarity of 0) instead of nan (our choice)."""
    B, L, D = token_states.shape
    T = max(int(index.max()) + 1, 1)
    slot = torch.where(index >= 0, index, T)  # non-words go to a dropped extra slot
    words = token_states.new_zeros(B, T + 1, D).scatter_add(1, slot[..., None].expand(B, L, D), token_states)
    return words[:, :T], torch.arange(T, device=index.device) < (index.max(1).values + 1).clamp_min(1)[:, None]


def merged_word_index(input_ids, continues, sep_id, visited=None):
    """GLoRIA's and MGCA's word slots (aggregate_tokens in gloria/models/text_model.py and mgca/models/backbones/
    encoder.py): from [CLS] to the first [SEP], every piece that is not a '##' continuation opens a slot, so [CLS],
    [SEP], [UNK] and punctuation are words. -> slot of every token B x L (-1 after [SEP]); sum_pieces then gives
    the merged sequence. visited = k: only the first k tokens are read (MGCA zips the 112 tokens with its 111
    attention weights): a report whose [SEP] lies beyond them loses [SEP] and the word being read at token k - 1."""
    sep = (input_ids == sep_id).long()
    read = (sep.cumsum(1) - sep) == 0  # up to and including the first [SEP]
    index = torch.where(read, (~continues[input_ids] & read).long().cumsum(1) - 1, -1)
    if visited is not None and input_ids.shape[1] > visited:
        unfinished = ~(sep[:, :visited].bool().any(1))  # the loop ends inside the last word, which is never stored
        index = torch.where(unfinished[:, None] & (index >= index[:, visited - 1:visited]), -1, index)
    return index


def last_layer_cls_attention(bert, hidden_in, attention_mask):
    """The [CLS] row of a BertModel's last self-attention, averaged over the heads, before dropout (MGCA's med.py
    returns the probabilities before its dropout; transformers returns them after): hidden_in B x L x D, the input
    of the last layer (hidden_states[-2]) -> B x L, padding 0."""
    attention = bert.encoder.layer[-1].attention.self
    B, L, D = hidden_in.shape
    heads = bert.config.num_attention_heads
    query = attention.query(hidden_in[:, :1]).view(B, 1, heads, D // heads).transpose(1, 2)
    key = attention.key(hidden_in).view(B, L, heads, D // heads).transpose(1, 2)
    scores = (query @ key.transpose(-1, -2))[:, :, 0] / math.sqrt(D // heads)  # B x heads x L
    return scores.masked_fill(attention_mask[:, None] == 0, float("-inf")).softmax(-1).mean(1)


def report_words(ids, index, tokenizer):
    """The words of one report (word pieces joined, '##' dropped), in word order."""
    words = {}
    for token, w in zip(tokenizer.convert_ids_to_tokens(ids.tolist()), index.tolist()):
        if w >= 0:
            words[w] = words.get(w, "") + token.removeprefix("##")
    return [words[w] for w in sorted(words)]


# ================================================================================================================
# 2. Heads
# ================================================================================================================

class ProjectionHead(nn.Module):
    """LoVT's BN-MLP: Linear -> BN1d -> ReLU -> Linear (norm=None drops the BN: ConVIRT's head), optionally followed
    by BN1d without affine (final_norm="batch": the MGCA head, see mgca_head). Works on B x D and on B x N x D; BN
    statistics are taken over all B*N positions, padded ones included (LoVT's and MGCA's behaviour).
    init "lovt" (philip-mueller/lovt:src/models/components/fc.py:MLP): Kaiming-normal fan_out with ReLU gain for the
    first Linear, linear gain for the second, zero biases; "torch": PyTorch's default init (MGCA).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str | None = "batch",
                 final_norm: str | None = None, init: str = "lovt"):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim)]
        layers += [nn.BatchNorm1d(hidden_dim)] if norm == "batch" else []
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        layers += [nn.BatchNorm1d(out_dim, affine=False)] if final_norm == "batch" else []
        self.net = nn.Sequential(*layers)
        if init == "lovt":
            first, last = [m for m in layers if isinstance(m, nn.Linear)]
            nn.init.kaiming_normal_(first.weight, mode="fan_out", nonlinearity="relu")
            nn.init.kaiming_normal_(last.weight, mode="fan_out", nonlinearity="linear")
            nn.init.zeros_(first.bias)
            nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x B x D or B x N x D -> same leading shape with out_dim channels."""
        return self.net(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def mgca_head(in_dim: int, out_dim: int = 128, hidden_dim: int = 2048) -> ProjectionHead:
    """MGCA's GlobalEmbedding / LocalEmbedding (HKU-MedAI/MGCA:mgca/models/backbones/encoder.py): Linear(in -> 2048)
    -> BN -> ReLU -> Linear(2048 -> 128) -> BN(affine=False), PyTorch default init. The local head is the same with
    Conv1d(kernel 1) over B x C x N, i.e. this head on B x N x C with BN over all B*N tokens (padding included).
    Outputs are not L2-normalised here (ita and mgca_tca normalise, as MGCA.forward does after the heads)."""
    return ProjectionHead(in_dim, hidden_dim, out_dim, final_norm="batch", init="torch")


class AttentionPool(nn.Module):
    """LoVT's GlobalAvgAttentionAggregator: one multi-head attention whose single query is the mean of the tokens.

    Caveat reproduced from LoVT (philip-mueller/lovt:src/models/components/aggregation.py:GlobalAvgAttentionAggregator):
    the query is sum(valid tokens) / N_padded, i.e. divided by the padded length of the batch, not by the number of
    valid tokens. With no mask it is the plain mean.
    """

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x B x N x D, mask B x N bool (True = valid) or None -> (pooled B x D, head-averaged weights B x N;
        the weights sum to 1 over valid tokens and are 0 on invalid ones)."""
        mask = None if mask is None else mask.bool()
        summed = x.sum(1) if mask is None else (x * mask.unsqueeze(-1).to(x.dtype)).sum(1)
        query = (summed / x.shape[1]).unsqueeze(1)  # B x 1 x D, padded-length mean (see class docstring)
        pooled, weights = self.attn(query, x, x, key_padding_mask=None if mask is None else ~mask,
                                    need_weights=True, average_attn_weights=True)
        return pooled.squeeze(1), weights.squeeze(1)


# ================================================================================================================
# 3. Contrastive loss, DDP-correct
# ================================================================================================================

def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """B x ... on each rank -> (world_size * B) x ... in rank order, with gradient: the backward sums every rank's
    contribution (a reduce-scatter). Identity when not distributed. Both .contiguous() guard against all_gather
    giving wrong gradients: for a non-contiguous input (pytorch/pytorch#120386), and (torch 2.14, gloo) for a
    non-contiguous incoming gradient, such as a slot-batched einsum over the gathered tensor produces (tested)."""
    if not distributed():
        return x
    from torch.distributed.nn.functional import all_gather  # autograd-aware collective
    out = torch.cat(all_gather(x.contiguous()), dim=0)
    if out.requires_grad:
        out.register_hook(lambda grad: grad.contiguous())
    return out


def gather_rows(*tensors: torch.Tensor):
    """This process's rows (B x ... each) -> every process's in rank order, with gradient (gather_with_grad; a bool
    mask without), and this process's first row in them: (*gathered, offset = rank x B). One process: (*tensors, 0)."""
    if not distributed():
        return (*tensors, 0)
    gathered = (gather_with_grad(t.float()) > 0 if t.dtype == torch.bool else gather_with_grad(t) for t in tensors)
    return (*gathered, dist.get_rank() * tensors[0].shape[0])


def pad_to_longest_rank(*tensors: torch.Tensor):
    """Zero-pad dim 1 of each tensor (B x L x ...) to the longest L of any process: what is gathered across
    processes needs one length (words of reports of different lengths)."""
    length = torch.tensor(tensors[0].shape[1], device=tensors[0].device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    return tuple(F.pad(t, [0, 0] * (t.dim() - 2) + [0, int(length) - t.shape[1]]) for t in tensors)


def contrastive_ce(logits_a2b: torch.Tensor, logits_b2a: torch.Tensor, offset: int = 0):
    """Both directions of a contrastive loss whose positives lie on a diagonal: logits_a2b B x N scores this
    process's B rows of a against the N columns of b (every process's under DDP, gather_rows), logits_b2a the same
    from b to a; row i's positive is column offset + i. -> (CE(logits_a2b), CE(logits_b2a)). Each method forms its
    own logits (cosine or dot product, temperature, fp32) and weights the directions itself (LoVT 0.75 / 0.25,
    CLIP the mean, MGCA the sum); with DDP's gradient averaging the loss and gradients equal one process on the full
    batch (tested). Under DDP every process must hold the same B (drop_last=True)."""
    labels = torch.arange(logits_a2b.shape[0], device=logits_a2b.device) + offset
    return F.cross_entropy(logits_a2b, labels), F.cross_entropy(logits_b2a, labels)


# ================================================================================================================
# 3b. Word-region attention (AttnGAN DAMSM / GLoRIA; JoImTeRNet, RECLF)
# ================================================================================================================

def fp32(t):
    """At least fp32 (bf16/fp16 features from autocast), float64 stays float64 (the DDP test)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cosine(x, y, eps=1e-8):
    """cos along the last dim with the code's clamp of the norm product (misc/losses.py)."""
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=eps)


def word_region_attention(regions, words, word_mask, gamma1):
    """AttnGAN Eqs. 7-9, text as query. regions ... x R x D, words ... x L x D, word_mask ... x L (bool, True = a
    word that counts); leading dims broadcast. Returns context c (... x L x D) and alpha (... x L x R): alpha[w]
    is word w's distribution over regions (the visualised map). Padded words get no share of the first softmax."""
    a = words @ regions.transpose(-1, -2)                                  # ... x L x R raw affinities (Eq. 7)
    a = a.masked_fill(~word_mask[..., None], float("-inf")).softmax(-2)    # softmax over words, per region (Eq. 8)
    alpha = (gamma1 * a).softmax(-1)                                       # over regions, per word (Eq. 9)
    return alpha @ regions, alpha


def word_region_score(regions, words, word_mask, gamma1, gamma2):
    """R = log sum_w exp(gamma2 cos(E_w, c_w)) over the counted words (Eq. 10, no 1/gamma2). Shapes as above; -> ..."""
    context, _ = word_region_attention(regions, words, word_mask, gamma1)
    rho = cosine(words, context)                                           # ... x L word relevances
    return (gamma2 * rho).masked_fill(~word_mask, float("-inf")).logsumexp(-1)


def word_region_matrix(regions, words, word_mask, gamma1, gamma2, chunk=16, checkpoint_above=2**24):
    """R[i, j] for every image i (I x R x D) and report j (T x L x D, mask T x L) -> I x T, in fp32.

    Memory: the full attention is I x T x L x R (128 x 128 x 160 x 256 = 0.67 G floats, plus an I x T x L x D
    context, ~2.7 GB per tensor in fp32, several alive for backward). Here reports go in chunks of `chunk`,
    each chunk trimmed to its longest report, and under autograd a chunk whose attention has more than
    `checkpoint_above` entries is checkpointed (recomputed in the backward), so the peak is ~ 4 x I x chunk x L x R
    + I x chunk x L x D floats (~1.5 GB at the paper's sizes with chunk 16) instead of all chunks at once. Smaller
    chunks (the CPU demo's 32 x 16 x 60 x 16) keep their activations: recomputing them would cost more than it saves."""
    score = lambda r, w, m: word_region_score(r[:, None], w[None], m[None], gamma1, gamma2)  # I x chunk
    return report_chunks(score, (fp32(regions),), fp32(words), word_mask, (), chunk, checkpoint_above)


def report_chunks(score, images: tuple, words, word_mask, reports: tuple = (), chunk=16, checkpoint_above=2**24):
    """score(*images, words, word_mask, *reports) -> I x T for every image (images[0] I x R x D first) and report
    (words T x L x D, word_mask T x L, reports: more T x ... tensors), `chunk` reports at a time, each chunk trimmed to
    its longest report; under autograd a chunk whose attention (I x chunk x L x R) has more than `checkpoint_above`
    entries is checkpointed (recomputed in the backward). Values and gradients do not depend on the chunking."""
    regions, columns = images[0], []
    for s in range(0, len(words), chunk):
        m = word_mask[s:s + chunk]
        n = int(m.sum(1).max())                                            # drop all-padding tail positions
        inputs = (*images, words[s:s + chunk, :n], m[:, :n], *(r[s:s + chunk] for r in reports))
        big = len(regions) * len(m) * n * regions.shape[-2] > checkpoint_above
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        columns.append(checkpoint(score, *inputs, use_reentrant=False) if grad and big else score(*inputs))
    return torch.cat(columns, 1)


# ================================================================================================================
# 3c. MGCA token-wise cross-modal alignment (TCA), within each image-report pair
# ================================================================================================================

def _clipped_weights(weights, keep):
    """MGCA's token importance (no gradient): per row, the entries where `keep` clipped to the row's [0.1, 0.9]
    quantiles over the kept entries (linear interpolation, torch.quantile), 0 elsewhere, divided by the row sum."""
    w = fp32(weights.detach()).masked_fill(~keep, float("nan"))
    low, high = (torch.nanquantile(w, q, dim=-1, keepdim=True) for q in (0.1, 0.9))
    w = torch.where(keep, torch.minimum(torch.maximum(w, low), high), 0.0)
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)  # a row with nothing kept weighs 0 (MGCA: nan)


def _weighted_diagonal_ce(sim, weights):
    """sim B x M x M (token m vs the attended context of token m'), weights B x M -> the mean over rows and columns
    of sum_b sum_m w_bm CE(target m) / B: MGCA's rearrange "b n1 n2 -> (b n1) n2" and "-> (b n2) n1"."""
    rows = -sim.log_softmax(-1).diagonal(dim1=-2, dim2=-1)
    cols = -sim.log_softmax(-2).diagonal(dim1=-2, dim2=-1)
    return ((rows * weights).sum() + (cols * weights).sum()) / (2 * len(sim))


def mgca_tca(patch_emb, word_emb, word_mask, word_weights, patch_weights=None, tau: float = 0.1):
    """MGCA's token-wise cross-modal alignment (Wang et al. 2022, Sec. 3.3, Eqs. 3-5; HKU-MedAI/MGCA:mgca/models/
    mgca/mgca_module.py:MGCA.forward, lines 124-221 at 680fe4a). Within each pair, with p_j, w_i L2-normalised:

        word side:  o_i = normalize(sum_j softmax_j(w_i . p_j / tau) p_j),   L_ik = w_i . o_k / tau
        patch side: c_j = sum_i softmax_i(p_j . w_i / tau) w_i (padding masked), Q_jl = p_j . c_l / tau
        loss_word  = 1/2 [sum_b sum_i a_bi CE_rows(L_b)_i + sum_b sum_k a_bk CE_cols(L_b)_k] / B, loss_patch alike
                     with the patch weights; MGCA's L_local = loss_word + loss_patch.

    patch_emb B x N x E, word_emb B x T x E (the local heads' outputs at every position, padding included);
    word_mask B x T bool (True = a word, False = padding); word_weights B x T >= 0 (MGCA: the last-layer BERT [CLS]
    attention of each word; 0 = not counted) -> clipped to the [0.1, 0.9] quantiles of the counted entries and
    normalised per sample. patch_weights B x N (the ViT's cls_attn) -> clipped over all N patches and normalised;
    None (a ResNet) -> uniform 1/N. Returns (loss_word, loss_patch). No gradient reaches the weights. As MGCA:
    - each word attends over all patches with no mask; padded words are negatives in the word loss (their head
      outputs are non-zero after the BatchNorm), but are masked on the patch side;
    - the patch-side context c_j is not normalised for a ViT (patch_weights given), normalised for a ResNet.
    Similarities and softmaxes in fp32. Memory B x T x N, no cross-sample terms (no DDP gather)."""
    p, w = F.normalize(fp32(patch_emb), dim=-1), F.normalize(fp32(word_emb), dim=-1)
    word_context = F.normalize((w @ p.mT / tau).softmax(-1) @ p, dim=-1)                  # B x T x E
    loss_word = _weighted_diagonal_ce(w @ word_context.mT / tau, _clipped_weights(word_weights, word_mask
                                                                                  & (word_weights > 0)))
    affinity = (p @ w.mT / tau).masked_fill(~word_mask[:, None, :], float("-inf"))     # B x N x T
    patch_context = affinity.softmax(-1) @ w                                            # B x N x E
    if patch_weights is None:
        patch_context = F.normalize(patch_context, dim=-1)
        patch_weights = p.new_full(p.shape[:2], 1.0 / p.shape[1])
    else:
        patch_weights = _clipped_weights(patch_weights, torch.ones_like(patch_weights, dtype=torch.bool))
    loss_patch = _weighted_diagonal_ce(p @ patch_context.mT / tau, patch_weights)
    return loss_word, loss_patch


# ================================================================================================================
# 4. Metrics
# ================================================================================================================

def _numpy(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def recall_at_k(sim, ks=(1, 5, 10)) -> dict:
    """sim Q x Q (query x gallery, the paired item on the diagonal) -> {"R@k": fraction}.
    rank(q) = 1 + #{g != q : sim[q, g] >= sim[q, q]}: ties count against the query (the pessimistic convention).
    Pass sim for image->text and sim.T for text->image. R@k is nan when the gallery has k items or fewer: every
    query would be in the top k, a 1.0 that says nothing."""
    sim = _numpy(sim)
    positive = np.diag(sim)[:, None]
    beaten = (sim >= positive).sum(1) - 1  # the positive itself always counts once
    return {f"R@{k}": float((beaten + 1 <= k).mean()) if k < len(sim) else float("nan") for k in ks}


def retrieval(sim) -> dict:
    """sim images x reports (the pairs on the diagonal) -> {"i2t_R@k", "t2i_R@k"}: recall_at_k both ways."""
    return {f"{way}_{k}": v for way, s in (("i2t", sim), ("t2i", sim.T)) for k, v in recall_at_k(s).items()}


def block_recall_at_k(sim, block: int = 1000, ks=(1, 5, 10)) -> dict:
    """The "1k" protocol: R@K on consecutive diagonal blocks of `block` pairs, averaged over blocks. An incomplete
    trailing block is dropped (unless it is the only one), so every block has the same gallery size."""
    sim = _numpy(sim)
    n = len(sim)
    starts = range(0, max(n - block, 0) + 1, block) if n >= block else [0]
    per_block = [recall_at_k(sim[s:s + block, s:s + block], ks) for s in starts]
    return {k: float(np.mean([r[k] for r in per_block])) for k in per_block[0]}


def roc_auc(scores, targets) -> float:
    """ROC-AUC = Mann-Whitney U / (n_pos * n_neg) with mid-ranks for ties (a tie counts 1/2).
    targets: 1 positive, 0 negative; anything else (nan unknown, -1 uncertain) is ignored. nan if a class is absent."""
    scores, targets = _numpy(scores).ravel(), _numpy(targets).ravel()
    keep = (targets == 0) | (targets == 1)
    scores, positive = scores[keep], targets[keep] == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    midrank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tied group
    rank_sum = midrank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_at_k(sim, query_labels, gallery_labels, ks=(1, 5, 10)) -> dict:
    """Class-based retrieval (GLoRIA's CheXpert 5x200 sets and Precision@K; MGCA builds the same sets): sim Q x G,
    integer classes Q and G -> {"P@k": mean over queries of the fraction of the top-k gallery items with the query's
    class}."""
    sim, query_labels, gallery_labels = _numpy(sim), np.asarray(query_labels), np.asarray(gallery_labels)
    order = np.argsort(-sim, axis=1, kind="stable")  # Q x G, best first
    hits = gallery_labels[order] == query_labels[:, None]
    return {f"P@{k}": float(hits[:, :k].mean()) for k in ks}


def bootstrap_ci(metric, *arrays, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of metric(*arrays) over resampled rows (1,000 resamples, as
    CheXzero reports its intervals). Resamples where the metric is nan (e.g. a class absent) are skipped; nan, nan
    if every one is (a class absent from the whole test set)."""
    arrays = [_numpy(a) for a in arrays]
    rng = np.random.default_rng(seed)
    values = [metric(*[a[idx] for a in arrays]) for idx in rng.integers(0, len(arrays[0]), (n, len(arrays[0])))]
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).all():
        return float("nan"), float("nan")
    low, high = np.nanpercentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


def zero_shot_auc_ci(pos_scores, neg_scores, labels, names=None, n_boot: int = 1000, seed: int = 0) -> dict:
    """Zero-shot AUC with bootstrap 95 % intervals from any pair score (a cosine, a local or a combined score):
    pos/neg_scores N x C (image n vs the prompts "c" / "no c"), labels N x C -> {name: (auc, low, high)}.
    CheXzero's pair prompts (rajpurkarlab/CheXzero:zero_shot.py:run_softmax_eval) score p_c = softmax over (pos, neg)
    = sigmoid(pos - neg), monotone in pos - neg (a temperature would not change it), so the AUC is that of pos - neg;
    every method of the suite reports its zero-shot table through this one function, with the same resamples for
    every score."""
    margin, labels = _numpy(pos_scores) - _numpy(neg_scores), _numpy(labels)
    names = names or [str(c) for c in range(labels.shape[1])]
    return {name: (roc_auc(margin[:, c], labels[:, c]),
                   *bootstrap_ci(roc_auc, margin[:, c], labels[:, c], n=n_boot, seed=seed))
            for c, name in enumerate(names)}


def mean_auc(margins, labels) -> float:
    """The mean zero-shot AUC over the findings that have both outcomes (margins, labels N x C); nan if none has."""
    values = [roc_auc(margins[:, c], labels[:, c]) for c in range(labels.shape[1])]
    return float(np.nanmean(values)) if not all(map(math.isnan, values)) else math.nan


def zero_shot_summary(pos_scores, neg_scores, labels, names, n_boot: int = 1000) -> dict:
    """The zero_shot entry of every eval.json: {finding: [auc, low, high]} (zero_shot_auc_ci) for the findings with
    both outcomes, and "mean": their mean AUC with its bootstrap interval (the same resamples)."""
    margin, labels = _numpy(pos_scores) - _numpy(neg_scores), _numpy(labels)
    ci = zero_shot_auc_ci(pos_scores, neg_scores, labels, names, n_boot)
    out = {name: list(v) for name, v in ci.items() if not math.isnan(v[0])}
    out["mean"] = [mean_auc(margin, labels), *bootstrap_ci(mean_auc, margin, labels, n=n_boot)]
    return out


def save_results(path: str, results: dict, **extra):
    """Every method's eval.json: results {model: dict(retrieval={"i2t_R@1": ..}, zero_shot=zero_shot_summary(..)
    or {}, checks={the method's own numbers})} with at least "untrained" and "trained", plus `extra` top-level
    entries (e.g. LRCLR's paired differences). Printed as one table (print_comparison), zero-shot as auc_<finding>
    with its interval, then written to `path`."""
    flat = {}
    for model, r in results.items():
        row = dict(r.get("retrieval", {}))
        for name, (auc, low, high) in r.get("zero_shot", {}).items():
            row.update({f"auc_{name}": auc, f"auc_{name}_low": low, f"auc_{name}_high": high})
        flat[model] = {**row, **r.get("checks", {})}
    print_comparison(flat)
    with open(path, "w") as f:
        json.dump({**results, **extra}, f, indent=1)


def global_zero_shot_scores(model, images, prompts) -> dict:
    """The global cosine of every image with every prompt, the zero-shot score of LoVT, JoImTeRNet and PLACE:
    images B x 1 x H x W, prompts a collated text batch of P prompts -> {"global": B x P}."""
    return {"global": model.encode_image(images) @ model.encode_text(prompts).T}


@torch.no_grad()
def external_zero_shot(models, dataset, tokenizer, device, score=global_zero_shot_scores, n_boot: int = 1000,
                       workers: int = 0, batch_size: int = 64) -> dict:
    """Zero-shot AUC on a labelled image set other than the training data (data.LabelledImages, --zero-shot-csv),
    with the pair prompts of the held-out evaluation ("c" / "no c" for the CheXpert findings but No Finding).
    models {name: model}; score(model, images, prompts) -> {kind: B x 2C} is the method's own image-prompt score
    against the C positive then the C negative prompts (one kind, or several: LRCLR's global / local /
    global+local). -> dict(ci={column: {finding: (auc, low, high), ..., "mean": (auc, low, high)}},
    margins={column: N x K}, labels N x K, names [K]) over the K findings with positive and negative images (the
    others have no AUC); a column is the model's name, or "name kind" for a model scored several ways. The intervals
    are zero_shot_auc_ci's, as in every method's held-out table, with the same resamples in every column (so two
    columns can be paired); the mean's is bootstrapped the same way."""
    names, phrases = data.zero_shot_findings(False)
    prompts = to_device(data.prompt_batch(phrases + [f"no {p}" for p in phrases], tokenizer), device)
    for model in models.values():
        model.eval()
    scores, labels, C = {}, [], len(names)
    for batch in DataLoader(dataset, batch_size, num_workers=workers):  # each image decoded once for every model
        images = batch["image"].to(device)
        labels.append(batch["labels"][:, 1:])  # CHEXPERT_LABELS order; No Finding (inverted by the pair) left out
        for name, model in models.items():
            for kind, s in score(model, images, prompts).items():
                scores.setdefault((name, kind), []).append(fp32(s).cpu())
    labels = torch.cat(labels).double().numpy()
    counted = [c for c in range(C) if (labels[:, c] == 1).any() and (labels[:, c] == 0).any()]
    kinds = collections.Counter(name for name, _ in scores)
    result = dict(ci={}, margins={}, labels=labels[:, counted], names=[names[c] for c in counted])
    for (name, kind), s in scores.items():
        column = name if kinds[name] == 1 else f"{name} {kind}"
        s = torch.cat(s).double().numpy()
        pos, neg = s[:, counted], s[:, [C + c for c in counted]]
        result["margins"][column] = margin = pos - neg
        ci = zero_shot_auc_ci(pos, neg, result["labels"], result["names"], n_boot)
        ci["mean"] = (mean_auc(margin, result["labels"]),
                      *bootstrap_ci(mean_auc, margin, result["labels"], n=n_boot))
        result["ci"][column] = ci
    return result


def score_external(out: str, external, models: dict, tokenizer, device, args, score=global_zero_shot_scores):
    """The end of a run with --zero-shot-csv: external_zero_shot of the models (untrained, trained) on the set at
    --n-boot with --workers, printed and added to out/eval.json (save_external_zero_shot); nothing without a set."""
    if external is not None:
        zero_shot = external_zero_shot(models, external, tokenizer, device, score, n_boot=args.n_boot,
                                       workers=args.workers)
        save_external_zero_shot(out, external, zero_shot["ci"])


def save_external_zero_shot(out: str, dataset, ci: dict, **extra):
    """external_zero_shot's intervals ci -> the table (AUC per finding and their mean, a column per model and score,
    then each column's mean with its 95 % interval) printed, and out/eval.json's "zero_shot_csv" entry: the CSV, its
    number of images, ci as zero_shot_ci, and `extra` (LRCLR: the paired differences)."""
    findings = len(next(iter(ci.values()))) - 1
    print(f"zero-shot AUC on {dataset.csv_path} ({len(dataset)} images other than the training data; {findings} "
          f"findings with positive and negative images; pair prompts \"x\" / \"no x\"):")
    print_comparison({column: {f"auc_{name}": v[0] for name, v in c.items()} for column, c in ci.items()})
    print("mean zero-shot AUC [bootstrap 95 % CI]: " + ", ".join(
        f"{column} {c['mean'][0]:.3f} [{c['mean'][1]:.3f}, {c['mean'][2]:.3f}]" for column, c in ci.items()))
    path = os.path.join(out, "eval.json")
    with open(path) as f:
        results = json.load(f)
    results["zero_shot_csv"] = dict(csv=os.path.abspath(dataset.csv_path), images=len(dataset), zero_shot_ci=ci,
                                    **extra)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def heat_overlay(gray: torch.Tensor, heat: torch.Tensor, size: int = 256, mode: str = "bilinear") -> Image.Image:
    """A viz panel: gray H x W in [0, 1] (the film) and a map h x w, both resized to size x size (the map with
    `mode`), the map rescaled to [0, 1] (relative: red = its highest), the film dimmed by half under it and red added."""
    gray = F.interpolate(gray[None, None].float().cpu(), size=size, mode="bilinear")[0, 0] * 255
    heat = F.interpolate(heat[None, None].float().cpu(), size=size, mode=mode)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    dim = gray * (1 - 0.5 * heat)
    return Image.fromarray(torch.stack([dim + 127.5 * heat, dim, dim], -1).round().byte().numpy())


def save_panels(panels: list, captions: list, path: str, width: int = 40, lines: int = 4):
    """Square panels (PIL images of one size) side by side, each caption wrapped under its panel, as one PNG."""
    size = panels[0].size[0]
    canvas = Image.new("RGB", (size * len(panels), size + 14 * lines + 4), "white")
    for k, (panel, caption) in enumerate(zip(panels, captions)):
        canvas.paste(panel, (size * k, 0))
        ImageDraw.Draw(canvas).text((size * k + 4, size + 2), "\n".join(textwrap.wrap(caption, width)[:lines]),
                                    fill="black")
    canvas.save(path)


# ================================================================================================================
# 5. Plumbing: arguments, distributed, data loading, seeds, AMP, schedules
# ================================================================================================================

def arg(default, help: str = ""):
    """Dataclass field with a help string: `lr: float = arg(1e-4, "peak learning rate")`. Lists get a factory."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class _BoolFlag(argparse.Action):
    """`--name` sets True and `--no-name` False. argparse.BooleanOptionalAction reads every flag that starts with
    `--no-` as the negative one, so a field named no_local could never be switched on by `--no-local`."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__([option_strings[0], "--no-" + option_strings[0][2:]], dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string == self.option_strings[0])

    def format_usage(self):
        return " | ".join(self.option_strings)


@dataclass
class RunArgs:
    """What every method's Args shares, with one name, meaning and default: the data, the run, the evaluation. A
    method's Args subclasses it and adds its own fields (the paper's names and defaults)."""
    preset: str | None = arg(None, "a named set of the method's overrides (default: demo without --data, else paper)")
    # data
    data: str = arg("synthetic", "synthetic | synthetic-faint | mimic | csv")
    data_root: str = arg("", "mimic: the prepare-mimic cache folder; csv: the pairs CSV")
    train_samples: int = arg(0, "use only the first N training pairs (0 = all; synthetic: how many are generated)")
    eval_samples: int = arg(0, "use only the first N validation / test pairs (0 = all; synthetic: 500)")
    skip_bad: bool = arg(False, "skip unreadable / inconsistent records and count them (else stop and list them)")
    augment: bool = arg(True, "the method's training augmentation (its docstring); off: the training view resized "
                              "to --image-size (data.train_view)")
    # run
    out_dir: str = arg("", "run folder (default runs/<method>-<time>)")
    resume: bool = arg(False, "continue from ckpt.pt in --out-dir")
    max_steps: int = arg(0, "stop after this many optimizer steps (0 = no limit)")
    bench: int = arg(0, "time N optimizer steps on synthetic data, print throughput, exit")
    seed: int = arg(12345, "seed (model init identical on every rank; data order uses seed + rank)")
    workers: int = arg(8, "DataLoader workers per process")
    device: str = arg("", "cuda | cpu (default: cuda if available)")
    precision: typing.Literal["auto", "bf16", "fp16", "fp32"] = arg("auto", "auto: bf16/fp16 on GPU, fp32 on CPU")
    ckpt_every: int = arg(500, "write ckpt.pt every N optimizer steps (and at every epoch end)")
    log_every: int = arg(10, "log every N optimizer steps")
    # evaluation (after training, in fp32)
    viz: int = arg(4, "write the method's pictures for this many test images (0 = none)")
    n_boot: int = arg(1000, "bootstrap resamples of the zero-shot intervals (CheXzero: 1,000)")
    zero_shot_csv: str = arg("", "external zero-shot set: a CSV of images (column image or Path, relative to the "
                                 "CSV) with CheXpert label columns, checked at the start and scored at the end")


def _flag_kwargs(tp) -> dict:
    """argparse keywords for a type annotation: bool, int/float/str, Literal, tuple/list, Optional[...]."""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return dict(action=_BoolFlag)
    if origin in (typing.Union, types.UnionType) and type(None) in targs:
        kw = _flag_kwargs(next(t for t in targs if t is not type(None)))
        if "action" in kw:  # Optional[bool]: the flag pair already covers it
            return kw
        base = kw.get("type", str)
        kw["type"] = lambda s, base=base: None if s.lower() == "none" else base(s)
        return kw
    if origin is typing.Literal:
        return dict(choices=targs, type=type(targs[0]))
    if origin in (tuple, list):
        variadic = origin is list or not targs or targs[-1] is Ellipsis
        return dict(nargs="+" if variadic else len(targs), type=targs[0] if targs else str)
    return dict(type=tp)


def parse_args(ArgsClass, presets: dict | None = None, argv=None, default_preset: str | None = None):
    """Args dataclass -> argparse flags -> instance. Each field `some_name` becomes `--some-name` (bools also
    `--no-some-name`; tuples take several values; Optional accepts `none`), help from field(metadata={"help"})
    (see `arg`). `--preset NAME` applies presets[NAME] (a dict of field overrides) first; explicit flags win.
    If the dataclass has a `preset` field it receives the preset's name. default_preset is used when argv names
    neither --preset nor --data: the methods' one rule, `python lovt.py` alone runs the synthetic demo."""
    presets = presets or {}
    argv = list(sys.argv[1:] if argv is None else argv)
    if default_preset and not any(a.split("=")[0] in ("--preset", "--data") for a in argv):
        argv = ["--preset", default_preset, *argv]
    hints = typing.get_type_hints(ArgsClass)
    fields = [f for f in dataclasses.fields(ArgsClass) if f.init]
    parser = argparse.ArgumentParser(description=(ArgsClass.__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if "preset" not in {f.name for f in fields}:
        parser.add_argument("--preset", default=None, choices=sorted(presets), help="named set of overrides")
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(_flag_kwargs(hints[f.name]), default=default, help=f.metadata.get("help", ""))
        if f.name == "preset":
            kw["choices"] = sorted(presets)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    # Two passes: find the preset, make its values the defaults, then parse again so explicit flags win.
    chosen = parser.parse_known_args(argv)[0].preset
    if chosen is not None:
        unknown = set(presets[chosen]) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"preset {chosen} sets unknown fields {sorted(unknown)}")
        parser.set_defaults(**presets[chosen])
    values = vars(parser.parse_args(argv))
    values = {f.name: tuple(values[f.name]) if typing.get_origin(hints[f.name]) is tuple and values[f.name]
              is not None else values[f.name] for f in fields}
    return ArgsClass(**values)


@dataclass
class Dist:
    """Where this process runs: rank 0 (is_main) does all I/O."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    distributed: bool = False


def setup_distributed(device: str | None = None) -> Dist:
    """torchrun (RANK set) -> init_process_group (nccl on CUDA, gloo on CPU or on shared GPUs) and one GPU per
    process; otherwise a single process on `device` (default: cuda if available, else cpu). Also switches TF32
    matmuls on."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; cuDNN convolutions use TF32 by default
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    # more processes than GPUs (tests/gpu_bench.sh: 2 on one GPU): they share the GPUs over gloo, as NCCL refuses
    # two ranks on one device
    shared = cuda and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > torch.cuda.device_count()
    dev = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    nccl = cuda and not shared
    dist.init_process_group("nccl" if nccl else "gloo", device_id=dev if nccl else None)
    return Dist(rank, world, local, dev, rank == 0, True)


def cleanup_distributed():
    """End the process group after a barrier (every rank calls it). What a run does after it (export, evaluation,
    pictures) runs on rank 0 alone and reaches no collective: a gather there would wait for ranks that have left."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def micro_batches_per_step(accum: int, world_size: int, batch_size: int | None = None) -> int:
    """--accum, the whole job's micro-batches per optimizer step -> this process's. Each of the world_size processes
    does accum / world_size, so a recipe's pairs per step (batch_size x accum) are the same on 1 GPU or 8 (nanoGPT's
    rule). accum 1 means no accumulation: one micro-batch per process on any number of processes (world_size x
    batch_size pairs per step). Any other accum that world_size does not divide stops the run with the nearest valid
    --accum values and, where one exists, a --batch-size / --accum pair that keeps the recipe's pairs per step."""
    if accum == 1 or accum % world_size == 0:
        return max(1, accum // world_size)
    low, high = accum // world_size * world_size, -(-accum // world_size) * world_size
    options = " or ".join(f"--accum {a}" for a in (low, high) if a > 0)
    keep = ""
    if batch_size:
        pairs = batch_size * accum
        fits = [a for a in range(world_size, pairs + 1, world_size) if pairs % a == 0]
        if fits:
            a = min(fits, key=lambda a: abs(a - accum))
            keep = f", or keep its {pairs} pairs per step with --batch-size {pairs // a} --accum {a}"
    raise SystemExit(f"--accum {accum} counts the whole job's micro-batches per optimizer step, and the {world_size} "
                     f"processes cannot share it evenly: pass {options}{keep}.")


def accumulation(micro: int, n_micro: int, per_step: int) -> tuple[bool, int]:
    """Micro-batch `micro` (1-based, counted within the epoch) of the epoch's `n_micro`, `per_step` of them per
    optimizer step -> (whether it ends an optimizer step, how many micro-batches that step has). Divide each loss by
    the second so that a step's gradient is the mean over its micro-batches, also in an epoch's shorter last step."""
    first = (micro - 1) // per_step * per_step
    size = min(per_step, n_micro - first)
    return micro - first == size, size


def run_folder(out_dir: str, method: str, ddp: Dist, args=None) -> str:
    """The run folder: out_dir, or a new runs/<method>-<YYYYmmdd-HHMMSS> (rank 0 names it, every rank gets the same
    name, and two runs never share a metrics.csv). Rank 0 creates it and writes args.json (the resolved args)."""
    name = out_dir
    if not name and ddp.is_main:
        name = stem = time.strftime(f"runs/{method}-%Y%m%d-%H%M%S")
        for k in itertools.count(2):  # a run started in the same second
            if not os.path.exists(name):
                break
            name = f"{stem}-{k}"
    if ddp.distributed and not out_dir:
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    if ddp.is_main:
        os.makedirs(name, exist_ok=True)
        if args is not None:
            with open(os.path.join(name, "args.json"), "w") as f:
                json.dump(plain(args), f, indent=1)
    return name


class ResumableSampler(DistributedSampler):
    """DistributedSampler (order = f(seed, epoch)) that can start an epoch after its first `skip` indices: on resume,
    the batches the killed run already trained on in that epoch are not seen twice."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


def datasets(args, tokenizer=None):
    """A run's data: the training, validation and test sets (data.make_dataset on --data / --data-root, with
    --train-samples / --eval-samples / --skip-bad; training views at --image-size), the training set's pixel
    statistics (mean, std), the tokenizer (data.report_tokenizer of --text-model unless given: tokenizer(train_set))
    and the --zero-shot-csv set, read now so that a bad file stops the run before it trains.
    -> (train_set, val_set, test_set, (mean, std), tokenizer, external or None)."""
    data.check_data_root(args.data, args.data_root)

    def dataset(split, num_samples):
        return data.make_dataset(args.data, args.data_root, split, args.image_size, train=split == "train",
                                 num_samples=num_samples or None, skip_bad=args.skip_bad)
    train_set = dataset("train", args.train_samples)
    val_set, test_set = dataset("validate", args.eval_samples), dataset("test", args.eval_samples)
    mean, std = train_set.mean, train_set.std
    tokenizer = tokenizer(train_set) if tokenizer else data.report_tokenizer(args.text_model, train_set)
    external = (data.LabelledImages(args.zero_shot_csv, args.image_size, mean, std, args.skip_bad)
                if args.zero_shot_csv else None)
    return train_set, val_set, test_set, (mean, std), tokenizer, external


def loaders(args, ddp, train_set, val_set, test_set, collate, train_collate=None):
    """The training loader (a ResumableSampler: the order is a function of (seed, epoch), and a resumed run
    continues mid-epoch; its workers' seeds come from a generator of its own, reseeded every epoch by the loop, never
    from the global RNG), the validation loader (split over the ranks) and the test loader (rank 0), all at
    --batch-size with --workers. train_collate: the training batches' collate if not `collate` (LoVT's sentence
    swaps). -> (sampler, train, val, test)."""
    sampler = ResumableSampler(train_set, ddp.world_size, ddp.rank, shuffle=True, seed=args.seed, drop_last=True)
    train = DataLoader(train_set, args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True,
                       collate_fn=train_collate or collate, generator=torch.Generator(),
                       pin_memory=ddp.device.type == "cuda")
    val = DataLoader(val_set, args.batch_size, num_workers=args.workers, collate_fn=collate,
                     sampler=DistributedSampler(val_set, ddp.world_size, ddp.rank, shuffle=False))
    test = DataLoader(test_set, args.batch_size, collate_fn=collate, num_workers=args.workers)
    return sampler, train, val, test


def to_device(batch: dict, device) -> dict:
    """The tensors of a batch dict on `device` (non-blocking from pinned memory); lists and strings as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def wrap_ddp(model: nn.Module, ddp: Dist, **kwargs) -> nn.Module:
    """The model in DistributedDataParallel under torchrun (one device per process), else the model itself."""
    if not ddp.distributed:
        return model
    ids = [ddp.device] if ddp.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, ids, **kwargs)


def count_parameters(optimizer) -> int:
    """Parameters the optimizer trains (frozen ones are not passed to it)."""
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def seed_everything(seed: int):
    """Seed python, numpy and torch (all devices). Use `seed` for model init (same on every rank), then
    seed_everything(seed + rank) for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Mixed precision policy. precision "auto": bf16 on CUDA where supported, else fp16 (needs the GradScaler);
    None (no autocast) on CPU. "bf16" / "fp16" / "fp32" force a choice."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for `dtype`, or a no-op for None. Losses cast their logits to fp32 themselves."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """GradScaler, enabled only for fp16 (bf16 has fp32's exponent range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def per_epoch_cosine(optimizer, steps_per_epoch: int):
    """LoVT's `cosine_annealing_per_epoch`: CosineAnnealingLR(T_max = optimizer steps per epoch, eta_min = 0),
    stepped after every optimizer step and never reset. PyTorch continues the cosine past T_max, so the LR is a
    wave with a 2-epoch period: lr_t = base * (1 + cos(pi * t / T_max)) / 2 (falls to 0 in epoch 1, rises back)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps_per_epoch, eta_min=0.0)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
    """Linear warm-up to each group's base LR over `warmup_steps` (lr = base * (t+1) / warmup_steps), then a cosine
    decay to `min_lr` at `total_steps` (MGCA: 40 % warm-up, min 1e-8); stepped after every optimizer step."""
    def factor(base_lr):
        def f(t):
            if t < warmup_steps:
                return (t + 1) / warmup_steps
            progress = min(1.0, (t - warmup_steps) / max(1, total_steps - warmup_steps))
            return (min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))) / base_lr
        return f
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])


# ================================================================================================================
# 6. Training run: checkpoints and resume, logging, validation, the end of a run, export
# ================================================================================================================

def plain(obj):
    """Args and nested values -> what torch.load(weights_only=True) accepts: dataclasses become dicts, tensors,
    containers and python scalars stay, numpy scalars become python numbers, anything else (paths...) a string."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj if obj is None or torch.is_tensor(obj) or isinstance(obj, (bool, int, float, str)) else str(obj)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values (weights_only-safe)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = dict(python=[version, list(internal), gauss], torch=torch.get_rng_state(),
                 numpy=dict(key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                            pos=np_state["state"]["pos"], has_gauss=np_state["has_gauss"], gauss=np_state["gauss"]))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(checkpoint: dict, rank: int = 0):
    """Restore the RNG streams saved by save_checkpoint (rank 0's). Other ranks cannot continue rank 0's streams,
    so they reseed deterministically from the step and their rank."""
    if rank != 0:
        seed_everything(int(checkpoint.get("step", 0)) * 1009 + rank)
        return
    s = checkpoint["rng"]
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state(dict(bit_generator="MT19937", has_gauss=n["has_gauss"], gauss=n["gauss"],
                             state=dict(key=n["key"].numpy().astype(np.uint32), pos=n["pos"])))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _atomic_save(obj, path: str):
    """torch.save to a temporary file in the same folder, then os.replace (atomic on POSIX and Windows)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, state: dict):
    """Write `state` (model / optimizer / scaler / scheduler state dicts, step, epoch, args, ...) plus the current RNG
    states (key "rng") atomically, so a run killed mid-write leaves the previous checkpoint intact. `args` and the
    other non-dict values pass through `plain` (an Args dataclass becomes a dict); state dicts are kept as they are."""
    state = {k: plain(v) if k == "args" or not isinstance(v, dict) else v for k, v in state.items()}
    _atomic_save(dict(state, rng=rng_state()), path)


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load what save_checkpoint wrote, with weights_only=True (no arbitrary code from pickles)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _append_csv(path: str, row: dict):
    """Append a row; the columns are fixed by the file's header (or by this row if the file is new)."""
    columns = None
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as fh:
            columns = next(csv.reader(fh))
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns or list(row), extrasaction="ignore")
        if columns is None:
            writer.writeheader()
        writer.writerow(row)


class Logger:
    """tqdm progress (rank 0) and CSV logs in run_dir. Wrap the loader with `iterate` to measure the data wait:

        for batch in logger.iterate(loader):
            ...; logger.add(terms, images=B * world)      # every (micro-)step: the loss terms, detached
            logger.log(step, epoch, {"lr": lr})            # every log_every steps: one metrics.csv row

    log() writes the metrics given, the mean of every added term since the previous row (`loss` as loss/total, a
    term t as loss/t; add() keeps tensors on their device, so logging costs one sync per row, not per step) and
    perf/img_per_s (the images added) and perf/data_wait_frac over that interval, and perf/cpu_s, the process's CPU
    seconds (all threads) since the logger was made: the training loop's cost, whatever else shares the machine
    (counted from the resumed step on resume). On resume (start_step > 0) rows
    past start_step from the killed run are dropped, then rows are appended; `pending` (state_dict() as saved in
    the checkpoint) restores the sums of the interval in progress, so that a resumed run logs the same means as one
    that was never stopped, wherever the checkpoint fell between two rows. write(name, row) appends to another CSV
    (e.g. val.csv)."""

    def __init__(self, run_dir: str, is_main: bool, total_steps: int, start_step: int = 0, pending: dict | None = None):
        self.run_dir, self.is_main = run_dir, is_main
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not is_main, dynamic_ncols=True)
        self.path, self.wait, self.last = os.path.join(run_dir, "metrics.csv"), 0.0, time.perf_counter()
        self.sums, self.images, self.cpu_start = dict(pending or {}), 0, time.process_time()
        if is_main and start_step > 0 and os.path.exists(self.path):
            with open(self.path, newline="") as fh:
                rows = list(csv.reader(fh))
            with open(self.path, "w", newline="") as fh:
                csv.writer(fh).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= start_step])

    def iterate(self, loader):
        iterator = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield batch

    def state_dict(self) -> dict:
        """The interval in progress: {term: (sum, count)} of what was added since the last row (plain numbers)."""
        return {k: (float(total), n) for k, (total, n) in self.sums.items()}

    def add(self, terms: dict, images: int = 0):
        for k, v in terms.items():
            total, n = self.sums.get(k, (0.0, 0))
            self.sums[k] = (total + (v.detach() if torch.is_tensor(v) else v), n + 1)
        self.images += images

    def log(self, step: int, epoch: int, metrics: dict):
        now = time.perf_counter()
        elapsed, self.last = max(now - self.last, 1e-9), now
        means = {"loss/total" if k == "loss" else f"loss/{k}": float(t / n) for k, (t, n) in self.sums.items()}
        row = {"step": step, "epoch": epoch, **{k: float(v) for k, v in metrics.items()}, **means,
               "perf/img_per_s": self.images / elapsed, "perf/data_wait_frac": min(self.wait / elapsed, 1.0),
               "perf/cpu_s": time.process_time() - self.cpu_start}
        self.wait, self.sums, self.images = 0.0, {}, 0
        if self.is_main:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{row.get('loss/total', math.nan):.4f}", img_s=f"{row['perf/img_per_s']:.1f}",
                                 wait=f"{100 * row['perf/data_wait_frac']:.0f}%")
            _append_csv(self.path, row)

    def write(self, name: str, row: dict):
        if self.is_main:
            _append_csv(os.path.join(self.run_dir, name), {k: float(v) if torch.is_tensor(v) else v
                                                           for k, v in row.items()})

    def close(self):
        self.bar.close()


@torch.no_grad()
def validation_loss(model, loader, device, amp) -> float:
    """The mean of model(batch)["loss"] over a loader, weighted by batch size and summed over the ranks (each rank
    passes its DistributedSampler share), in eval mode."""
    model.eval()
    total = torch.zeros(2, device=device)  # sum of loss * n, n
    for batch in loader:
        with autocast(device, amp):
            loss = model(to_device(batch, device))["loss"].float()
        total += torch.stack([loss * len(batch["images"]), torch.tensor(float(len(batch["images"])), device=device)])
    if distributed():
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def check_finite(loss: torch.Tensor, step: int, ckpt_path: str, terms: dict | None = None):
    """Stop with a clear error if the loss is NaN/inf (one GPU sync: call it every step or on log steps)."""
    if not torch.isfinite(loss).item():
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in (terms or {}).items())
        raise FloatingPointError(f"non-finite loss {float(loss)} at step {step} ({detail or 'no terms given'}). "
                                 f"The last good checkpoint is {ckpt_path}: resume from it with a lower learning "
                                 f"rate or another precision (fp32, or bf16 instead of fp16).")


@contextmanager
def after_training(run_dir: str):
    """Around what follows training (evaluation, pictures), which runs once the checkpoint and the exported encoders
    are on disk: a failure there, on something real data brings, is one message naming what is saved and how to
    evaluate again (the same command with --resume, which trains no further), not a traceback that seems to lose
    the run. The traceback goes to run_dir/eval_error.txt."""
    try:
        yield
    except Exception as e:
        path = os.path.join(run_dir, "eval_error.txt")
        with open(path, "w") as f:
            traceback.print_exc(file=f)
        raise SystemExit(f"\nEvaluation failed after training: {type(e).__name__}: {e}\nThe trained run is saved in "
                         f"{run_dir} (ckpt.pt, image_encoder.pt, text_encoder/); the traceback is in {path}. Once the "
                         f"cause is fixed, run the same command with --resume --out-dir {run_dir} to evaluate it "
                         f"again without training.\n") from e


def bench_args(args, **overrides):
    """--bench N: the same run for N + 1 optimizer steps on synthetic data in a temporary folder, logged only at the
    first step and the last (so the last metrics.csv row times the N steps after the warm-up one)."""
    return dataclasses.replace(args, data="synthetic", out_dir=tempfile.mkdtemp(prefix="bench-"), resume=False,
                               max_steps=args.bench + 1, log_every=10**9, **overrides)


def print_bench(run_dir: str, images_per_step: int, device: torch.device, amp: torch.dtype | None):
    """The --bench result, from the last metrics.csv row: images/s, data-wait share and peak memory."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        row = list(csv.DictReader(f))[-1]
    speed = float(row["perf/img_per_s"])
    print(f"bench: {speed:.1f} images/s ({images_per_step / speed:.2f} s per step of {images_per_step} images), "
          f"data wait {100 * float(row['perf/data_wait_frac']):.0f} %, peak memory {peak_memory_mb(device):.0f} MB "
          f"({device}, {amp or torch.float32})")


class TrainingRun:
    """The plumbing around a method's training loop, which stays written out in its main():

        run = common.TrainingRun(args, ddp, out, total_steps, model=model, optimizer=optimizer, scaler=scaler, ...)
        while not run.done:                                   # epochs, --max-steps, early stopping (--patience)
            run.start_epoch(loader)
            for batch in run.logger.iterate(loader):
                ...                                           # forward, backward, optimizer step
                if run.stepped(lambda: {"lr": ...}):          # log row, ckpt.pt every --ckpt-every; True at the end
                    break
            else:
                run.end_epoch(common.validation_loss(model, val_loader, device, amp), model)
        run.export(model, lambda: common.export_encoders(...))  # ckpt.pt, the best weights, the export
        return run.evaluate(lambda: finish(...))                # rank 0 alone, failures kept apart from the run

    ckpt.pt holds the state_dict() of each `stateful` object under its name, `progress` (step, epoch, micro: the
    micro-batches of this epoch done, best_val, bad_epochs; or a method's own counters), the args, the logger's
    interval and the RNG states, written atomically; --resume restores all of it. Without --resume each rank is
    seeded apart (seed + rank: data order, augmentation, dropout). best.pt holds the weights of the best validation
    loss, which export() loads before exporting. `extra()`: more to save in ckpt.pt (JoImTeRNet's task RNG)."""

    def __init__(self, args, ddp: Dist, out: str, total_steps: int, progress: dict | None = None, log_step="step",
                 extra=dict, **stateful):
        self.args, self.ddp, self.out, self.stateful, self.extra = args, ddp, out, stateful, extra
        self.ckpt_path, self.best_path = os.path.join(out, "ckpt.pt"), os.path.join(out, "best.pt")
        self.progress = progress or dict(step=0, epoch=0, micro=0, best_val=math.inf, bad_epochs=0)
        self.resumed = {}
        if args.resume:
            if not os.path.exists(self.ckpt_path):
                raise SystemExit(f"--resume: no checkpoint at {self.ckpt_path} (pass the killed run's --out-dir)")
            self.resumed = load_checkpoint(self.ckpt_path)
            for name, obj in stateful.items():
                obj.load_state_dict(self.resumed[name])
            self.progress.update({k: self.resumed[k] for k in self.progress})
            restore_rng(self.resumed, ddp.rank)
        else:
            seed_everything(args.seed + ddp.rank)
        self.logger = Logger(out, ddp.is_main, total_steps, self.progress[log_step], self.resumed.get("logger"))

    @property
    def done(self) -> bool:
        p, a = self.progress, self.args
        return (p["epoch"] >= a.epochs or p["step"] >= (a.max_steps or math.inf)
                or p.get("bad_epochs", 0) >= getattr(a, "patience", math.inf))

    def start_epoch(self, loader, batches_done=None):
        """The training loader at this epoch: its order (a function of seed and epoch), the batches a resumed run
        already trained on (default: progress["micro"]) skipped, its workers' seeds."""
        epoch, done = self.progress["epoch"], self.progress["micro"] if batches_done is None else batches_done
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = done * loader.batch_size
        loader.generator.manual_seed(self.args.seed + 1000 * epoch + self.ddp.rank)

    def stepped(self, log_values) -> bool:
        """After an optimizer step: count it; a metrics.csv row of log_values() (and the terms' means) every
        --log-every steps, the first and the last; ckpt.pt every --ckpt-every. -> True at --max-steps."""
        p, a = self.progress, self.args
        p["step"] += 1
        if p["step"] % a.log_every == 0 or p["step"] in (1, a.max_steps):
            self.logger.log(p["step"], p["epoch"], log_values())
        if a.ckpt_every and p["step"] % a.ckpt_every == 0:
            self.save()
        return p["step"] == a.max_steps

    def end_epoch(self, val_loss: float, model: nn.Module):
        """The epoch is complete: val.csv, best.pt when the validation loss improves by more than 1e-5, the early
        stopping count, ckpt.pt."""
        p = self.progress
        p.update(epoch=p["epoch"] + 1, micro=0)
        self.logger.write("val.csv", dict(epoch=p["epoch"], step=p["step"], val_loss=val_loss))
        if val_loss < p["best_val"] - 1e-5:
            p.update(best_val=val_loss, bad_epochs=0)
            if self.ddp.is_main:  # the weights alone: --resume continues ckpt.pt
                save_checkpoint(self.best_path, dict(model=unwrap(model).state_dict(), step=p["step"],
                                                     epoch=p["epoch"], val_loss=val_loss))
        else:
            p["bad_epochs"] += 1
        self.save()
        if self.ddp.is_main:
            print(f"epoch {p['epoch']}: val loss {val_loss:.4f} (best {p['best_val']:.4f})")

    def save(self):
        if self.ddp.is_main:
            save_checkpoint(self.ckpt_path, {**{k: v.state_dict() for k, v in self.stateful.items()}, **self.progress,
                                             "args": self.args, "logger": self.logger.state_dict(), **self.extra()})

    def export(self, model: nn.Module, export):
        """After the loop, on rank 0 (not for --bench): the last ckpt.pt, the best-validation weights into `model`
        (where the run wrote best.pt; LoVT's downstream checkpoint) and export(): all on disk before any evaluation."""
        self.logger.close()
        if self.ddp.is_main and not self.args.bench:
            self.save()
            if os.path.exists(self.best_path):
                unwrap(model).load_state_dict(load_checkpoint(self.best_path)["model"])
            export()

    def evaluate(self, finish):
        """Once the process group is gone, rank 0 alone: --bench prints its numbers, else finish() runs under
        after_training. -> finish's result (None on the other ranks)."""
        cleanup_distributed()
        if not self.ddp.is_main:
            return None
        if self.args.bench:
            return print_bench(self.out, self.args.batch_size * self.ddp.world_size, self.ddp.device,
                               amp_dtype(self.ddp.device, self.args.precision))
        with after_training(self.out):
            return finish()


def print_comparison(results: dict, path: str | None = None):
    """results {model: {metric: value}} (e.g. untrained and trained) -> a table with one row per metric and a column
    per model, also written to `path` as JSON. A metric that is nan for every model has no data (a class with one
    outcome in the split, R@k on a gallery of k items or fewer): it is named on one line, not printed as a number."""
    models, metrics = list(results), list(dict.fromkeys(k for r in results.values() for k in r))
    value = lambda m, k: float(results[m].get(k, math.nan))
    shown = [k for k in metrics if any(not math.isnan(value(m, k)) for m in models)]
    width = max([len(k) for k in shown] + [6]) + 2
    columns = {m: max(12, len(m) + 2) for m in models}  # a longer name ("untrained global") widens its column
    print(f"{'metric':<{width}}" + "".join(f"{m:>{columns[m]}}" for m in models))
    for k in shown:
        print(f"{k:<{width}}" + "".join(f"{value(m, k):>{columns[m]}.3f}" for m in models))
    empty = [k for k in metrics if k not in shown]
    if empty:
        print(f"no data for {', '.join(empty)} (AUC needs both outcomes in the split, R@k more than k items)")
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def export_image_encoder(path: str, encoder: nn.Module, mean: float, std: float, image_size: int, method: str,
                         args=None):
    """Write image_encoder.pt (a plain dict, weights_only-loadable) atomically: arch + config rebuild the encoder
    (build_image_encoder), state_dict fills it (for the ResNets the torchvision-compatible backbone state dict),
    then in_chans, the input normalisation, the pre-training image size, the method and its args."""
    encoder = unwrap(encoder)
    module = encoder.backbone if isinstance(encoder, ImageEncoder) else encoder
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    payload = dict(arch=encoder.arch, config=plain(encoder.config), state_dict=state, in_chans=1, mean=float(mean),
                   std=float(std), image_size=int(image_size), method=method, args=plain(args or {}))
    _atomic_save(payload, path)


def build_image_encoder(arch: str, config: dict | None = None, weights: str | None = None) -> nn.Module:
    """An image encoder of the suite from its exported arch name and config (random init unless `weights`, which
    only the torchvision models have: "imagenet" or a state-dict path)."""
    if arch in ("resnet18", "resnet50", *VIT_CONFIGS):
        return ImageEncoder(arch, weights, config=config)
    if weights not in (None, "none", ""):
        raise ValueError(f"{arch} has no pre-trained weights to load (only resnet18 / resnet50 / vit_b16 do)")
    if arch == SoftAttentionResNet.arch:
        return SoftAttentionResNet(**(config or {}))
    raise ValueError(f"unknown image encoder architecture {arch!r} (known: resnet18, resnet50, "
                     f"{', '.join(VIT_CONFIGS)}, {SoftAttentionResNet.arch})")


def load_image_encoder(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """image_encoder.pt -> (the encoder, rebuilt and loaded, in eval mode; the metadata without the state dict).
    The encoder offers feature_maps(images) -> [c1 .. c5] and stage_channels, whatever method exported it."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    encoder = build_image_encoder(payload["arch"], payload.get("config"))
    module = encoder.backbone if isinstance(encoder, ImageEncoder) else encoder
    module.load_state_dict(payload["state_dict"], strict=True)
    return encoder.eval(), {k: v for k, v in payload.items() if k != "state_dict"}


def export_text_encoder(directory: str, text_encoder: TextEncoder, tokenizer=None):
    """save_pretrained of the BERT model (and the tokenizer) into `directory` (the contract's text_encoder/)."""
    os.makedirs(directory, exist_ok=True)
    unwrap(text_encoder).bert.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def export_encoders(run_dir: str, image_encoder, text_encoder, tokenizer, mean: float, std: float, image_size: int,
                    method: str, args=None):
    """The end of every run: run_dir/image_encoder.pt (what eval_seg.py / eval_det.py read) and run_dir/text_encoder/
    (BERT and tokenizer, save_pretrained)."""
    export_image_encoder(os.path.join(run_dir, "image_encoder.pt"), image_encoder, mean, std, image_size, method, args)
    export_text_encoder(os.path.join(run_dir, "text_encoder"), text_encoder, tokenizer)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or on CPU the process's peak resident set size (ru_maxrss: KiB on
    Linux, bytes on macOS)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)

"""Tests of common.py: loss values, the 2-process DDP gradient test, pooling, encoders, metrics and plumbing."""
import csv
import json
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import common as C


# ---------------------------------------------------------------- InfoNCE values

def info_nce(a, b, tau, gather=True):
    """The symmetric InfoNCE the methods build from common's pieces: unit rows in fp32 (at least), every process's
    columns (gather_rows), contrastive_ce."""
    a, b = F.normalize(C.fp32(a), dim=-1), F.normalize(C.fp32(b), dim=-1)
    a_all, b_all, offset = C.gather_rows(a, b) if gather else (a, b, 0)
    return C.contrastive_ce(a @ b_all.T / tau, b @ a_all.T / tau, offset)


def test_info_nce_all_zero_logits_give_log_b():
    for B in (2, 5):
        zeros = torch.zeros(B, 3, dtype=torch.float64)  # normalises to 0, so every logit is 0
        a2b, b2a = info_nce(zeros, zeros, tau=0.1)
        assert a2b.item() == pytest.approx(math.log(B), abs=1e-12)
        assert b2a.item() == pytest.approx(math.log(B), abs=1e-12)


def test_info_nce_hand_computed_3x3():
    a = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]
    b = [[2.0, 1.0], [-1.0, 1.0], [0.5, 3.0]]
    tau = 0.5

    def cos(u, v):
        return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))

    s = [[cos(a[i], b[j]) / tau for j in range(3)] for i in range(3)]
    a2b = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(3))) for i in range(3)) / 3
    b2a = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(3))) for j in range(3)) / 3
    got = info_nce(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), tau)
    assert got[0].item() == pytest.approx(a2b, abs=1e-12)
    assert got[1].item() == pytest.approx(b2a, abs=1e-12)
    # a learned temperature (0-d tensor) gives the same value
    got_t = info_nce(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                       torch.tensor(tau, dtype=torch.float64))
    assert got_t[0].item() == pytest.approx(a2b, abs=1e-12)


def test_info_nce_logits_in_fp32_under_low_precision_inputs():
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    assert info_nce(a, b, 0.07)[0].dtype == torch.float32


# ---------------------------------------------------------------- DDP gradient test: 2 gloo ranks == one full batch

B, WORLD, DIM_A, DIM_B, DIM_Z = 3, 2, 5, 6, 4


class TwoProjections(nn.Module):
    def __init__(self, transpose=False):
        super().__init__()
        torch.manual_seed(0)  # identical initialisation on every rank
        self.a, self.b = nn.Linear(DIM_A, DIM_Z).double(), nn.Linear(DIM_B, DIM_Z).double()
        self.transpose = transpose

    def forward(self, xa, xb):
        za, zb = self.a(xa), self.b(xb)
        if self.transpose:  # same values, non-contiguous memory (the pytorch#120386 path)
            za, zb = za.t().contiguous().t(), zb.t().contiguous().t()
            assert not za.is_contiguous()
        return za, zb


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(WORLD * B, DIM_A, generator=g, dtype=torch.float64),
            torch.randn(WORLD * B, DIM_B, generator=g, dtype=torch.float64))


def _loss(za, zb, gather=True):
    a2b, b2a = info_nce(za, zb, tau=0.2, gather=gather)
    return 0.75 * a2b + 0.25 * b2a


def _nograd_gather_local_loss(za, zb):
    """Negative control: gather without gradient, put the local slot back (open_clip gather_with_grad=False with
    local_loss=True). Its gradient misses the terms where a rank's features are negatives of other ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.detach().contiguous())
        parts[rank] = x
        return torch.cat(parts)

    za, zb = nn.functional.normalize(za, dim=-1), nn.functional.normalize(zb, dim=-1)
    labels = torch.arange(za.shape[0]) + rank * za.shape[0]
    a2b = nn.functional.cross_entropy(za @ gather(zb).T / 0.2, labels)
    b2a = nn.functional.cross_entropy(zb @ gather(za).T / 0.2, labels)
    return 0.75 * a2b + 0.25 * b2a


def _slot_loss(za, zb, world=1):
    """Own rows vs gathered columns per slot, batched as one einsum (PLACE's slot-wise logits): the gradient that
    reaches the gathered tensor is non-contiguous, which all_gather's backward reduced wrongly (torch 2.14, gloo)
    until gather_with_grad made it contiguous. world x the partial loss: DDP's mean gradient is the full batch's."""
    own_a, all_b = za.view(len(za), 2, -1), C.gather_with_grad(zb).view(-1, 2, DIM_Z // 2)
    return world * torch.einsum("bkd,nkd->kbn", own_a, all_b).logsumexp(-1).sum()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        xa, xb = _data()
        rows = slice(rank * B, (rank + 1) * B)
        for mode in ("gather", "noncontiguous", "noncontiguous_grad", "nograd_control"):
            model = nn.parallel.DistributedDataParallel(TwoProjections(transpose=mode == "noncontiguous"))
            za, zb = model(xa[rows], xb[rows])
            losses = {"nograd_control": _nograd_gather_local_loss,
                      "noncontiguous_grad": partial(_slot_loss, world=world)}
            loss = losses.get(mode, _loss)(za, zb)
            loss.backward()  # DDP averages the parameter gradients over ranks
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            torch.save(dict(loss=mean_loss / world, grads=_grads(model.module)), os.path.join(out_dir, f"{mode}{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_info_nce_matches_full_batch_under_ddp(tmp_path):
    # Reference: one process, the full batch of WORLD * B pairs.
    model = TwoProjections()
    reference_loss = _loss(*model(*_data()))
    reference_loss.backward()
    reference = _grads(model)

    # fork (Linux) skips re-importing torch in each child: a few seconds instead of tens on a loaded 2-core machine.
    # The children run tiny float64 ops on one thread, so the parent's OpenMP pool is never entered after the fork.
    start_method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_ddp_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, start_method=start_method)
    slot_model = TwoProjections()
    slot_loss = _slot_loss(*slot_model(*_data()))
    slot_loss.backward()
    expected = {"noncontiguous_grad": (slot_loss, _grads(slot_model))}
    for mode in ("gather", "noncontiguous", "noncontiguous_grad", "nograd_control"):
        loss, grads = expected.get(mode, (reference_loss, reference))
        result = torch.load(tmp_path / f"{mode}0.pt", weights_only=True)
        assert abs(result["loss"].item() - loss.item()) < 1e-10 * max(1.0, abs(loss.item())), mode
        close = all(torch.allclose(result["grads"][n], g, rtol=1e-12, atol=1e-10) for n, g in grads.items())
        assert close == (mode != "nograd_control"), f"{mode}: gradient check {'passed' if close else 'failed'}"
        other = torch.load(tmp_path / f"{mode}1.pt", weights_only=True)  # DDP keeps the ranks in sync
        assert all(torch.equal(other["grads"][n], g) for n, g in result["grads"].items())


def test_world_size_one_gives_identical_gradients():
    reference_model, model = TwoProjections(), TwoProjections()
    _loss(*reference_model(*_data()), gather=False).backward()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        _loss(*ddp(*_data())).backward()
    finally:
        dist.destroy_process_group()
    for n, g in _grads(reference_model).items():
        assert torch.allclose(model.get_parameter(n).grad, g, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- pooling and heads

def test_pool_sentences_matches_loop_reference():
    torch.manual_seed(0)
    states = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[-1, 0, 0, 1, 1, 1, -1],     # two sentences, slot 2 padded
                          [-1, 0, 1, 1, 2, -1, -1],    # three sentences, then padding
                          [-1, 0, 0, 0, -1, -1, -1]])  # one sentence
    S = 3
    for mode in ("max", "mean"):
        got = C.pool_sentences(states, index, S, mode)
        ref = torch.zeros(3, S, 4, dtype=torch.float64)
        for b in range(3):
            for s in range(S):
                tokens = [states[b, t] for t in range(7) if index[b, t] == s]
                if tokens:
                    stacked = torch.stack(tokens)
                    ref[b, s] = stacked.max(0).values if mode == "max" else stacked.mean(0)
        assert torch.allclose(got, ref.detach(), atol=1e-12), mode
        got.sum().backward()  # differentiable in both modes
    assert states.grad[index < 0].abs().sum() == 0  # special tokens and padding get no gradient


def test_attention_pool_weights_and_padded_length_query():
    torch.manual_seed(0)
    pool = C.AttentionPool(8, heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    pooled, weights = pool(x, mask)
    assert pooled.shape == (2, 8) and weights.shape == (2, 5)
    assert torch.allclose(weights.sum(1), torch.ones(2, dtype=torch.float64))
    assert (weights[~mask] == 0).all()
    # The query is sum(valid) / N_padded (LoVT's GlobalAvgPool), not the mean over valid tokens.
    query = ((x * mask[..., None]).sum(1) / 5).unsqueeze(1)
    expected, _ = pool.attn(query, x, x, key_padding_mask=~mask)
    assert torch.allclose(pooled, expected.squeeze(1), atol=1e-12)
    valid_mean = ((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).unsqueeze(1)
    assert not torch.allclose(pooled[0], pool.attn(valid_mean, x, x, key_padding_mask=~mask)[0][0, 0])
    # Values at padded positions do not matter.
    x2 = x.clone()
    x2[~mask] = 100.0
    assert torch.allclose(pool(x2, mask)[0], pooled, atol=1e-12)


def test_projection_head_shapes_and_bn_over_positions():
    torch.manual_seed(0)
    head = C.ProjectionHead(6, 16, 4).double()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    assert head(x).shape == (3, 5, 4) and head(x[:, 0]).shape == (3, 4)
    # The B x N x D path equals the flattened (B*N) x D path (one BN over all positions).
    assert torch.allclose(head(x).reshape(15, 4), head(x.reshape(15, 6)), atol=1e-12)
    assert (head.net[0].bias == 0).all() and (head.net[-1].bias == 0).all()
    mgca = C.ProjectionHead(6, 16, 4, final_norm="batch")
    out = mgca(torch.randn(32, 6))
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=1e-5)


# ---------------------------------------------------------------- encoders

def test_image_encoder_shapes_resnet18():
    enc = C.ImageEncoder("resnet18")
    out = enc(torch.randn(2, 1, 64, 64))
    assert enc.out_dim == 512 and out["grid"] == (2, 2)
    assert out["global_feat"].shape == (2, 512) and out["local_feats"].shape == (2, 4, 512)
    assert [s.shape[1] for s in out["stages"]] == enc.stage_channels == [64, 64, 128, 256, 512]
    assert [s.shape[-1] for s in out["stages"]] == [32, 16, 8, 4, 2]  # c1 .. c5: strides 2 .. 32
    assert C.ImageEncoder("resnet50").stage_channels == [64, 256, 512, 1024, 2048]
    # row-major regions: index = w * row + col
    assert torch.equal(out["local_feats"][:, 1 * 2 + 0], out["stages"][-1][:, :, 1, 0])
    fast = C.ImageEncoder("resnet18", channels_last=True)
    fast.load_state_dict(enc.state_dict())
    image = torch.randn(2, 1, 64, 64)
    assert torch.allclose(fast.eval()(image)["global_feat"], enc.eval()(image)["global_feat"], atol=1e-5)


def test_one_channel_conv1_equals_rgb_model_on_repeated_image(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18(weights=None).double().eval()
    rgb.fc = nn.Identity()
    path = tmp_path / "rgb.pt"
    torch.save(rgb.state_dict(), path)
    enc = C.ImageEncoder("resnet18", weights=str(path)).double().eval()
    assert enc.backbone.conv1.weight.shape == (64, 1, 7, 7)
    image = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    assert torch.allclose(enc(image)["global_feat"], rgb(image.repeat(1, 3, 1, 1)), atol=1e-10)


def test_missing_weights_give_a_clear_message():
    with pytest.raises(SystemExit, match="none"):
        C.ImageEncoder("resnet18", weights="/nonexistent/weights.pt")


def _tokenizer(tmp_path):
    from transformers import BertTokenizerFast
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "lung", "is", "clear", "."]))
    return BertTokenizerFast(str(vocab))


def test_text_encoder_tiny_freeze_and_export(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    enc = C.TextEncoder("tiny", tokenizer, freeze_layers=1).eval()
    batch = tokenizer(["lung is clear .", "no"], padding=True, return_tensors="pt")
    states = enc(batch["input_ids"], batch["attention_mask"])
    assert states.shape == (2, batch["input_ids"].shape[1], 128) and enc.out_dim == 128
    assert not any(p.requires_grad for p in enc.bert.embeddings.parameters())
    assert not any(p.requires_grad for p in enc.bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in enc.bert.encoder.layer[1].parameters())
    summed = enc(batch["input_ids"], batch["attention_mask"], sum_last=2)
    hidden = enc.bert(**batch, output_hidden_states=True).hidden_states
    assert torch.allclose(summed, hidden[-1] + hidden[-2], atol=1e-6)
    C.export_text_encoder(str(tmp_path / "text_encoder"), enc, tokenizer)
    again = C.TextEncoder(str(tmp_path / "text_encoder")).eval()
    assert torch.allclose(again(batch["input_ids"], batch["attention_mask"]), states, atol=1e-6)



def test_text_encoder_bert_base_is_random_init_with_bert_base_sizes(tmp_path):
    config = C.TextEncoder("bert-base", _tokenizer(tmp_path)).bert.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.vocab_size) == (768, 12, 12, 3072, 10)


# ---------------------------------------------------------------- metrics

def test_recall_at_k_identity_and_ties():
    assert C.recall_at_k(torch.eye(12)) == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    sim = np.array([[0.9, 0.9, 0.1],    # tie with a negative: rank 2
                    [0.8, 0.5, 0.6],    # two negatives above: rank 3
                    [0.0, 0.1, 0.2]])   # rank 1
    r = C.recall_at_k(sim, ks=(1, 2, 3))
    assert r["R@1"] == 1 / 3 and r["R@2"] == 2 / 3
    assert math.isnan(r["R@3"])  # a gallery of 3: every query is in the top 3, a 1.0 that says nothing
    sim = np.eye(5) + 2 * np.eye(5, k=2)  # rows 0-2 prefer the item two places right of their pair
    assert C.recall_at_k(sim, ks=(1,))["R@1"] == pytest.approx(2 / 5)
    # blocks [0:2] and [2:4] do not contain those items; the incomplete block [4:5] is dropped
    assert C.block_recall_at_k(sim, block=2, ks=(1,)) == {"R@1": 1.0}


def test_roc_auc_hand_counted():
    # pairs (pos, neg): pos 0.8 beats all 3 negatives; pos 0.4 beats 0.1, ties 0.4 (1/2), loses to 0.6
    scores = [0.8, 0.4, 0.1, 0.4, 0.6, 0.9]
    targets = [1, 1, 0, 0, 0, float("nan")]  # nan = unknown, ignored
    assert C.roc_auc(scores, targets) == pytest.approx((3 + 1.5) / 6)
    assert C.roc_auc([0.1, 0.2], [1, -1]) != C.roc_auc([0.1, 0.2], [1, -1])  # one class absent: nan


def test_precision_at_k_and_bootstrap():
    sim = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.9, 0.3]])
    assert C.precision_at_k(sim, [0, 1], [0, 1, 1, 0], ks=(1, 2, 4)) == {"P@1": 1.0, "P@2": 0.5, "P@4": 0.5}
    scores, targets = np.linspace(0, 1, 40), np.r_[np.zeros(20), np.ones(20)]
    low, high = C.bootstrap_ci(C.roc_auc, scores, targets, n=50)
    assert low == high == 1.0
    low, high = C.bootstrap_ci(C.roc_auc, np.random.default_rng(0).random(40), targets, n=200)
    assert 0 <= low < 0.5 < high <= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy All-NaN warning: a class absent from the test set is nan, quietly
        low, high = C.bootstrap_ci(C.roc_auc, scores, np.zeros(40), n=20)
    assert np.isnan(low) and np.isnan(high)


def test_zero_shot_auc_pair_prompts():
    pos = torch.eye(2, 4)               # prompts "c" for two classes
    neg = -torch.eye(2, 4)              # prompts "no c"
    images = torch.tensor([[1.0, 0.0, 0.5, 0], [0.0, 1.0, 0.5, 0], [-1.0, -1.0, 0.5, 0]])
    labels = np.array([[1, 0], [0, 1], [0, 0]])
    table = C.zero_shot_auc_ci(images @ pos.T, images @ neg.T, labels, names=["a", "b"], n_boot=20)
    assert {name: v[0] for name, v in table.items()} == {"a": 1.0, "b": 1.0}



def test_zero_shot_auc_ci_matches_chexzeros_pair_softmax():
    rng = np.random.default_rng(1)
    images, pos, neg = rng.normal(size=(60, 8)), rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    labels = (rng.random((60, 3)) < 0.4).astype(float)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    table = C.zero_shot_auc_ci(unit(images) @ unit(pos).T, unit(images) @ unit(neg).T, labels, ["a", "b", "c"],
                               n_boot=200)
    cos_pos, cos_neg = unit(images) @ unit(pos).T, unit(images) @ unit(neg).T
    softmax = np.exp(cos_pos) / (np.exp(cos_pos) + np.exp(cos_neg))  # CheXzero's p_c of the pair "c" / "no c"
    for name, (auc, low, high) in table.items():
        assert auc == pytest.approx(C.roc_auc(softmax[:, "abc".index(name)], labels[:, "abc".index(name)]))
        assert low < auc < high
        margin = (unit(images) @ unit(pos).T - unit(images) @ unit(neg).T)[:, "abc".index(name)]
        assert (low, high) == C.bootstrap_ci(C.roc_auc, margin, labels[:, "abc".index(name)], n=200)

# ---------------------------------------------------------------- plumbing

@dataclass
class _Args:
    lr: float = C.arg(1e-4, "peak learning rate")
    arch: Literal["resnet18", "resnet50"] = C.arg("resnet50", "image backbone")
    crop_scale: tuple[float, float] = C.arg((0.6, 1.0), "RandomResizedCrop scale")
    amp: bool = C.arg(True, "mixed precision")
    weights: Optional[str] = C.arg("imagenet", "image weights")
    epochs: int = C.arg(100, "epochs")


@dataclass
class _Ablations:
    no_local: bool = C.arg(False, "ablation: global losses only")
    augment: bool = C.arg(True, "augmentation")


def test_parse_args_bool_fields_named_no_x():
    # argparse's BooleanOptionalAction took any --no-* flag as a negative: --no-local used to leave no_local False
    assert C.parse_args(_Ablations, argv=["--no-local"]) == _Ablations(no_local=True)
    assert C.parse_args(_Ablations, argv=["--no-local", "--no-no-local", "--no-augment"]) == _Ablations(augment=False)
    assert C.parse_args(_Ablations, argv=["--no-augment", "--augment"]) == _Ablations()


def test_parse_args_presets_and_overrides(capsys):
    presets = {"demo": dict(arch="resnet18", epochs=2, lr=1e-3)}
    assert C.parse_args(_Args, presets, argv=[]) == _Args()
    args = C.parse_args(_Args, presets, argv=["--preset", "demo", "--lr", "0.5", "--crop-scale", "0.5", "0.9",
                                              "--no-amp", "--weights", "none"])
    assert args == _Args(lr=0.5, arch="resnet18", crop_scale=(0.5, 0.9), amp=False, weights=None, epochs=2)
    with pytest.raises(SystemExit):
        C.parse_args(_Args, presets, argv=["--arch", "vgg"])
    with pytest.raises(SystemExit):
        C.parse_args(_Args, presets, argv=["--help"])
    assert "peak learning rate" in capsys.readouterr().out


def test_per_epoch_cosine_is_a_two_epoch_wave():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    scheduler = C.per_epoch_cosine(optimizer, steps_per_epoch=5)
    lrs = []
    for _ in range(15):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-4 * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(15)]
    assert np.allclose(lrs, expected, rtol=0, atol=1e-15)
    assert lrs[5] < 1e-18 and lrs[10] == pytest.approx(1e-4)  # down to 0 after epoch 1, back up after epoch 2


def test_cosine_with_warmup():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = C.cosine_with_warmup(optimizer, warmup_steps=4, total_steps=10, min_lr=0.1)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lrs[10:] == pytest.approx([0.1, 0.1])


def test_checkpoint_round_trip_and_rng(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = C.per_epoch_cosine(optimizer, 10)
    scaler = C.grad_scaler(torch.device("cpu"), None)
    path = str(tmp_path / "ckpt.pt")
    C.save_checkpoint(path, dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                                 scheduler=scheduler.state_dict(), step=7, epoch=1, args=_Args(weights=None)))
    draws = (torch.rand(3), np.random.rand(3), random.random())
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind

    ckpt = torch.load(path, weights_only=True)  # everything in it is weights_only-safe
    assert ckpt["step"] == 7 and ckpt["args"]["crop_scale"] == (0.6, 1.0) and ckpt["args"]["weights"] is None
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(ckpt["model"])
    assert torch.equal(fresh.weight, model.weight)
    torch.optim.AdamW(fresh.parameters(), lr=1e-3).load_state_dict(ckpt["optimizer"])
    C.restore_rng(C.load_checkpoint(path))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]

    # A crash while writing leaves the previous checkpoint intact.
    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(C.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, dict(step=8))
    monkeypatch.undo()
    assert C.load_checkpoint(path)["step"] == 7 and os.listdir(tmp_path) == ["ckpt.pt"]


def test_export_and_load_image_encoder(tmp_path):
    enc = C.ImageEncoder("resnet18").eval()
    path = str(tmp_path / "image_encoder.pt")
    C.export_image_encoder(path, enc, mean=0.5, std=0.25, image_size=64, method="test", args=_Args())
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "resnet18" and payload["in_chans"] == 1 and payload["image_size"] == 64
    assert payload["state_dict"]["conv1.weight"].shape == (64, 1, 7, 7)
    assert not any(k.startswith("fc.") for k in payload["state_dict"])
    model, meta = C.load_image_encoder(path)
    assert meta["mean"] == 0.5 and meta["method"] == "test" and meta["args"]["lr"] == 1e-4
    assert isinstance(model, C.ImageEncoder) and not model.training
    image = torch.randn(2, 1, 64, 64)
    assert torch.allclose(model(image)["global_feat"], enc(image)["global_feat"], atol=1e-6)
    # JoImTeRNet's encoder: arch + config rebuild it from the weights_only file
    torch.manual_seed(0)
    small = C.SoftAttentionResNet(32, (4, 4, 8, 8, 16, 16), stem_stride=1).eval()
    C.export_image_encoder(path, small, mean=0.5, std=0.25, image_size=64, method="joimternet")
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "joimternet-resnet" and payload["config"]["widths"] == [4, 4, 8, 8, 16, 16]
    again, _ = C.load_image_encoder(path)
    assert all(torch.equal(a, b) for a, b in zip(again.feature_maps(image), small.feature_maps(image)))
    assert [m.shape[-1] for m in again.feature_maps(image)] == [32, 16, 8, 4, 2] and again.stage_channels[-1] == 16
    with pytest.raises(ValueError, match="unknown image encoder"):
        C.build_image_encoder("vit-l/14")


def test_logger_csv_and_resume(tmp_path):
    logger = C.Logger(str(tmp_path), is_main=True, total_steps=4)
    for step, batch in enumerate(logger.iterate([1, 2, 3]), 1):
        for micro in range(2):  # the row holds the means of what was added since the previous row
            logger.add({"loss": torch.tensor(1.0 / step + micro), "term": 2.0 * micro}, images=8)
        logger.log(step, 0, {"lr": 0.1})
    logger.close()
    resumed = C.Logger(str(tmp_path), is_main=True, total_steps=4, start_step=2)  # killed after the step-2 checkpoint
    resumed.add({"loss": 0.5, "new_term": 1.0})  # a column the file does not have: ignored
    resumed.log(3, 0, {"lr": 0.1})
    resumed.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["step", "epoch", "lr", "loss/total", "loss/term", "perf/img_per_s", "perf/data_wait_frac",
                             "perf/cpu_s"]
    assert float(rows[1]["loss/total"]) == pytest.approx(0.5 + 0.5) and float(rows[1]["loss/term"]) == 1.0
    assert float(rows[2]["loss/total"]) == 0.5 and rows[2]["loss/term"] == ""  # not added in that interval
    assert 0 <= float(rows[0]["perf/data_wait_frac"]) <= 1 and float(rows[0]["perf/img_per_s"]) > 0


def test_logger_resumes_the_interval_a_checkpoint_fell_into(tmp_path):
    """Rows every 2 steps, the checkpoint after step 3: the resumed run's row 4 is the mean over steps 3 and 4, as
    in the run that was never stopped, because the checkpoint carries the interval's sums."""
    def run(folder, steps, start=0, pending=None):
        folder.mkdir(exist_ok=True)
        logger = C.Logger(str(folder), True, 4, start, pending)
        for step in steps:
            logger.add({"loss": torch.tensor(float(step))})
            if step % 2 == 0:
                logger.log(step, 0, {})
        logger.close()
        return logger.state_dict()
    run(tmp_path / "straight", [1, 2, 3, 4])
    pending = run(tmp_path / "killed", [1, 2, 3])  # saved with the step-3 checkpoint
    assert pending == {"loss": (3.0, 1)}
    run(tmp_path / "killed", [4], start=3, pending=pending)
    loss = lambda folder: [float(r["loss/total"]) for r in csv.DictReader(open(folder / "metrics.csv"))]
    assert loss(tmp_path / "killed") == loss(tmp_path / "straight") == [1.5, 3.5]


def test_a_report_without_a_word_keeps_one_empty_word():
    starts = torch.tensor([False, False, True, True])  # ids 0, 1: special / unknown; 2, 3: words
    continues = torch.zeros(4, dtype=torch.bool)
    ids = torch.tensor([[2, 3, 0], [1, 1, 0]])  # the second report: only unknown tokens
    words, mask = C.sum_pieces(torch.ones(2, 3, 5), C.word_index(ids, starts, continues, 97))
    assert mask.tolist() == [[True, True], [True, False]]
    assert words[1, 0].abs().sum() == 0 and words[0].abs().sum() > 0  # a zero vector: every similarity to it is 0


def test_logger_cpu_seconds_count_work_not_waiting(tmp_path):
    logger = C.Logger(str(tmp_path), is_main=True, total_steps=2)
    start = time.process_time()
    while time.process_time() - start < 0.3:  # 0.3 CPU s of work
        sum(range(1000))
    logger.log(1, 0, {})
    time.sleep(0.3)  # waiting is not CPU time
    logger.log(2, 0, {})
    logger.close()
    first, second = (float(r["perf/cpu_s"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")))
    assert 0.3 <= first < 0.6 and second - first < 0.1


def test_check_finite_names_step_terms_and_checkpoint():
    C.check_finite(torch.tensor(1.0), 3, "run/ckpt.pt")
    with pytest.raises(FloatingPointError, match=r"step 12.*global=nan.*run/ckpt.pt"):
        C.check_finite(torch.tensor(float("nan")), 12, "run/ckpt.pt", {"global": float("nan"), "local": 1.0})


def test_amp_policy_and_seeding():
    cpu = torch.device("cpu")
    assert C.amp_dtype(cpu) is None and C.amp_dtype(cpu, "bf16") == torch.bfloat16
    assert not C.grad_scaler(cpu, None).is_enabled()
    with C.autocast(cpu, None):
        pass
    C.seed_everything(3)
    first = torch.rand(2)
    C.seed_everything(3)
    assert torch.equal(first, torch.rand(2))
    assert C.peak_memory_mb(cpu) > 0
    assert C.setup_distributed("cpu").device == cpu


def test_run_folder_accumulation_and_comparison_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first, second = C.run_folder("", "lovt", C.Dist(), args=_Args()), C.run_folder("", "lovt", C.Dist())
    assert first != second and first.startswith("runs/lovt-")  # two runs never share a metrics.csv
    assert json.load(open(os.path.join(first, "args.json")))["lr"] == 1e-4
    assert C.run_folder(str(tmp_path / "mine"), "lovt", C.Dist()) == str(tmp_path / "mine")
    assert C.micro_batches_per_step(16, 1) == 16 and C.micro_batches_per_step(16, 8) == 2  # 512 pairs on 1 or 8
    assert all(C.micro_batches_per_step(1, w) == 1 for w in (1, 2, 3, 8))  # no accumulation: any number of GPUs
    with pytest.raises(SystemExit, match="pass --accum 15 or --accum 18[.]"):  # 512 has no factor 3: nothing keeps it
        C.micro_batches_per_step(16, 3, batch_size=32)
    with pytest.raises(SystemExit, match="pass --accum 32, or keep its 512 pairs per step with --batch-size 16 "
                                         "--accum 32"):
        C.micro_batches_per_step(16, 32, batch_size=32)
    # the epoch's shorter last step divides by its own micro-batch count
    assert [C.accumulation(m, 5, 2) for m in range(1, 6)] == [(False, 2), (True, 2), (False, 2), (True, 2), (True, 1)]
    assert [C.accumulation(m, 3, 1) for m in range(1, 4)] == [(True, 1)] * 3
    results = {"untrained": {"R@1": 0.1, "auc_edema": math.nan}, "trained": {"R@1": 0.5, "auc_edema": math.nan}}
    C.print_comparison(results, str(tmp_path / "eval.json"))
    printed = capsys.readouterr().out
    assert "0.100" in printed and "0.500" in printed and "nan" not in printed
    assert "no data for auc_edema" in printed and json.load(open(tmp_path / "eval.json"))["trained"]["R@1"] == 0.5


def test_training_run_best_checkpoint_early_stopping_and_resume(tmp_path, capsys):
    """end_epoch keeps best.pt at the lowest validation loss and counts the epochs without progress; done stops at
    --patience; a TrainingRun with --resume restores the counters, the model and the optimizer; stepped() logs the
    first and every log_every-th step and says when --max-steps is reached."""
    from types import SimpleNamespace
    args = SimpleNamespace(resume=False, seed=1, epochs=10, max_steps=0, patience=2, log_every=2, ckpt_every=0,
                           bench=False, precision="fp32", batch_size=4)
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = C.TrainingRun(args, C.Dist(), str(tmp_path), 100, model=model, optimizer=optimizer)
    weights = {}
    for val in (1.0, 0.5, 0.6, 0.7):
        assert not run.done
        with torch.no_grad():
            model.weight.add_(1.0)  # each epoch's model differs
        weights[val] = model.weight.clone()
        run.end_epoch(val, model)
    assert run.done and run.progress["bad_epochs"] == 2 and run.progress["best_val"] == 0.5
    best = C.load_checkpoint(run.best_path)
    assert torch.equal(best["model"]["weight"], weights[0.5]) and best["epoch"] == 2
    assert [r["val_loss"] for r in csv.DictReader(open(tmp_path / "val.csv"))] == ["1.0", "0.5", "0.6", "0.7"]
    assert "epoch 4: val loss 0.7000 (best 0.5000)" in capsys.readouterr().out
    run.export(model, lambda: None)  # the best weights back into the model before the export
    assert torch.equal(model.weight, weights[0.5])

    resumed_model = nn.Linear(2, 1)
    resumed = C.TrainingRun(SimpleNamespace(**{**vars(args), "resume": True}), C.Dist(), str(tmp_path), 100,
                            model=resumed_model, optimizer=torch.optim.SGD(resumed_model.parameters(), lr=0.1))
    assert resumed.done and resumed.progress == run.progress
    assert torch.equal(resumed_model.weight, weights[0.7])  # ckpt.pt: the model as trained; best.pt: the best

    args.max_steps, args.patience = 3, 100
    os.makedirs(tmp_path / "steps")  # run_folder's work in a method
    fresh = C.TrainingRun(args, C.Dist(), str(tmp_path / "steps"), 3, model=nn.Linear(2, 1))
    assert [fresh.stepped(lambda: {"lr": 0.1}) for _ in range(3)] == [False, False, True] and fresh.done
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "steps" / "metrics.csv"))] == ["1", "2", "3"]
    with pytest.raises(SystemExit, match="no checkpoint at"):
        C.TrainingRun(SimpleNamespace(**{**vars(args), "resume": True}), C.Dist(), str(tmp_path / "none"), 1)


def test_heat_overlay_and_panels(tmp_path):
    """The map's highest cell is red over the dimmed film, its lowest leaves the film grey; panels side by side with
    room for their captions."""
    gray = torch.full((32, 32), 0.5)
    heat = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    panel = np.asarray(C.heat_overlay(gray, heat, size=64, mode="nearest")).astype(int)
    assert panel.shape == (64, 64, 3)
    r, g, b = panel[5, 5]
    assert r > g == b and g == round(0.5 * 127.5)  # dimmed by half, red added
    assert tuple(panel[60, 60]) == (128, 128, 128)  # no map: the film as it is
    C.save_panels([C.heat_overlay(gray, heat, 64)] * 3, ["a", "b " * 40, "c"], str(tmp_path / "p.png"), lines=2)
    assert Image.open(tmp_path / "p.png").size == (3 * 64, 64 + 14 * 2 + 4)

"""The ViT in common.ImageEncoder and MGCA's TCA and heads in common.py (ITA: test_place.py)."""
import pytest
import torch
import torch.nn.functional as F

import common


def tiny(**config):
    torch.manual_seed(0)
    config = {**dict(image_size=32, width=24, layers=2, heads=2, mlp=48), **config}
    return common.ImageEncoder("vit_tiny", config=config).eval()


def test_vit_output_dict_and_cls_attention():
    enc = tiny()
    x = torch.randn(3, 1, 32, 32)
    out = enc(x)
    assert out["global_feat"].shape == (3, 24) and out["local_feats"].shape == (3, 4, 24) and out["grid"] == (2, 2)
    assert out["cls_attn"].shape == (3, 4) and (out["cls_attn"] > 0).all()
    torch.testing.assert_close(out["cls_attn"].sum(-1), torch.ones(3))
    # the written-out last block equals torchvision's forward: [CLS] after the final LayerNorm (heads = Identity)
    torch.testing.assert_close(out["global_feat"], enc.backbone(x))
    assert enc.out_dim == 24 and enc.num_patches(32) == 4 and enc.config["patch_size"] == 16
    (fmap,) = enc.feature_maps(x)
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), out["local_feats"])  # row-major patch map
    with pytest.raises(ValueError, match="ImageNet"):
        common.ImageEncoder("vit_tiny", "imagenet")
    with pytest.raises(ValueError, match="unknown ViT config"):
        common.ImageEncoder("vit_tiny", config=dict(depth=3))
    with pytest.raises(ValueError, match="needs a ViT"):
        common.ImageEncoder("resnet18")(torch.randn(1, 1, 32, 32), visible=torch.zeros(1, 1, dtype=torch.long))


def test_default_tiny_config_runs_without_imagenet():
    enc = common.ImageEncoder("vit_tiny")
    out = enc(torch.randn(2, 1, 128, 128))
    assert out["local_feats"].shape == (2, 64, 192) and out["grid"] == (8, 8)


def test_visible_subset_is_mae_style():
    enc = tiny(image_size=64)  # 16 patches
    net, x = enc.backbone, torch.randn(2, 1, 64, 64)
    visible = torch.tensor([[0, 5, 9, 15], [3, 2, 14, 7]])
    out = enc(x, visible)
    assert out["local_feats"].shape == (2, 4, 24) and out["cls_attn"].shape == (2, 4) and out["grid"] == (4, 4)
    torch.testing.assert_close(out["cls_attn"].sum(-1), torch.ones(2))
    # reference: torchvision's full token sequence with its position embeddings, the other patches removed, then
    # torchvision's own blocks and final LayerNorm
    with torch.no_grad():
        full = torch.cat([net.class_token.expand(2, -1, -1), net._process_input(x)], 1) + net.encoder.pos_embedding
        keep = torch.cat([torch.zeros(2, 1, dtype=torch.long), visible + 1], 1)
        ref = net.encoder.ln(net.encoder.layers(full.gather(1, keep[..., None].expand(-1, -1, 24))))
    torch.testing.assert_close(out["local_feats"], ref[:, 1:])
    torch.testing.assert_close(out["global_feat"], ref[:, 0])
    torch.testing.assert_close(enc.encode_visible(x, visible), ref[:, 1:])
    # positions travel with the patches: permuting the visible list permutes the outputs only
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(enc(x, visible[:, perm])["local_feats"], out["local_feats"][:, perm])
    # all patches in order = the full encoding
    torch.testing.assert_close(enc(x, torch.arange(16).expand(2, -1))["local_feats"], enc(x)["local_feats"])


def test_vit_export_round_trip(tmp_path):
    enc = tiny()
    path = tmp_path / "image_encoder.pt"
    common.export_image_encoder(str(path), enc, 0.5, 0.25, 32, "place")
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "vit_tiny" and payload["config"]["width"] == 24
    assert payload["state_dict"]["conv_proj.weight"].shape == (24, 1, 16, 16)  # torchvision names, 1 channel
    loaded, meta = common.load_image_encoder(str(path))
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x)["local_feats"], enc(x)["local_feats"])
    assert meta["method"] == "place" and loaded.config == enc.config


def test_rgb_state_dict_is_summed_over_channels(tmp_path):
    torch.manual_seed(0)
    rgb = common.ImageEncoder("vit_tiny", config=dict(image_size=32, width=24, layers=1, heads=2, mlp=48))
    sd = {k: v for k, v in rgb.backbone.state_dict().items()}
    sd["conv_proj.weight"] = sd["conv_proj.weight"].repeat(1, 3, 1, 1) / 3  # a 3-channel torchvision layout
    torch.save(sd, tmp_path / "rgb.pt")
    gray = common.ImageEncoder("vit_tiny", str(tmp_path / "rgb.pt"), config=rgb.config)
    torch.testing.assert_close(gray.backbone.conv_proj.weight, rgb.backbone.conv_proj.weight)


def test_mgca_head():
    head = common.mgca_head(24, 8, 16)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"] and not head.net[-1].affine
    out = head(torch.randn(3, 5, 24))  # local: BN over all 15 tokens
    assert out.shape == (3, 5, 8)
    torch.testing.assert_close(out.reshape(15, 8).mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def mgca_reference(patch, word, pad, word_attn, patch_attn, tau=0.1, vit=True):
    """HKU-MedAI/MGCA:mgca/models/mgca/mgca_module.py:MGCA.forward lines 124-221, written out as there."""
    bz = len(patch)
    patch, word = F.normalize(patch, dim=-1), F.normalize(word, dim=-1)
    out = F.normalize(torch.bmm(F.softmax(torch.bmm(word, patch.permute(0, 2, 1)) / tau, dim=-1), patch), dim=-1)
    word_sim = torch.bmm(word, out.permute(0, 2, 1)) / tau
    weights = []
    for i in range(bz):
        a = word_attn[i].clone()
        nz = a.nonzero().squeeze()
        a[nz] = a[nz].clip(torch.quantile(a[nz], 0.1), torch.quantile(a[nz], 0.9))
        weights.append(a)
    ww = torch.stack(weights)
    ww = ww / ww.sum(1, keepdim=True)
    T = word.shape[1]
    targets = torch.arange(T).repeat(bz)
    l1 = (F.cross_entropy(word_sim.reshape(bz * T, T), targets, reduction="none") * ww.view(-1)).sum() / bz
    l2 = (F.cross_entropy(word_sim.permute(0, 2, 1).reshape(bz * T, T), targets, reduction="none")
          * ww.view(-1)).sum() / bz
    sim = torch.bmm(patch, word.permute(0, 2, 1))
    sim[pad.unsqueeze(1).repeat(1, patch.shape[1], 1)] = float("-inf")
    pout = torch.bmm(F.softmax(sim / tau, dim=-1), word)
    N = patch.shape[1]
    if vit:
        pw = torch.stack([a.clip(torch.quantile(a, 0.1), torch.quantile(a, 0.9)) for a in patch_attn])
    else:
        pout, pw = F.normalize(pout, dim=-1), torch.ones(bz, N) / N
    pw = pw / pw.sum(1, keepdim=True)
    psim = torch.bmm(patch, pout.permute(0, 2, 1)) / tau
    targets = torch.arange(N).repeat(bz)
    p1 = (F.cross_entropy(psim.reshape(bz * N, N), targets, reduction="none") * pw.view(-1)).sum() / bz
    p2 = (F.cross_entropy(psim.permute(0, 2, 1).reshape(bz * N, N), targets, reduction="none")
          * pw.view(-1)).sum() / bz
    return (l1 + l2) / 2, (p1 + p2) / 2


def tca_inputs():
    torch.manual_seed(0)
    B, N, T, E = 3, 6, 5, 4
    patch, word = torch.randn(B, N, E, dtype=torch.float64), torch.randn(B, T, E, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    word_attn = torch.rand(B, T, dtype=torch.float64) * mask
    word_attn[0, 2] = 0  # a counted position with weight 0 (MGCA: [SEP]) stays out of the quantiles
    patch_attn = torch.rand(B, N, dtype=torch.float64).softmax(-1)
    return patch, word, mask, word_attn, patch_attn


def test_tca_matches_mgca_code_vit_and_resnet():
    patch, word, mask, word_attn, patch_attn = tca_inputs()
    got = common.mgca_tca(patch, word, mask, word_attn, patch_attn)
    ref = mgca_reference(patch, word, ~mask, word_attn, patch_attn)
    torch.testing.assert_close(torch.stack(got), torch.stack(ref))
    got = common.mgca_tca(patch, word, mask, word_attn, None)
    ref = mgca_reference(patch, word, ~mask, word_attn, None, vit=False)
    torch.testing.assert_close(torch.stack(got), torch.stack(ref))
    # the renormalised cls_attn gives the same loss as MGCA's raw attention row (clip and divide: scale-free)
    torch.testing.assert_close(common.mgca_tca(patch, word, mask, word_attn, 7 * patch_attn)[1],
                               common.mgca_tca(patch, word, mask, word_attn, patch_attn)[1])


def test_tca_padding_and_gradients():
    patch, word, mask, word_attn, patch_attn = tca_inputs()
    patch.requires_grad_(True)
    patch_attn.requires_grad_(True)
    loss_word, loss_patch = common.mgca_tca(patch, word, mask, word_attn, patch_attn)
    changed = word.masked_fill(~mask[..., None], 5.0)
    w2, p2 = common.mgca_tca(patch, changed, mask, word_attn, patch_attn)
    torch.testing.assert_close(p2, loss_patch)  # the patch side masks padding
    assert not torch.allclose(w2, loss_word)    # as MGCA: padded words are negatives of the word side
    (loss_word + loss_patch).backward()
    assert patch.grad.abs().sum() > 0 and patch_attn.grad is None  # no gradient through the weights


def test_tca_sample_without_counted_words_is_finite():
    patch, word, mask, word_attn, patch_attn = tca_inputs()
    word_attn[1] = 0  # nothing to weigh in sample 1: it adds nothing to the word loss instead of a nan
    loss_word, loss_patch = common.mgca_tca(patch, word, mask, word_attn, patch_attn)
    assert torch.isfinite(loss_word) and torch.isfinite(loss_patch)

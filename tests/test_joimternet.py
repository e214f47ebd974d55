"""JoImTeRNet: loss values against written-out references, masking, tokenizer, DDP equivalence, overfit, main()."""
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import joimternet as jt

LOSS_ARGS = dict(gamma1=4.0, gamma2=5.0, gamma3=10.0, margin_sent=0.5, margin_word=0.5, lambda_ce=1.0,
                 lambda_triplet=2.0, chunk=2)
TERMS = ("global_ce_i2t", "global_ce_t2i", "local_ce_i2t", "local_ce_t2i", "global_trip_i2t", "global_trip_t2i",
         "local_trip_i2t", "local_trip_t2i")


def reference_similarities(V, E, lengths, gamma1=4.0, gamma2=5.0):
    """The official words_loss/func_attention written out as loops: R[i, j] for image i and report j (words
    0..lengths[j]-1 only), softmax over words per region, then over regions per word (x gamma1)."""
    I, T = V.shape[0], E.shape[0]
    R = torch.zeros(I, T, dtype=V.dtype)
    for j in range(T):
        words = E[j, :lengths[j]]                                   # n x D
        for i in range(I):
            a = V[i] @ words.T                                      # regions x n
            a = torch.softmax(a, dim=1)                             # over words
            alpha = torch.softmax(gamma1 * a.T, dim=1)              # n x regions, over regions
            total = 0.0
            for w in range(lengths[j]):
                c = (alpha[w, :, None] * V[i]).sum(0)
                cos = (c @ words[w]) / (c.norm() * words[w].norm()).clamp(min=1e-8)
                total = total + torch.exp(gamma2 * cos)
            R[i, j] = torch.log(total)
    return R


def test_word_region_matrix_matches_loop_and_chunks():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)      # 3 images, 5 regions, D = 4
    E = torch.randn(4, 6, 4, generator=g, dtype=torch.float64)      # 4 reports, up to 6 words
    lengths = [6, 2, 4, 1]
    M = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    E_noisy_pad = torch.where(M[..., None], E, 100 * torch.randn(E.shape, generator=g, dtype=torch.float64))
    ref = reference_similarities(V, E, lengths)
    for chunk in (1, 3, 16):  # chunked == unchunked == loop; padded words never matter
        got = common.word_region_matrix(V, E_noisy_pad, M, 4.0, 5.0, chunk=chunk)
        torch.testing.assert_close(got, ref)
    # the attention maps: softmax over regions sums to one per word
    _, alpha = common.word_region_attention(V[0], E[0], M[0], 4.0)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(6, dtype=torch.float64))
    # gammas enter where the formulas say: gamma3 scales the CE logits
    l_i2t, l_t2i = jt.local_ce(V[:3], E[:3], M[:3], V[:3], E[:3], M[:3], 0, 4.0, 5.0, 10.0, chunk=2)
    S = 10.0 * ref[:3, :3]
    torch.testing.assert_close(l_i2t, F.cross_entropy(S, torch.arange(3)))
    torch.testing.assert_close(l_t2i, F.cross_entropy(S.T, torch.arange(3)))
    other = reference_similarities(V, E, lengths, gamma1=1.0, gamma2=2.0)
    torch.testing.assert_close(common.word_region_matrix(V, E, M, 1.0, 2.0), other)


def test_global_ce_value():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    e = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    i2t, t2i = jt.global_ce(v, e, v, e, 0, 10.0)
    c = 1 / math.sqrt(2)  # cos(v0, e1) = cos(v1, e1) = 1/sqrt2, cos(v0, e0) = 1, cos(v1, e0) = 0
    want_i2t = (-math.log(math.exp(10) / (math.exp(10) + math.exp(10 * c)))
                - math.log(math.exp(10 * c) / (math.exp(0) + math.exp(10 * c)))) / 2
    want_t2i = (-math.log(math.exp(10) / (math.exp(10) + math.exp(0)))
                - math.log(math.exp(10 * c) / (math.exp(10 * c) + math.exp(10 * c)))) / 2
    assert i2t.item() == pytest.approx(want_i2t, rel=1e-5) and t2i.item() == pytest.approx(want_t2i, rel=1e-5)


def test_triplet_terms_by_hand():
    # one region per image: alpha = 1, so c_w = the region and R = log sum_w exp(5 cos(E_w, region))
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    V = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    E = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # report 1 has one word + a padding
    M = torch.tensor([[True, True], [True, False]])
    pos, neg = torch.tensor([0, 1]), torch.tensor([1, 0])
    g_i2t, g_t2i, l_i2t, l_t2i = jt.triplet_terms(v, e, V, E, M, pos, neg, 4.0, 5.0, 0.5, 0.5)
    d01 = 1 - 1 / math.sqrt(2)  # d(v0, e1) = d(v1, e1)
    assert g_i2t.item() == pytest.approx((max(0 - d01 + 0.5, 0) + max(d01 - 1 + 0.5, 0)) / 2, rel=1e-6)
    # t2i: anchors e0, e1; d(e0, v0) = 0, d(e0, v1) = 1; d(e1, v1) = d01, d(e1, v0) = d01
    assert g_t2i.item() == pytest.approx((max(0 - 1 + 0.5, 0) + max(d01 - d01 + 0.5, 0)) / 2, rel=1e-6)
    R00, R01, R10, R11 = math.log(math.exp(5) + 1), 0.0, math.log(1 + math.exp(5)), 5.0  # R(image, report)
    assert l_i2t.item() == pytest.approx((max(R01 - R00 + 0.5, 0) + max(R10 - R11 + 0.5, 0)) / 2, rel=1e-5)
    assert l_t2i.item() == pytest.approx((max(R10 - R00 + 0.5, 0) + max(R01 - R11 + 0.5, 0)) / 2, rel=1e-5)
    # the code's quirk: negative report cut/padded to the anchor's length (report 1 gains its padding word
    # (1, 0) against image 0; report 0 loses its second word against image 1)
    _, _, q_i2t, q_t2i = jt.triplet_terms(v, e, V, E, M, pos, neg, 4.0, 5.0, 0.5, 0.5, quirk=True)
    R01q, R10q = math.log(1 + math.exp(5)), 0.0
    assert q_i2t.item() == pytest.approx((max(R01q - R00 + 0.5, 0) + max(R10q - R11 + 0.5, 0)) / 2, rel=1e-5)
    assert q_t2i.item() == pytest.approx(l_t2i.item())
    glob = jt.triplet_terms(v, e, V, E, M, pos, neg, 4.0, 5.0, 0.5, 0.5, local=False)   # --no-local
    assert len(glob) == 2 and glob[0].item() == g_i2t.item() and glob[1].item() == g_t2i.item()


def test_negatives_never_the_anchor():
    g = torch.Generator().manual_seed(0)
    neg = torch.stack([jt.sample_negatives(5, g) for _ in range(2000)])
    assert (neg != torch.arange(5)).all()
    counts = torch.bincount(neg[:, 0], minlength=5)[1:].float() / 2000  # uniform over the other four
    assert ((counts - 0.25).abs() < 0.04).all()


def test_mlm_masking_recipe():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 999, (400, 60), generator=g)
    ids[:, 0], ids[:, 30], ids[:, 50:] = 1, 2, 0          # [CLS], [SEP], padding
    ids[:, 10] = 3                                          # [UNK] is special too (ids <= 3)
    masked, labels = jt.mlm_mask(ids, mask_id=999, prob=0.15, generator=g)
    special = ids <= 3
    assert (masked[special] == ids[special]).all() and (labels[special] == -100).all()
    chosen = labels != -100
    assert (labels[chosen] == ids[chosen]).all()
    assert chosen.sum() / (~special).sum() == pytest.approx(0.15, abs=0.01)
    n = chosen.sum().float()
    to_mask = (masked == 999) & chosen
    changed = (masked != ids) & (masked != 999) & chosen
    assert to_mask.sum() / n == pytest.approx(0.8, abs=0.02)
    assert changed.sum() / n == pytest.approx(0.1, abs=0.015)
    assert ((masked[changed] >= 4) & (masked[changed] < 999)).all()
    assert (masked[~chosen] == ids[~chosen]).all()


def test_word_tokenizer(tmp_path):
    texts = ["The 2.5 cm nodule, in the RIGHT lung!! ___ at T12.", "Right lung: nodule ___ 3 views... no effusion"]
    tok = jt.build_word_tokenizer(texts, min_count=2)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[UNK]")] == [0, 1, 2, 3]
    assert vocab["[MASK]"] == len(vocab) - 1 == tok.mask_token_id
    assert set(vocab) == {"[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", "NUMBER", "right", "lung", "nodule", "___",
                          "the"}
    ids = tok(["Nodule 12 at t12 ___ (right)"], add_special_tokens=False)["input_ids"][0]
    assert tok.convert_ids_to_tokens(ids) == ["nodule", "NUMBER", "[UNK]", "[UNK]", "___", "right"]
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) == (1, 2, 0)
    tok.save_pretrained(tmp_path)
    again = jt.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert again(["Nodule 12 at t12 ___ (right)"], add_special_tokens=False)["input_ids"][0] == ids


# ---- DDP: 2 gloo processes equal one process on the full batch ----

class TinyPair(torch.nn.Module):
    """Two linear 'encoders': image inputs B x (1 + R) x 3 -> global + regions, text B x L x 5 -> [CLS] + words.
    Every position has a state, padding included, as BERT's do (what --triplet-quirk reads)."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(3, 4), torch.nn.Linear(5, 4)

    def forward(self, x, y, lengths):
        img, txt = self.image(x), self.text(y)
        M = torch.arange(y.shape[1])[None] < lengths[:, None]
        return img[:, 0], img[:, 1:], txt[:, 0], txt[:, 1:], M[:, 1:]


def _ddp_worker(rank, world, port, refs, inputs, state):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    # every rank pads its text batch to the longest report of any rank, so that the gathered words have one length
    ids = torch.full((2, 5 if rank == 0 else 3), 7)
    padded, mask = common.pad_to_longest_rank(ids, torch.ones_like(ids))
    assert padded.shape == mask.shape == (2, 5) and padded[:, ids.shape[1]:].eq(0).all()
    assert mask.sum().item() == ids.numel()
    torch.set_default_dtype(torch.float64)
    x, y, lengths, neg = inputs
    b = x.shape[0] // world
    sl = slice(rank * b, (rank + 1) * b)
    for quirk, ref in refs.items():
        model = TinyPair()
        model.load_state_dict(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # averages the gradients over the ranks
        feats = ddp(x[sl], y[sl], lengths[sl])
        *gathered, offset = common.gather_rows(*feats)
        out = jt.joimternet_loss(*feats, neg, gathered=gathered, offset=offset, triplet_quirk=quirk, **LOSS_ARGS)
        out["loss"].backward()
        for k, want in ref["terms"].items():
            got = out[k].detach().clone()
            torch.distributed.all_reduce(got)
            torch.testing.assert_close(got / world, want, rtol=1e-10, atol=1e-12)
        for p, want in zip(model.parameters(), ref["grads"]):
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)
    torch.distributed.destroy_process_group()


def test_ddp_gathered_losses_equal_full_batch():
    """Loss terms and gradients of 2 ranks x 3 pairs equal one process on 6, also with --triplet-quirk (whose negative
    reports read other ranks' pad-position word states)."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = TinyPair()
        x, y = torch.randn(6, 7, 3), torch.randn(6, 6, 5)    # 6 pairs: 1 + 6 regions, [CLS] + 5 words
        lengths = torch.tensor([6, 3, 5, 2, 4, 3])            # rank 1's longest report is shorter than rank 0's
        neg = jt.sample_negatives(6, torch.Generator().manual_seed(1))
        state, refs = {k: v.clone() for k, v in model.state_dict().items()}, {}
        for quirk in (False, True):
            model.zero_grad(set_to_none=True)
            out = jt.joimternet_loss(*model(x, y, lengths), neg, triplet_quirk=quirk, **LOSS_ARGS)
            out["loss"].backward()
            refs[quirk] = dict(terms={k: v.detach() for k, v in out.items()},
                               grads=[p.grad.clone() for p in model.parameters()])
        assert not torch.equal(refs[False]["terms"]["local_trip_i2t"], refs[True]["terms"]["local_trip_i2t"])
    finally:
        torch.set_default_dtype(dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, refs, (x, y, lengths, neg), state), nprocs=2, join=True)


# ---- the model end to end ----

TINY = ["--image-size", "64", "--widths", "4", "4", "8", "8", "32", "32", "--dim", "64", "--bert-layers", "1",
        "--batch-size", "8", "--eval-batch-size", "20", "--train-samples", "48", "--eval-samples", "20",
        "--cls-train-samples", "24", "--workers", "0", "--viz", "2", "--log-every", "1"]


def test_presets_keep_the_papers_defaults():
    paper = jt.common.parse_args(jt.Args, jt.PRESETS, ["--preset", "paper"])
    assert paper == jt.Args(preset="paper", data="mimic") and paper.augment and paper.lr == 1e-4 and paper.p_mlm == 0.7
    assert (paper.seed, paper.workers, paper.viz, paper.n_boot) == (12345, 8, 4, 1000)  # common.RunArgs' defaults
    demo = jt.common.parse_args(jt.Args, jt.PRESETS, ["--preset", "demo"])
    assert not demo.augment and demo.lr == 1e-3  # the demo's plain views (docstring deviations)
    assert isinstance(demo, jt.common.RunArgs) and demo.workers == 1 and demo.viz == 4


def test_loss_is_the_pure_function_the_forward_calls():
    """joimternet_loss on the encoders' features gives exactly the terms of the model's forward, and the same again
    when called twice with the same tensors, which it leaves as they were."""
    import data
    args = jt.common.parse_args(jt.Args, jt.PRESETS, ["--preset", "demo", *TINY])
    ds = data.make_dataset("synthetic", None, "train", 64, False, 0, 6)
    samples = [ds[i] for i in range(6)]
    tok = jt.build_word_tokenizer([s["text"] for s in samples], min_count=1)
    batch = data.collate(samples, tok, 160)
    torch.manual_seed(0)
    model = jt.JoImTeRNet(args, len(tok)).eval()  # no dropout: the two encoder passes agree
    neg = jt.sample_negatives(6, torch.Generator().manual_seed(0))
    forward = model(batch, neg=neg)
    img, txt = model.image(batch["images"]), model.text(batch["input_ids"], batch["attention_mask"])
    feats = (img["global_feat"], img["local_feats"], txt["sent"], txt["words"], txt["word_mask"])
    before = [t.detach().clone() for t in feats]
    hyper = dict(gamma1=args.gamma1, gamma2=args.gamma2, gamma3=args.gamma3, margin_sent=args.margin_sent,
                 margin_word=args.margin_word, lambda_ce=args.lambda_ce, lambda_triplet=args.lambda_triplet,
                 triplet_quirk=args.triplet_quirk, chunk=args.local_chunk, local=not args.no_local)
    first = jt.joimternet_loss(*feats, neg, **hyper)
    again = jt.joimternet_loss(*feats, neg, **hyper)
    assert set(first) == set(forward) == {"loss", *TERMS}
    for k in forward:
        assert torch.equal(first[k], forward[k]) and torch.equal(again[k], first[k]), k
    assert all(torch.equal(t, b) for t, b in zip(feats, before))
    first["loss"].backward()  # the total carries the gradient to both encoders
    assert model.image.region.weight.grad.abs().sum() > 0 and model.text.word_fc.weight.grad.abs().sum() > 0


def test_overfit_one_batch():
    import data
    cfg = jt.common.parse_args(jt.Args, jt.PRESETS, ["--preset", "demo", *TINY, "--dropout", "0"])
    ds = data.make_dataset("synthetic", None, "train", 64, False, 0, 8)
    samples = [ds[i] for i in range(8)]
    tok = jt.build_word_tokenizer([s["text"] for s in samples], min_count=1)
    batch = data.collate(samples, tok, 160)
    torch.manual_seed(0)
    model = jt.JoImTeRNet(cfg, len(tok))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    neg = jt.sample_negatives(8, torch.Generator().manual_seed(0))
    first = None
    for _ in range(80):
        out = model(batch, neg=neg)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["loss"].item()
    assert out["loss"].item() < 0.3 * first
    with torch.no_grad():  # the batch's own pairs are retrieved (train-mode BN: the statistics it was fit with)
        sim = model.encode_image(batch["images"]) @ model.encode_text(batch).T
    assert (sim.argmax(1) == torch.arange(8)).float().mean() >= 0.75


def test_batch_of_one_leaves_the_triplet_terms_out():
    import data
    args = jt.common.parse_args(jt.Args, jt.PRESETS, ["--preset", "demo", *TINY])
    ds = data.make_dataset("synthetic", None, "validate", 64, False, 0, 3)
    tok = jt.build_word_tokenizer(data.report_texts(ds), min_count=1)
    torch.manual_seed(0)
    model = jt.JoImTeRNet(args, len(tok)).eval()
    with pytest.raises(ValueError, match="no negative"):
        jt.sample_negatives(1)
    with torch.no_grad():
        out = model(data.collate([ds[0]], tok, 160), gather=False)
    assert set(out) == {"loss", *TERMS[:4]} and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(sum(out[k].item() for k in TERMS[:4]))  # lambda_ce = 1
    # a validation split of 3 pairs in batches of 2: the last batch holds one pair (it crashed before)
    loader = torch.utils.data.DataLoader(ds, 2, collate_fn=lambda s: data.collate(s, tok, 160))
    val = jt.validate(model, loader, tok, args, torch.device("cpu"), None)
    assert set(val) == {f"val/{k}" for k in (*TERMS, "mlm", "mlm_acc")}
    assert all(math.isfinite(v) for v in val.values())


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("joimternet") / "run")
    return out, jt.main(["--preset", "demo", *TINY, "--out-dir", out, "--max-steps", "3"])


def test_main_three_steps_and_resume(three_step_run):
    out, res = three_step_run
    assert set(res) == {"untrained", "trained"}
    with open(os.path.join(out, "eval.json")) as fh:
        saved = json.load(fh)
    assert json.dumps(saved) == json.dumps(res)  # common.save_results' layout (nan for a class with one outcome)
    for entry in res.values():
        assert set(entry) == {"retrieval", "zero_shot", "checks"}
        assert set(entry["retrieval"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
        assert "mean" in entry["zero_shot"] and all(len(v) == 3 for v in entry["zero_shot"].values())
        assert {"cls/Avg", "cls/Cardiomegaly"} <= set(entry["checks"])
        assert not any("block" in k for k in entry["checks"])  # 20 test pairs: one block, the whole gallery
    ck = jt.common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 3 and ck["epoch"] == 0  # stopped inside the first epoch of 6 ITM steps
    assert ck["itm_in_epoch"] == ck["itm_step"] and ck["mlm_in_epoch"] == 3 - ck["itm_step"]
    enc = torch.load(os.path.join(out, "image_encoder.pt"), weights_only=True)
    assert enc["arch"] == "joimternet-resnet" and enc["in_chans"] == 1
    assert enc["config"] == dict(dim=64, widths=[4, 4, 8, 8, 32, 32], stem_stride=1)
    image = jt.common.SoftAttentionResNet(64, (4, 4, 8, 8, 32, 32), stem_stride=1)
    image.load_state_dict(enc["state_dict"])
    image.eval()
    assert image(torch.zeros(1, 1, 64, 64))["local_feats"].shape == (1, 4, 64)  # 2 x 2 regions at 64 px
    text_dir = os.path.join(out, "text_encoder")
    assert jt.BertModel.from_pretrained(text_dir).config.num_hidden_layers == 1
    assert jt.PreTrainedTokenizerFast.from_pretrained(text_dir).mask_token_id == len(jt.PreTrainedTokenizerFast
                                                                                      .from_pretrained(text_dir)) - 1
    assert len([f for f in os.listdir(os.path.join(out, "viz")) if f.endswith(".png")]) == 4  # 2 x (untrained, trained)
    with open(os.path.join(out, "metrics.csv")) as fh:
        header = fh.readline()
    assert "loss/total" in header and "loss/local_ce_i2t" in header and "loss/mlm" in header
    jt.main(["--preset", "demo", *TINY, "--out-dir", out, "--max-steps", "5", "--epochs", "2", "--resume"])
    assert jt.common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 5


def test_export_is_judged_by_both_evaluation_scripts(three_step_run, tmp_path):
    """eval_seg.py and eval_det.py rebuild JoImTeRNet's soft-attention ResNet from image_encoder.pt alone."""
    import eval_det
    import eval_seg
    path = os.path.join(three_step_run[0], "image_encoder.pt")
    (name, encoder, meta), (_, baseline, _) = eval_seg.load_encoders([path, "random"], 64)
    assert meta["method"] == "joimternet" and isinstance(encoder, jt.common.SoftAttentionResNet)
    assert isinstance(baseline, jt.common.SoftAttentionResNet)  # `random` = the same architecture, untrained
    common_args = ["--encoder", path, "--synthetic-samples", "10", "--image-size", "64", "--epochs", "1",
                   "--seeds", "1", "--batch-size", "4"]
    seg = eval_seg.main([*common_args, "--head", "linear", "--head", "unet", "--out", str(tmp_path / "seg")])
    assert [r["head"] for r in seg] == ["linear", "unet"] and all(0 <= r["dice"][0] <= 1 for r in seg)
    det = eval_det.main([*common_args, "--fpn-channels", "32", "--head-convs", "1", "--out", str(tmp_path / "det")])
    assert det[0]["method"] == "joimternet" and 0 <= det[0]["map"][0] <= 1
    with pytest.raises(SystemExit, match="strides"):  # stem stride 4: c1 .. c5 at strides 8 .. 128
        jt.common.export_image_encoder(str(tmp_path / "s4.pt"), jt.common.SoftAttentionResNet(64, (4,) * 6, 4),
                                       0.5, 0.25, 64, "joimternet")
        eval_seg.load_encoders([str(tmp_path / "s4.pt")], 64)


def test_idle_heads_keep_stepping_with_zero_gradients(tmp_path):
    """The code zeroes gradients with zeros: the ITM step after an MLM step still moves the MLM head (AdamW's
    momentum and weight decay); --no-step-idle-heads leaves it where the MLM step put it."""
    seed = next(s for s in range(100) if _mlm_then_itm(s))

    def run(name, steps, *flags):
        jt.main(["--preset", "demo", *TINY, "--seed", str(seed), "--p-mlm", "0.5", "--max-steps", str(steps),
                 "--out-dir", str(tmp_path / name), "--viz", "0", *flags])
        return jt.common.load_checkpoint(tmp_path / name / "ckpt.pt")["model"]
    after_mlm, idle, skipped = run("a", 1), run("b", 2, "--step-idle-heads"), run("c", 2, "--no-step-idle-heads")
    head = [k for k in after_mlm if k.startswith("text.mlm.")]
    assert head and all(torch.equal(after_mlm[k], skipped[k]) for k in head)
    assert not any(torch.equal(after_mlm[k], idle[k]) for k in head if k.endswith("weight"))
    assert not torch.equal(after_mlm["image.region.weight"], skipped["image.region.weight"])  # the ITM step ran


def _mlm_then_itm(seed):
    g = torch.Generator().manual_seed(seed + 1)  # main's task generator
    return [torch.rand((), generator=g).item() < 0.5 for _ in range(2)] == [True, False]


def test_bench_prints_throughput(capsys):
    jt.main(["--preset", "demo", *TINY, "--bench", "2"])
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("bench:")]
    assert len(line) == 1 and "images/s" in line[0] and "peak memory" in line[0]
    speed = float(line[0].split()[1])
    assert speed > 0


def test_no_local_keeps_exactly_the_global_terms():
    """--no-local (the global-only ablation): the four global terms are those of the full objective, the total is
    their weighted sum, and the regions and words get no gradient."""
    torch.manual_seed(0)
    v, e = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    V, E = torch.randn(4, 5, 8, requires_grad=True), torch.randn(4, 6, 8, requires_grad=True)
    M = torch.arange(6) < torch.tensor([[6], [4], [3], [5]])
    neg = torch.tensor([1, 2, 3, 0])
    full = jt.joimternet_loss(v, V, e, E, M, neg, **LOSS_ARGS)
    glob = jt.joimternet_loss(v, V, e, E, M, neg, local=False, **LOSS_ARGS)
    kept = ("global_ce_i2t", "global_ce_t2i", "global_trip_i2t", "global_trip_t2i")
    assert set(glob) == {"loss", *kept}
    for k in kept:
        torch.testing.assert_close(glob[k], full[k])
    want = LOSS_ARGS["lambda_ce"] * (glob["global_ce_i2t"] + glob["global_ce_t2i"]) + LOSS_ARGS["lambda_triplet"] * (
        glob["global_trip_i2t"] + glob["global_trip_t2i"])
    torch.testing.assert_close(glob["loss"], want)
    glob["loss"].backward()
    assert V.grad is None and E.grad is None and v.grad.abs().sum() > 0


def test_triplet_gradients_are_bitwise_reproducible_on_two_threads():
    """The negatives repeat: with rows taken by advanced indexing, the backward accumulated them with atomic adds and
    two runs of the demo differed in the last bits from ITM step 6 on (then everywhere). index_select's backward adds
    them in order."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        n, r, l, d = 64, 16, 12, 64
        leaves = [torch.randn(*s, requires_grad=True) for s in ((n, d), (n, d), (n, r, d), (n, l, d))]
        mask = torch.rand(n, l) < 0.8
        mask[:, 0] = True
        neg = torch.randint(0, 8, (n,))  # 64 anchors, 8 negatives: every one repeated

        def grads():
            for t in leaves:
                t.grad = None
            sum(jt.triplet_terms(*leaves, mask, torch.arange(n), neg, 4.0, 5.0, 0.5, 0.5)).backward()
            return [t.grad.clone() for t in leaves]
        first = grads()
        assert all(all(torch.equal(a, b) for a, b in zip(first, grads())) for _ in range(10))
    finally:
        torch.set_num_threads(before)

"""LRCLR tests (CPU, tiny shapes): the top-K gate's gradients, the pooling without text residual, scores and the pure
loss against written-out references and the forward, DDP equivalence, base -> lrclr main() runs, export, resume, NaN
stop."""
import json
import math
import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import common
import lrclr


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes leave nothing to share between threads (two spin-waiting OpenMP threads are slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cos(a, b):
    a, b = a.detach(), b.detach()
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def hand_ce(S, offset=0):
    """CE_rows of a list-of-lists score matrix, row b's positive at column b + offset."""
    return sum(-S[b][b + offset] + math.log(sum(math.exp(s) for s in S[b])) for b in range(len(S))) / len(S)


def transpose(S):
    return [list(col) for col in zip(*S)]


# ---------- the region-selection layer ----------
def test_top_k_gate_passes_a_gradient_to_the_scorer_and_none_to_unselected_tokens():
    torch.manual_seed(0)
    select = lrclr.RegionSelection(8, top_k=0, hidden=16)
    assert select.k(16) == 3 and select.k(49) == 8 and select.k(4) == 1 and select.k(196) == 33
    tokens = torch.randn(2, 16, 8, requires_grad=True)
    kept, index, gates = select(tokens)
    assert kept.shape == (2, 3, 8) and index.shape == (2, 3) and gates.shape == (2, 16)
    assert (gates - 0.5).abs().max() < 0.01  # small last layer, zero bias: every gate starts near 0.5
    scores = torch.logit(gates)
    assert torch.equal(index, scores.topk(3, dim=1).indices)  # the three highest scores, highest first
    for b in range(2):  # kept = sigmoid(s_r) p_r for the selected cells
        for slot, r in enumerate(index[b].tolist()):
            assert torch.allclose(kept[b, slot], gates[b, r] * tokens[b, r])
    (kept * torch.randn_like(kept)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in select.parameters())  # the scorer learns
    selected = torch.zeros(2, 16, dtype=torch.bool).scatter(1, index, True)
    assert tokens.grad[~selected].abs().max() == 0 and (tokens.grad[selected].abs().sum(-1) > 0).all()


# ---------- the text-guided pooling ----------
def test_text_guided_pooling_against_a_written_out_loop():
    torch.manual_seed(1)
    pool = lrclr.TextGuidedPooling(6, heads=2)
    regions, texts = torch.randn(2, 3, 6), torch.randn(4, 6)
    z, beta = pool(regions, texts)
    assert z.shape == (2, 4, 6) and beta.shape == (2, 4, 2, 3)
    for i in range(2):
        for j in range(4):
            heads = []
            for h in range(2):
                sl = slice(3 * h, 3 * h + 3)
                q, k, v = pool.query(texts[j])[sl], pool.key(regions[i])[:, sl], pool.value(regions[i])[:, sl]
                b = torch.softmax(k @ q / math.sqrt(3), 0)                # over the 3 regions
                assert torch.allclose(beta[i, j, h], b, atol=1e-6)
                heads.append(b @ v)
            want = F.layer_norm(pool.out(torch.cat(heads)), (6,), pool.norm.weight, pool.norm.bias)
            assert torch.allclose(z[i, j], want, atol=1e-5)


def test_text_reaches_z_only_through_the_attention_weights():
    torch.manual_seed(2)
    pool = lrclr.TextGuidedPooling(8, heads=4)
    # one region: beta = 1 whatever the text, so z carries nothing of it (a residual would)
    texts = torch.randn(3, 8, requires_grad=True)
    z, _ = pool(torch.randn(2, 1, 8), texts)
    z.square().sum().backward()
    assert texts.grad.abs().max() == 0
    assert torch.allclose(z[:, 0], z[:, 1]) and torch.allclose(z[:, 0], z[:, 2])
    # W_Q = 0: uniform beta, z = LN(W_O mean_r W_V q_r) for any text, even a huge one
    with torch.no_grad():
        pool.query.weight.zero_(), pool.query.bias.zero_()
    regions = torch.randn(2, 5, 8)
    z, beta = pool(regions, 1e3 * torch.randn(3, 8))
    assert torch.allclose(beta, torch.full_like(beta, 1 / 5))
    want = pool.norm(pool.out(pool.value(regions).mean(1)))
    assert torch.allclose(z, want[:, None].expand_as(z), atol=1e-5)


# ---------- scores and losses ----------
def test_local_score_matrix_and_the_combined_score_by_hand():
    torch.manual_seed(3)
    interact = lrclr.Interaction(8, heads=2, dropout=0.0).eval()
    with torch.no_grad():
        interact.log_tau.fill_(math.log(0.2))
    q, u = torch.randn(3, 2, 8), torch.randn(4, 8)
    s, beta = interact.scores(q, u)
    z, _ = interact.pool(q, u)
    assert s.shape == (3, 4) and beta.shape == (3, 4, 2, 2)
    assert torch.allclose(beta.sum(-1), torch.ones(3, 4, 2))
    for i in range(3):
        for j in range(4):
            assert s[i, j].item() == pytest.approx(cos(z[i, j], u[j]) / 0.2, rel=1e-5)
    # the model's scores: global = logit scale x cosine, local = the matrix above, combined = their sum
    model = lrclr.LRCLR.__new__(lrclr.LRCLR)
    nn.Module.__init__(model)
    model.log_logit_scale, model.interact = nn.Parameter(torch.tensor(math.log(20.0))), interact
    g = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [1.0, 1.0, 0, 0, 0, 0, 0, 0], [0, 0, 3.0, 0, 0, 0, 0, 0]])
    scores = model.pair_scores(g, q, u, chunk=2)
    for i in range(3):
        for j in range(4):
            assert scores["global"][i, j].item() == pytest.approx(20 * cos(g[i], u[j]), rel=1e-5)
    assert torch.allclose(scores["local"], s, atol=1e-6)
    with torch.no_grad():
        model.log_logit_scale.fill_(math.log(500.0))
    assert model.logit_scale().item() == pytest.approx(100.0)  # CLIP's clamp


def test_symmetric_ce_and_the_terms_against_written_out_references():
    torch.manual_seed(4)
    S = torch.randn(3, 3)
    want = 0.5 * (hand_ce(S.tolist()) + hand_ce(transpose(S.tolist())))
    assert lrclr.symmetric_ce(S, S.T).item() == pytest.approx(want, rel=1e-6)
    rows, cols = torch.randn(2, 6), torch.randn(2, 6)  # rank 1 of 3 ranks: positives at columns 2, 3
    want = 0.5 * (hand_ce(rows.tolist(), 2) + hand_ce(cols.tolist(), 2))
    assert lrclr.symmetric_ce(rows, cols, offset=2).item() == pytest.approx(want, rel=1e-6)

    g, u = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)  # unit embeddings
    rows, cols, gates = torch.randn(3, 3), torch.randn(3, 3), torch.rand(3, 5)
    terms = lrclr.lrclr_loss(g, u, g, u, torch.tensor(14.0), 0, rows, cols, gates, lambda_loc=0.5, mu_sparsity=0.1)
    G = [[14.0 * cos(g[i], u[j]) for j in range(3)] for i in range(3)]
    assert terms["global"].item() == pytest.approx(0.5 * (hand_ce(G) + hand_ce(transpose(G))), rel=1e-5)
    assert terms["local"].item() == pytest.approx(0.5 * (hand_ce(rows.tolist()) + hand_ce(cols.tolist())), rel=1e-5)
    assert terms["sparsity"].item() == pytest.approx(gates.mean().item())
    want = terms["global"] + 0.5 * terms["local"] + 0.1 * terms["sparsity"]
    assert terms["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    base = lrclr.lrclr_loss(g, u, g, u, torch.tensor(14.0))  # stage base: the global term alone
    assert set(base) == {"loss", "global"} and torch.equal(base["loss"], terms["global"])
    # rank 1 of 2: own rows 3..5 of the gathered columns, the positives at offset 3
    g_all = torch.cat([F.normalize(torch.randn(3, 8), dim=-1), g])
    u_all = torch.cat([F.normalize(torch.randn(3, 8), dim=-1), u])
    rows, cols = torch.randn(3, 6), torch.randn(3, 6)
    terms = lrclr.lrclr_loss(g, u, g_all, u_all, torch.tensor(14.0), 3, rows, cols, gates)
    G = [[14.0 * cos(g[i], u_all[j]) for j in range(6)] for i in range(3)]
    H = [[14.0 * cos(u[i], g_all[j]) for j in range(6)] for i in range(3)]
    assert terms["global"].item() == pytest.approx(0.5 * (hand_ce(G, 3) + hand_ce(H, 3)), rel=1e-5)
    assert terms["local"].item() == pytest.approx(0.5 * (hand_ce(rows.tolist(), 3) + hand_ce(cols.tolist(), 3)),
                                                  rel=1e-5)


def test_the_pure_loss_gives_the_forward_terms_and_reaches_no_module_or_process_group(monkeypatch):
    """lrclr_loss on the tensors the forward computes = the forward's terms; called again on the same tensors, the
    same values, the inputs untouched; and it never asks torch.distributed anything."""
    args = common.parse_args(lrclr.Args, lrclr.PRESETS, TINY + ["--stage", "lrclr", "--lambda-loc", "0.5",
                                                                 "--mu-sparsity", "0.1"])
    tokenizer = common_tokenizer()
    import data
    ds = data.make_dataset("synthetic", split="train", image_size=64, train=True, num_samples=4)
    batch = data.collate([ds[i] for i in range(4)], tokenizer, max_length=64)
    torch.manual_seed(0)
    model = lrclr.LRCLR(args, tokenizer).eval()  # eval: no dropout, the BatchNorms' running statistics
    with torch.no_grad():
        model.interact.log_tau.fill_(math.log(0.1))
        terms = model(batch)
        g, tokens, _ = model.image_features(batch["images"])
        u = model.text_features(batch)
        kept, _, gates = model.select(tokens)
        rows = model.interact.scores(model.interact.block(kept), u)[0]
    g, u = F.normalize(g, dim=-1), F.normalize(u, dim=-1)
    inputs = (g, u, g, u, model.logit_scale().detach(), 0, rows, rows.T, gates)
    before = [x.clone() if torch.is_tensor(x) else x for x in inputs]

    def no_process_group(*a, **k):
        raise AssertionError("the loss asked torch.distributed")
    for name in ("is_available", "is_initialized", "get_rank", "get_world_size"):
        monkeypatch.setattr(torch.distributed, name, no_process_group)
    first = lrclr.lrclr_loss(*inputs, lambda_loc=0.5, mu_sparsity=0.1)
    again = lrclr.lrclr_loss(*inputs, lambda_loc=0.5, mu_sparsity=0.1)
    assert list(first) == list(terms) == ["loss", "global", "local", "sparsity"]
    for k in terms:
        assert torch.equal(first[k], terms[k]) and torch.equal(again[k], first[k]), k
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(inputs, before))
    assert first["loss"].item() == pytest.approx((first["global"] + 0.5 * first["local"]
                                                  + 0.1 * first["sparsity"]).item(), rel=1e-6)


# ---------- DDP: 2 gloo processes equal one process on the full batch ----------
class TinyLRCLR(lrclr.LRCLR):
    """LRCLR's forward (gathers, added layers, lrclr_loss) behind linear 'encoders' (cells B x 5 x 3 -> tokens,
    text B x 4 -> u)."""

    def __init__(self):
        nn.Module.__init__(self)
        torch.manual_seed(0)
        self.args, self.local = SimpleNamespace(lambda_loc=1.0, mu_sparsity=0.5), True
        self.image, self.text = nn.Linear(3, 8), nn.Linear(4, 8)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.select, self.interact = lrclr.RegionSelection(8, 2, 6), lrclr.Interaction(8, 2, dropout=0.0)
        nn.init.normal_(self.select.mlp[2].weight)  # spread gates: the selection differs per image

    def image_features(self, cells):
        tokens = self.image(cells)
        return tokens.mean(1), tokens, None

    def text_features(self, batch):
        return self.text(batch["reports"])


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, 3, generator=g), torch.randn(6, 4, generator=g)


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cells, reports = _inputs()
        rows = slice(3 * rank, 3 * rank + 3)
        model = nn.parallel.DistributedDataParallel(TinyLRCLR())  # averages the gradients over the ranks
        terms = model(dict(images=cells[rows], reports=reports[rows]))
        terms["loss"].backward()
        means = {k: v.detach().clone() for k, v in terms.items()}
        for v in means.values():
            torch.distributed.all_reduce(v)
        torch.save(dict(terms={k: v / world for k, v in means.items()},
                        grads={n: p.grad for n, p in model.module.named_parameters()}),
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_local_and_global_losses_and_gradients_equal_the_full_batch(tmp_path):
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = TinyLRCLR()
        cells, reports = _inputs()
        terms = model(dict(images=cells, reports=reports))
        terms["loss"].backward()
    finally:
        torch.set_default_dtype(dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = "fork" if sys.platform == "linux" else "spawn"  # fork: no re-import of torch in the children
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method=start)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for k, v in terms.items():
        assert got["terms"][k].item() == pytest.approx(v.item(), rel=1e-12), k
    for n, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, n  # every parameter takes part, the scorer included
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


# ---------- main(): base -> control -> lrclr, export, resume, NaN stop ----------
TINY = ["--preset", "demo", "--image-size", "64", "--train-samples", "16", "--eval-samples", "8", "--batch-size", "4",
        "--ft-batch-size", "4", "--dim", "32", "--heads", "4", "--top-k", "2", "--scorer-hidden", "16",
        "--max-length", "64", "--n-boot", "20", "--workers", "0", "--log-every", "1", "--viz", "2", "--max-steps", "3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lrclr") / "run"
    return root, lrclr.main(TINY + ["--out-dir", str(root)])  # --stage both: base, control, lrclr


def test_three_steps_of_each_stage_and_the_comparison(demo_run):
    root, result = demo_run
    assert {"base", "control", "LRCLR global", "LRCLR local", "LRCLR global+local"} == set(result)
    assert {"i2t_R@1", "t2i_R@5"} <= set(result["LRCLR global+local"]["retrieval"])
    assert {"effusion", "mean"} <= set(result["LRCLR global+local"]["zero_shot"])
    assert result["LRCLR global+local"]["checks"] == {}
    for stage in ("base", "control", "lrclr"):
        assert common.load_checkpoint(root / stage / "ckpt.pt")["step"] == 3
    assert not any(k.startswith(lrclr.NEW_LAYERS) for k in common.load_checkpoint(root / "base" / "ckpt.pt")["model"])
    args = json.loads((root / "lrclr" / "args.json").read_text())
    assert args["stage"] == "lrclr" and args["init"].endswith("base") and args["lr"] == args["ft_lr"]
    saved = json.loads((root / "lrclr" / "eval.json").read_text())
    assert set(saved) == set(result) | {"trained", "paired_delta"}
    assert saved["trained"] == saved["LRCLR global+local"]  # the suite's entry: the run's model, its own score
    auc, lo, hi = saved["base"]["zero_shot"]["mean"]
    assert lo <= auc <= hi and "LRCLR global+local - base" in saved["paired_delta"]
    # the base column of the lrclr run is the base run's own trained model, evaluated again
    base = json.loads((root / "base" / "eval.json").read_text())
    assert set(base) == {"untrained", "base", "trained", "paired_delta"} and base["trained"] == base["base"]
    assert "base - untrained" in base["paired_delta"]
    assert saved["base"]["retrieval"] == pytest.approx(base["base"]["retrieval"], nan_ok=True)
    assert saved["base"]["zero_shot"].keys() == base["base"]["zero_shot"].keys()
    for finding, ci in saved["base"]["zero_shot"].items():
        assert ci == pytest.approx(base["base"]["zero_shot"][finding]), finding
    assert "| finding | base | control |" in (root / "lrclr" / "zero_shot.txt").read_text()
    assert sorted(os.listdir(root / "lrclr" / "viz")) == ["sample0.png", "sample1.png"]


def test_export_loads_with_weights_only(demo_run):
    root, _ = demo_run
    payload = torch.load(root / "lrclr" / "image_encoder.pt", weights_only=True)
    assert payload["arch"] == "resnet18" and payload["method"] == "lrclr" and payload["image_size"] == 64
    encoder, _ = common.load_image_encoder(str(root / "lrclr" / "image_encoder.pt"))
    assert encoder(torch.zeros(1, 1, 64, 64))["local_feats"].shape == (1, 4, 512)
    from transformers import AutoTokenizer, BertModel
    assert BertModel.from_pretrained(root / "lrclr" / "text_encoder").config.num_hidden_layers == 2
    assert len(AutoTokenizer.from_pretrained(root / "lrclr" / "text_encoder")) > 10


def test_init_takes_the_base_weights_and_rejects_other_folders(demo_run, tmp_path):
    root, _ = demo_run
    args = lrclr.stage_args(common.parse_args(lrclr.Args, lrclr.PRESETS, TINY + ["--stage", "lrclr", "--init",
                                                                                  str(root / "base")]))
    assert args.dim == 32 and args.batch_size == args.ft_batch_size and args.image_weights == "none"
    tokenizer = lrclr.report_tokenizer(args, None)
    model = lrclr.load_run(lrclr.LRCLR(args, tokenizer), root / "base")
    base = common.load_checkpoint(root / "base" / "ckpt.pt")["model"]  # 3 steps: no epoch end, no best.pt
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    with pytest.raises(SystemExit, match="neither best.pt nor ckpt.pt"):
        lrclr.load_run(model, tmp_path)
    wide = lrclr.LRCLR(lrclr.replace(args, dim=16, heads=2), tokenizer)
    with pytest.raises(SystemExit, match="does not fit"):
        lrclr.load_run(wide, root / "base")


def test_resume_equals_uninterrupted(demo_run, tmp_path):
    root, _ = demo_run
    run = TINY + ["--stage", "lrclr", "--init", str(root / "base"), "--viz", "0", "--dropout", "0.1"]
    lrclr.main(run + ["--out-dir", str(tmp_path / "a"), "--max-steps", "4"])
    lrclr.main(run + ["--out-dir", str(tmp_path / "b"), "--max-steps", "2"])
    lrclr.main(run + ["--out-dir", str(tmp_path / "b"), "--max-steps", "4", "--resume"])
    a, b = (common.load_checkpoint(tmp_path / n / "ckpt.pt") for n in "ab")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_loss_goes_down_on_one_batch():
    import data
    args = common.parse_args(lrclr.Args, lrclr.PRESETS, TINY + ["--stage", "lrclr", "--dropout", "0"])
    ds = data.make_dataset("synthetic", split="train", image_size=64, train=True, num_samples=8)
    samples = [ds[i] for i in range(8)]
    tokenizer = data.build_tokenizer([s["text"] for s in samples])
    batch = data.collate(samples, tokenizer, max_length=64)
    torch.manual_seed(0)
    model = lrclr.LRCLR(args, tokenizer)
    opt = torch.optim.AdamW(lrclr.param_groups(model, lrclr.replace(args, lr=1e-3, ft_lr_new=1e-3)))
    first = model(batch)
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["loss"].item() == pytest.approx(out["global"].item() + out["local"].item(), rel=1e-6)
    assert out["global"].item() < 0.5 * first["global"].item() and out["local"].item() < 0.5 * first["local"].item()


def test_stage_lrclr_needs_its_base_and_takes_the_bases_encoder_fields(tmp_path):
    paper = ["--preset", "paper", "--stage", "lrclr"]
    with pytest.raises(SystemExit, match="pass --init RUN"):  # it used to train from scratch, silently
        lrclr.stage_args(common.parse_args(lrclr.Args, lrclr.PRESETS, paper))
    base = common.parse_args(lrclr.Args, lrclr.PRESETS, ["--preset", "demo", "--stage", "base"])
    (tmp_path / "args.json").write_text(json.dumps(common.plain(base)))
    args = lrclr.stage_args(common.parse_args(lrclr.Args, lrclr.PRESETS, paper + ["--init", str(tmp_path)]))
    # the base's encoders and report pooling (the demo's mean, not the paper default's [CLS]) carry over
    assert (args.image_arch, args.text_model, args.text_pool, args.dim) == ("resnet18", "tiny", "mean", 256)
    assert args.image_weights == "none"  # the weights come from the base's checkpoint


def test_param_groups_follow_the_two_learning_rates(tmp_path):
    (tmp_path / "args.json").write_text(json.dumps(common.plain(common.parse_args(lrclr.Args, lrclr.PRESETS,
                                                                                  ["--preset", "paper"]))))
    args = lrclr.stage_args(common.parse_args(lrclr.Args, lrclr.PRESETS, ["--preset", "paper", "--stage", "lrclr",
                                                                          "--init", str(tmp_path)]))
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs) == (1e-5, 1e-4, 64, 3)
    model = nn.Module()
    model.image_proj, model.log_logit_scale = nn.Linear(2, 2), nn.Parameter(torch.zeros(()))
    model.select, model.interact = nn.Linear(2, 2), nn.Module()
    model.interact.log_tau = nn.Parameter(torch.zeros(()))
    groups = {(g["lr"], g["weight_decay"]): len(g["params"]) for g in lrclr.param_groups(model, args)}
    assert groups == {(1e-5, 1e-4): 2, (1e-5, 0.0): 1, (1e-4, 0.1): 2, (1e-4, 0.0): 1}


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls, lrclr_loss = [], lrclr.lrclr_loss

    def nan_from_third_call(*args, **kwargs):
        calls.append(1)
        terms = lrclr_loss(*args, **kwargs)
        return dict(terms, loss=terms["loss"] * float("nan")) if len(calls) >= 3 else terms
    monkeypatch.setattr(lrclr, "lrclr_loss", nan_from_third_call)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        lrclr.main(TINY + ["--stage", "base", "--out-dir", str(tmp_path), "--ckpt-every", "1"])
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_vit_patches_are_the_local_tokens(tmp_path):
    """The tiny ViT's 8 x 8 patches (ViT-B/16's 14 x 14 in the paper preset) are the grid, with no model change."""
    result = lrclr.main(TINY + ["--image-arch", "vit_tiny", "--image-size", "128", "--viz", "0", "--out-dir",
                                str(tmp_path / "run")])
    assert "LRCLR global+local" in result
    payload = torch.load(tmp_path / "run" / "lrclr" / "image_encoder.pt", weights_only=True)
    assert payload["arch"] == "vit_tiny" and payload["image_size"] == 128
    encoder, _ = common.load_image_encoder(str(tmp_path / "run" / "lrclr" / "image_encoder.pt"))
    assert encoder(torch.zeros(1, 1, 128, 128))["local_feats"].shape == (1, 64, 192)


def test_one_normalisation_for_the_global_vector_and_the_cells():
    """On a ResNet grid g = mean_r p_r in training too (it used to hold only in eval mode, where both calls used the
    running statistics: training normalised g with its own batch statistics, so evaluation scored an embedding the
    loss never trained), and the eval-mode g is the same map of the cells' statistics."""
    torch.manual_seed(0)
    args = common.parse_args(lrclr.Args, lrclr.PRESETS, TINY + ["--stage", "base"])
    model = lrclr.LRCLR(args, common_tokenizer())
    images = torch.randn(6, 1, 64, 64)
    model.train()
    g, p, _ = model.image_features(images)
    assert torch.allclose(g, p.mean(1), atol=1e-5)
    proj = model.image_proj
    with torch.no_grad():  # the running statistics equal to this batch's: eval mode gives the training embedding
        cells = model.image_encoder(images)["local_feats"].flatten(0, 1)
        proj.norm.running_mean.copy_(cells.mean(0))
        proj.norm.running_var.copy_(cells.var(0, unbiased=False))
    model.eval()
    g_eval, p_eval, _ = model.image_features(images)
    assert torch.allclose(g_eval, p_eval.mean(1), atol=1e-5)
    model.image_encoder.train()  # its BatchNorms as in the training pass above
    g_eval, _, _ = model.image_features(images)
    assert torch.allclose(g_eval, g, atol=1e-4)


def common_tokenizer():
    ds = lrclr.data.make_dataset("synthetic", split="train", image_size=64, num_samples=8)
    return lrclr.data.build_tokenizer(lrclr.data.report_texts(ds))

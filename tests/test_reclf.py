"""RECLF tests (CPU, tiny shapes): GLoRIA's local score by hand, matching vectors, IRM/SRM masks, chunking,
word pieces, DDP equivalence, overfit, a 3-step main() with resume and export."""
import inspect
import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import common
import data
import reclf


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gloria_local_score_on_a_2x3_toy_by_hand():
    """2 words, 3 regions, D = 2: AttnGAN's double softmax and GLoRIA's log-sum-exp, one number at a time."""
    v = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]            # regions
    e = [[2.0, 0.0], [0.0, 1.0]]                        # words
    dot = lambda x, y: sum(a * b for a, b in zip(x, y))
    s = [[dot(v[j], e[i]) for j in range(3)] for i in range(2)]                  # s_ij = v_j . e_i
    abar = [[math.exp(s[i][j]) / sum(math.exp(s[k][j]) for k in range(2)) for j in range(3)] for i in range(2)]
    alpha = [[math.exp(4 * abar[i][j]) / sum(math.exp(4 * abar[i][k]) for k in range(3)) for j in range(3)]
             for i in range(2)]
    c = [[sum(alpha[i][j] * v[j][d] for j in range(3)) for d in range(2)] for i in range(2)]
    cos = [dot(c[i], e[i]) / math.sqrt(dot(c[i], c[i]) * dot(e[i], e[i])) for i in range(2)]
    want = math.log(sum(math.exp(5 * x) for x in cos))
    got = common.word_region_score(torch.tensor(v), torch.tensor(e), torch.tensor([True, True]), 4.0, 5.0)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert abar[0][0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))  # the first softmax runs over the words
    # the baseline's local score is exactly this, for every image x report pair
    model_score = common.word_region_matrix(torch.tensor([v]), torch.tensor([e]), torch.ones(1, 2, dtype=torch.bool),
                                            4.0, 5.0)
    assert model_score.item() == pytest.approx(want, rel=1e-6)


def test_squared_difference_sums_to_two_minus_two_cos():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, 16, generator=g, dtype=torch.float64), torch.randn(5, 7, 16, generator=g,
                                                                               dtype=torch.float64)
    d = reclf.squared_difference(x, y)
    assert (d >= 0).all()
    torch.testing.assert_close(d.sum(-1), 2 - 2 * torch.nn.functional.cosine_similarity(x, y, dim=-1))
    assert reclf.squared_difference(x, 3 * x).abs().max() < 1e-12  # same direction: no mismatch at all


def _nodes_and_mask(seed=0, N=4, K=6, d=8):
    g = torch.Generator().manual_seed(seed)
    nodes = torch.randn(N, K, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]).bool()
    noisy = torch.where(mask[..., None], nodes, 100 * torch.randn(nodes.shape, generator=g, dtype=torch.float64))
    return nodes, noisy, mask


def test_irm_weights_sum_to_one_and_padding_gets_zero():
    torch.manual_seed(0)
    irm = reclf.IRM(8).double()
    nodes, noisy, mask = _nodes_and_mask()
    z, w = irm(nodes, mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, dtype=torch.float64))
    assert (w[~mask] == 0).all() and (w[mask] > 0).all()
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4, dtype=torch.float64))
    z2, w2 = irm(noisy, mask)  # padded nodes never matter
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(z, z2)
    # by hand for graph 1 (3 valid nodes): sigmoid of the standardised logits, L1-normalised, weighted mean
    u = irm.logit(nodes[1, :3]).squeeze(-1)
    beta = torch.sigmoid((u - u.mean()) / torch.sqrt(u.var(unbiased=False) + 1e-5))
    torch.testing.assert_close(w[1, :3], beta / beta.sum())
    torch.testing.assert_close(z[1], torch.nn.functional.normalize((w[1, :3, None] * nodes[1, :3]).sum(0), dim=0))


@pytest.mark.parametrize("srm", ["graph", "transformer", "none"])
def test_srm_ignores_padded_nodes_and_every_mode_runs(srm):
    torch.manual_seed(0)
    head = reclf.RelationHead(8, 8, srm, 3, "on").double().eval()  # eval: the transformer's dropout off
    nodes, noisy, mask = _nodes_and_mask()
    out, edges = head.reason(nodes, mask)
    out2, edges2 = head.reason(noisy, mask)
    torch.testing.assert_close(out[mask], out2[mask])
    assert len(edges) == (3 if srm == "graph" else 0)
    for A, A2 in zip(edges, edges2):
        torch.testing.assert_close(A[mask], A2[mask])  # the rows of valid nodes; padded rows are never read
        assert (A.transpose(1, 2)[~mask] == 0).all()  # no node attends to a padded one
        torch.testing.assert_close(A.sum(-1), torch.ones(4, 6, dtype=torch.float64))
    if srm == "graph":  # weights are not shared across the steps
        assert len({id(s.query.weight) for s in head.srm}) == 3
        assert not torch.equal(head.srm[0].query.weight, head.srm[1].query.weight)
    regions, words = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    score = head(regions, torch.randn(3, 8, dtype=torch.float64), words, torch.ones(2, 4, dtype=torch.bool),
                 torch.randn(2, 8, dtype=torch.float64))
    assert score.shape == (3, 2) and ((score > 0) & (score < 1)).all()


def test_graph_srm_keeps_nodes_distinct_and_irm_weights_them_unequally():
    """The residual graph step by hand; after 3 steps distinct unit-norm nodes stay distinct and IRM's weights are
    not uniform. The same weights without the residual (SGRAF's M <- ReLU(A M W_r)) collapse every node into one and
    give IRM exactly uniform weights: what the demo showed before the residual."""
    torch.manual_seed(0)
    head = reclf.RelationHead(8, 64, "graph", 3, "on").double()
    g = torch.Generator().manual_seed(2)
    nodes = torch.nn.functional.normalize(torch.randn(4, 12, 64, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.ones(4, 12, dtype=torch.bool)
    step = head.srm[0]
    A = torch.softmax(step.query(nodes) @ step.key(nodes).transpose(1, 2), -1)
    out, edges = step(nodes, mask)
    torch.testing.assert_close(edges, A)
    torch.testing.assert_close(out, nodes + torch.relu(step.out(A @ nodes)))
    spread = lambda x: (x.std(1).mean(-1) / x.abs().mean((1, 2))).min()  # across the nodes of a graph, relative
    refined, _ = head.reason(nodes, mask)
    assert spread(refined) > 0.2
    _, w = head.irm(refined, mask)
    assert (w * 12).std(1).min() > 0.1  # 1 / K for every node would give 0
    plain = nodes
    for s in head.srm:
        A = torch.softmax(s.query(plain) @ s.key(plain).transpose(1, 2), -1)
        plain = torch.relu(s.out(A @ plain))
    assert spread(plain) < 1e-3
    _, w_plain = head.irm(plain, mask)
    assert (w_plain * 12).std(1).max() < 1e-2


def test_parallel_combine_needs_both_modules_and_runs():
    with pytest.raises(ValueError, match="needs both"):
        reclf.RelationHead(8, 8, "none", 3, "on", "parallel")
    head = reclf.RelationHead(8, 8, "graph", 2, "on", "parallel").double()
    s = head(torch.randn(2, 5, 8).double(), torch.randn(2, 8).double(), torch.randn(3, 4, 8).double(),
             torch.ones(3, 4, dtype=torch.bool), torch.randn(3, 8).double())
    assert s.shape == (2, 3) and ((s > 0) & (s < 1)).all()


@pytest.mark.parametrize("srm,irm", [("graph", "on"), ("graph", "off"), ("none", "on")])
def test_chunked_all_pairs_equal_unchunked_values_and_gradients(srm, irm):
    torch.manual_seed(0)
    head = reclf.RelationHead(6, 8, srm, 2, irm).double()
    g = torch.Generator().manual_seed(1)
    regions = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    img_g, txt_g = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g,
                                                                                    dtype=torch.float64)
    words = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(7)[None] < torch.tensor([7, 2, 5, 1])[:, None]
    words = torch.where(mask[..., None], words, 50 * torch.randn(words.shape, generator=g, dtype=torch.float64))
    weights = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def run(chunk, above):
        inputs = [t.clone().requires_grad_() for t in (regions, img_g, words, txt_g)]
        head.zero_grad()
        S = reclf.relation_matrix(head, inputs[0], inputs[1], inputs[2], mask, inputs[3], chunk, above)
        (S * weights).sum().backward()
        return S.detach(), [t.grad for t in inputs] + [p.grad.clone() for p in head.parameters()]
    ref, ref_grads = run(16, 2**40)  # one chunk, no checkpoint
    # the same pair alone (the plain module on one image and one report, unpadded) gives the same score
    alone = head(regions[1:2], img_g[1:2], words[2:3, :5], mask[2:3, :5], txt_g[2:3])
    torch.testing.assert_close(ref[1, 2], alone[0, 0].detach())
    for chunk, above in ((1, 0), (3, 0), (3, 2**40)):
        S, grads = run(chunk, above)
        torch.testing.assert_close(S, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    assert ref_grads[2][~mask].abs().max() == 0  # padded words receive no gradient


def test_word_pieces_are_summed_into_words():
    tok = data._bert_tokenizer(list(data._SPECIAL_TOKENS) + ["no", "pleural", "eff", "##usion", ".", "left"])
    ids = tok(["no pleural effusion. left"], return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0].tolist()) == ["[CLS]", "no", "pleural", "eff", "##usion", ".", "left",
                                                          "[SEP]"]
    starts, continues = common.word_tables(tok)
    index = common.word_index(ids, starts, continues, max_words=97)
    assert index[0].tolist() == [-1, 0, 1, 2, 2, -1, 3, -1]  # specials and punctuation are not words
    assert common.report_words(ids[0], index[0], tok) == ["no", "pleural", "effusion", "left"]
    states = torch.arange(8, dtype=torch.float64)[None, :, None].expand(1, 8, 2)
    words, mask = common.sum_pieces(states, index)
    assert words[0, :, 0].tolist() == [1, 2, 3 + 4, 6] and mask.all()
    capped = common.word_index(ids, starts, continues, max_words=2)
    assert capped[0].tolist() == [-1, 0, 1, -1, -1, -1, -1, -1]


def test_losses_by_hand_and_the_baseline():
    torch.manual_seed(0)
    head = reclf.RelationHead(6, 8, "graph", 2, "on").double()
    g = torch.Generator().manual_seed(2)
    R, ig, E, tg = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4, 6), (3, 6), (3, 5, 6), (3, 6)))
    M = torch.arange(5)[None] < torch.tensor([5, 3, 4])[:, None]
    out = reclf.reclf_loss(**reclf.loss_scores((R, ig, E, M, tg), head=head, lse=True, chunk=2))
    ce = torch.nn.functional.cross_entropy
    cos = torch.nn.functional.cosine_similarity(ig[:, None], tg[None], dim=-1)
    S = reclf.relation_matrix(head, R, ig, E, M, tg)
    L = common.word_region_matrix(R, E, M, 4.0, 5.0)
    y = torch.arange(3)
    want = dict(global_i2t=ce(cos / 0.1, y), global_t2i=ce(cos.T / 0.1, y), rel_i2t=ce(S / 0.1, y),
                rel_t2i=ce(S.T / 0.1, y), lse_i2t=ce(10 * L, y), lse_t2i=ce(10 * L.T, y))
    for k, v in want.items():
        torch.testing.assert_close(out[k], v)
    torch.testing.assert_close(out["loss"], sum(want.values()))
    baseline = reclf.reclf_loss(**reclf.loss_scores((R, ig, E, M, tg), lse=True))
    assert set(baseline) == {"loss", "global_i2t", "global_t2i", "lse_i2t", "lse_t2i"}


def test_the_loss_is_a_pure_function_and_the_forward_trains_with_it():
    """reclf_loss on the scores of the model's own features gives exactly the terms of the model's forward, and the
    same again on the same tensors, which it leaves as they were; it reads no global but pair_ce, and that one only
    torch and F (no module, no process group)."""
    args = common.parse_args(reclf.Args, reclf.PRESETS, TINY + ["--add-lse-local"])
    ds = data.make_dataset("synthetic", split="train", image_size=64, train=True, num_samples=4)
    samples = [ds[i] for i in range(4)]
    tok = data.build_tokenizer([s["text"] for s in samples])
    batch = data.collate(samples, tok, 96)
    torch.manual_seed(0)
    model = reclf.RECLF(args, tok).eval()  # no dropout: both passes see the same features
    with torch.no_grad():
        terms = model(batch)
        regions, img_g, _ = model.image_features(batch["images"])
        scores = reclf.loss_scores((regions, img_g, *model.text_features(batch)), head=model.relation, lse=True,
                                   gamma1=args.gamma1, gamma2=args.gamma2, chunk=args.chunk)
    kept = {k: v.clone() for k, v in scores.items()}
    hyper = dict(tau_global=args.tau_global, tau_rel=args.tau_rel, gamma3=args.gamma3)
    first, again = reclf.reclf_loss(**scores, **hyper), reclf.reclf_loss(**scores, **hyper)
    assert set(first) == set(terms) == {"loss", "global_i2t", "global_t2i", "rel_i2t", "rel_t2i", "lse_i2t", "lse_t2i"}
    for k, v in terms.items():
        assert torch.equal(first[k], v) and torch.equal(again[k], v), k
    assert all(torch.equal(scores[k], kept[k]) for k in scores)
    assert set(inspect.getclosurevars(reclf.reclf_loss).globals) == {"pair_ce"}
    assert set(inspect.getclosurevars(reclf.pair_ce).globals) == {"common"}  # common.contrastive_ce alone


# ---- DDP: 2 gloo processes equal one process on the full batch ----
class TinyPair(torch.nn.Module):
    """Linear 'encoders' (image B x (1 + R) x 3 -> global + regions, words B x L x 5) and a relation head."""

    def __init__(self):
        super().__init__()
        self.image, self.text = torch.nn.Linear(3, 6), torch.nn.Linear(5, 6)
        self.relation = reclf.RelationHead(6, 8, "graph", 2, "on")

    def forward(self, x, y, lengths):
        img, txt = self.image(x), self.text(y)
        mask = torch.arange(y.shape[1] - 1)[None] < lengths[:, None]
        return img[:, 1:], img[:, 0], txt[:, 1:], mask, txt[:, 0]


def _ddp_worker(rank, world, port, inputs, state, refs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_default_dtype(torch.float64)
    x, y, lengths = inputs
    b = len(x) // world
    sl = slice(rank * b, (rank + 1) * b)
    short = int(lengths[sl].max()) + 1  # this rank's words trimmed to its longest report: padded to the job's
    for lse, ref in refs.items():
        model = TinyPair()
        model.load_state_dict(state)
        net = torch.nn.parallel.DistributedDataParallel(model)
        regions, img_g, words, mask, txt_g = net(x[sl], y[sl, :short], lengths[sl])
        own = (regions, img_g, *common.pad_to_longest_rank(words, mask), txt_g)
        *gathered, offset = common.gather_rows(*own)
        out = reclf.reclf_loss(**reclf.loss_scores(own, gathered, model.relation, lse, chunk=2), offset=offset)
        out["loss"].backward()
        for k, want in ref["terms"].items():
            got = out[k].detach().clone()
            torch.distributed.all_reduce(got)
            torch.testing.assert_close(got / world, want, rtol=1e-10, atol=1e-12)
        for p, want in zip(model.parameters(), ref["grads"]):
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-12)
    torch.distributed.destroy_process_group()


def test_ddp_gathered_losses_equal_full_batch():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = TinyPair()
        x, y = torch.randn(6, 5, 3), torch.randn(6, 7, 5)   # 6 pairs: 1 + 4 regions, [CLS] + 6 word slots
        lengths = torch.tensor([6, 3, 5, 2, 4, 3])            # rank 1's longest report is shorter than rank 0's
        state, refs = {k: v.clone() for k, v in model.state_dict().items()}, {}
        for lse in (False, True):
            model.zero_grad(set_to_none=True)
            out = reclf.reclf_loss(**reclf.loss_scores(model(x, y, lengths), head=model.relation, lse=lse, chunk=2))
            out["loss"].backward()
            refs[lse] = dict(terms={k: v.detach() for k, v in out.items()},
                             grads=[p.grad.clone() for p in model.parameters()])
    finally:
        torch.set_default_dtype(dtype)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, (x, y, lengths), state, refs), nprocs=2, join=True)


# ---- the model end to end ----
TINY = ["--preset", "demo", "--image-size", "64", "--train-samples", "16", "--eval-samples", "40", "--batch-size", "4",
        "--chunk", "2", "--match-dim", "16", "--workers", "0", "--log-every", "1", "--viz", "2", "--epochs", "2"]


def test_overfit_one_batch():
    args = common.parse_args(reclf.Args, reclf.PRESETS, TINY)
    ds = data.make_dataset("synthetic", split="train", image_size=64, train=True, num_samples=6)
    samples = [ds[i] for i in range(6)]
    tok = data.build_tokenizer([s["text"] for s in samples])
    batch = data.collate(samples, tok, 96)
    torch.manual_seed(0)
    model = reclf.RECLF(args, tok)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):  # from scratch: a plateau of ~15 steps, then the pairs separate
        terms = model(batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(terms) == {"loss", "global_i2t", "global_t2i", "rel_i2t", "rel_t2i"}
    assert model.score(batch["images"], batch).shape == (6, 6)


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reclf") / "run")
    return out, reclf.main(TINY + ["--out-dir", out, "--max-steps", "3"])


def test_main_three_steps_resume_and_outputs(three_step_run):
    out, res = three_step_run
    saved = json.load(open(os.path.join(out, "eval.json")))  # the suite's layout (common.save_results)
    assert set(res) == set(saved) == {"untrained", "trained"}
    assert all(set(saved[m]) == {"retrieval", "zero_shot", "checks"} for m in saved)
    low, auc, high = (saved["trained"]["zero_shot"]["mean"][i] for i in (1, 0, 2))  # the both score's
    assert low <= auc <= high and set(saved["trained"]["zero_shot"]) - {"mean"} <= set(data.zero_shot_findings(True)[0])
    for kind in ("global", "local", "gloria"):
        assert {f"auc_{kind}_{k}" for k in ("mean", "low", "high")} <= set(res["trained"]["checks"])
    for way in ("i2t", "t2i"):  # global-cosine retrieval over all test pairs, as the other methods report it
        recall = [res["trained"]["retrieval"][f"{way}_R@{k}"] for k in (1, 5, 10)]
        assert 0 <= recall[0] <= recall[1] <= recall[2] <= 1
    checks = saved["trained"]["checks"]  # the IRM weight of each word class, 1 = uniform
    assert checks["irm_function_words"] == pytest.approx(res["trained"]["checks"]["irm_function_words"])
    assert all(0 < res[m]["checks"][f"irm_{k}_words"] < 10 for m in res for k in ("function", "finding"))
    ck = common.load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ck["step"] == 3 and ck["epoch"] == 0
    pngs = set(os.listdir(os.path.join(out, "viz")))
    assert {"pair0_irm.png", "pair0_srm_step3.png", "pair1_irm.png"} <= pngs
    header = open(os.path.join(out, "metrics.csv")).readline()
    assert "loss/rel_i2t" in header and "loss/global_t2i" in header
    reclf.main(TINY + ["--out-dir", out, "--max-steps", "5", "--resume", "--viz", "0"])
    assert common.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 5


def test_export_loads_weights_only_and_eval_seg_accepts_it(three_step_run, tmp_path):
    import eval_seg
    path = os.path.join(three_step_run[0], "image_encoder.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "resnet18" and payload["method"] == "reclf" and payload["in_chans"] == 1
    assert not any(k.startswith(("local_proj", "global_proj", "relation")) for k in payload["state_dict"])
    encoder, meta = common.load_image_encoder(path)
    assert encoder.feature_maps(torch.zeros(1, 1, 64, 64))[3].shape == (1, 256, 4, 4)  # layer3: the sub-regions
    rows = eval_seg.main(["--encoder", path, "--synthetic-samples", "10", "--image-size", "64", "--epochs", "1",
                          "--seeds", "1", "--batch-size", "4", "--out", str(tmp_path / "seg")])
    assert rows[0]["method"] == "reclf" and 0 <= rows[0]["dice"][0] <= 1


def test_baseline_and_bad_flags():
    tok = data.build_tokenizer(["no effusion ."])
    args = common.parse_args(reclf.Args, reclf.PRESETS, TINY + ["--srm", "none", "--irm", "off"])
    assert reclf.RECLF(args, tok).relation is None  # GLoRIA: L_g + L_loc
    bad = common.parse_args(reclf.Args, reclf.PRESETS, TINY + ["--srm", "none", "--irm", "off", "--add-lse-local"])
    with pytest.raises(ValueError, match="already is GLoRIA"):
        reclf.RECLF(bad, tok)
    paper = common.parse_args(reclf.Args, reclf.PRESETS, ["--preset", "paper"])
    assert paper == reclf.Args(preset="paper", data="mimic") and paper.upsample == 299 and paper.gamma1 == 4.0


def test_precision_at_k_takes_the_positive_finding_not_an_unknown_one():
    """Real labels have nans (unknown). A single-finding pair's class is its positive finding; argmax alone took a
    nan before it (nan compares as the maximum). So unknown findings before the positive one must not change
    Precision@K: the same pairs with those nans read as 0 give the same numbers."""
    args = common.parse_args(reclf.Args, reclf.PRESETS, TINY)
    ds = data.make_dataset("synthetic", split="test", image_size=64, num_samples=24)
    samples = [{k: v for k, v in ds[i].items() if k not in ("masks", "boxes", "box_labels")} for i in range(24)]
    prompts = [n.lower() for n in data.CHEXPERT_LABELS] + ["no"]  # the real-data prompts' words
    tokenizer = data.build_tokenizer([s["text"] for s in samples] + prompts)
    torch.manual_seed(0)
    model = reclf.RECLF(args, tokenizer).eval()
    for i, s in enumerate(samples):  # real-data labels: finding 1 + i % 4 positive, nan before it, 0 after it
        s["labels"] = torch.zeros(14)
        s["labels"][1:2 + i % 4] = math.nan
        s["labels"][2 + i % 4] = 1.0
    unknown = [data.collate(samples[i:i + 8], tokenizer, 96) for i in range(0, 24, 8)]
    known = [dict(b, labels=torch.nan_to_num(b["labels"])) for b in unknown]
    with torch.no_grad():
        got, want = (reclf.evaluate(model, loader, tokenizer, "cpu") for loader in (unknown, known))
    keys = ("i2t_P@1", "i2t_P@5", "i2t_P@10")
    assert {k: got["retrieval"][k] for k in keys} == {k: want["retrieval"][k] for k in keys}
    assert want["retrieval"]["i2t_P@5"] < 1  # four classes among the 24 pairs: the metric is not trivially 1

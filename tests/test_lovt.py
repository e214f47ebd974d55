"""LoVT tests (CPU, tiny shapes): every loss term against written-out loops, masks, resume, overfit, main()."""
import dataclasses
import json
import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

import common
import data
import lovt
from test_common import _free_port


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes leave nothing to share between threads, and on a busy 2-core machine two OpenMP threads
    spin-wait each other (10x slower here); restored afterwards for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------- hand-computed references (plain python loops over tiny tensors) ----------
def cos(u, v):
    return float(u @ v) / (math.sqrt(float(u @ u)) * math.sqrt(float(v @ v)))


def hand_local(l, c, T, valid, w, tau):
    """Both directions of the intra-sample loss for a batch, one number at a time."""
    B, N, _ = l.shape
    out = [0.0, 0.0]
    for b in range(B):
        idx = [j for j in range(N) if valid[b][j]]
        wsum = sum(float(w[b][i]) for i in idx)
        for i in idx:
            l2att = lambda i, j: cos(l[b, i], c[b, j]) / tau  # noqa: E731  anchor l_i, candidate c_j
            att2l = lambda i, j: cos(l[b, j], c[b, i]) / tau  # noqa: E731  anchor c_i, candidate l_j
            for d, sim in enumerate((l2att, att2l)):
                z = sum(float(T[i][j]) for j in idx)
                ce = -sum(float(T[i][j]) / z * sim(i, j) for j in idx)
                ce += math.log(sum(math.exp(sim(i, j)) for j in idx))
                out[d] += float(w[b][i]) / wsum * ce / B
    return out


def test_global_infonce_by_hand():  # LoVT's global terms: common.contrastive_ce of cosine / tau
    torch.manual_seed(0)
    a, b, tau = torch.randn(3, 4), torch.randn(3, 4), 0.1
    S = [[cos(a[i], b[j]) / tau for j in range(3)] for i in range(3)]
    a2b = sum(-S[i][i] + math.log(sum(math.exp(S[i][j]) for j in range(3))) for i in range(3)) / 3
    b2a = sum(-S[j][j] + math.log(sum(math.exp(S[i][j]) for i in range(3))) for j in range(3)) / 3
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    got = common.contrastive_ce(unit(a) @ unit(b).T / tau, unit(b) @ unit(a).T / tau)
    assert got[0].item() == pytest.approx(a2b, rel=1e-5)
    assert got[1].item() == pytest.approx(b2a, rel=1e-5)
    # all-equal embeddings: log B per direction
    z = torch.ones(5, 3)
    assert common.contrastive_ce(z @ z.T, z @ z.T)[0].item() == pytest.approx(math.log(5), rel=1e-6)


def test_spatial_target_3x3_by_hand():
    T = lovt.spatial_target(3, 3)
    diag = math.sqrt(18)
    for i in range(9):
        for j in range(9):
            d = math.hypot(i // 3 - j // 3, i % 3 - j % 3) / diag
            want = math.exp(-d) if d <= 0.5 else 0.0
            assert T[i, j].item() == pytest.approx(want, abs=1e-6)
    # 3x3: radius 0.5 * sqrt(18) = 2.12 cells: a corner reaches 6 cells (not the 3 at >= sqrt(5) cells),
    # an edge cell 7, the centre all 9
    assert (T > 0).sum(1).tolist() == [6, 7, 6, 7, 9, 7, 6, 7, 6]
    hard = lovt.spatial_target(3, 3, smooth=False)
    assert set(hard.unique().tolist()) == {0.0, 1.0} and torch.equal(hard > 0, T > 0)


def test_spatial_target_7x7_neighbourhood():
    T = lovt.spatial_target(7, 7)
    counts = (T > 0).sum(1)
    assert counts.min().item() == 22 and counts.max().item() == 49
    assert counts[0].item() == 22 and counts[24].item() == 49  # corner, centre
    assert counts.float().mean().item() == pytest.approx(35.04, abs=0.01)
    q = T / T.sum(1, keepdim=True)
    assert q.diag().min().item() == pytest.approx(0.0265, abs=5e-4)  # centre
    assert q.diag().max().item() == pytest.approx(0.0604, abs=5e-4)  # corner
    assert torch.allclose(T, T.t())


def test_local_image_loss_by_hand():
    torch.manual_seed(1)
    B, h, w, D = 2, 2, 3, 5
    l, c = torch.randn(B, h * w, D), torch.randn(B, h * w, D)
    T = lovt.spatial_target(h, w)
    wts = lovt.local_weights(torch.rand(B, h * w))
    got = lovt.local_intra_contrastive(l, c, T, None, wts, tau=0.3)
    want = hand_local(l, c, T.tolist(), [[True] * (h * w)] * B, wts, 0.3)
    assert got[0].item() == pytest.approx(want[0], rel=1e-5)
    assert got[1].item() == pytest.approx(want[1], rel=1e-5)


def test_local_report_loss_with_padded_sentences_by_hand():
    torch.manual_seed(2)
    B, S, D = 3, 4, 6
    l, c = torch.randn(B, S, D), torch.randn(B, S, D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pool = torch.rand(B, S)
    wts = lovt.local_weights(pool, mask)
    eye = torch.eye(S).tolist()
    got = lovt.local_intra_contrastive(l, c, None, mask, wts, tau=0.3)
    want = hand_local(l, c, eye, mask.tolist(), pool, 0.3)  # hand_local renormalises raw weights itself
    assert got[0].item() == pytest.approx(want[0], rel=1e-5)
    assert got[1].item() == pytest.approx(want[1], rel=1e-5)
    # padded slots may hold anything: the loss does not change, and no gradient reaches them
    l2, c2 = l.clone().requires_grad_(), c.clone()
    l2.data[~mask] = 1e3 * torch.randn(int((~mask).sum()), D)
    c2[~mask] = -7.0
    got2 = lovt.local_intra_contrastive(l2, c2, None, mask, wts, tau=0.3)
    assert torch.allclose(torch.stack(got), torch.stack(got2).detach(), atol=1e-6)
    sum(got2).backward()
    assert l2.grad[~mask].abs().max().item() == 0


def test_local_weights_masked_renormalised_detached():
    attn = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = lovt.local_weights(attn, mask)
    assert not w.requires_grad
    assert torch.allclose(w, torch.tensor([[0.4, 0.6, 0.0], [0.6, 0.3, 0.1]]))
    u = lovt.local_weights(attn, mask, uniform=True)
    assert torch.allclose(u, torch.tensor([[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


def test_cross_attention_masks_and_sharing():
    torch.manual_seed(3)
    attn = lovt.SymmetricCrossAttention(8).train()
    za, zb = torch.randn(3, 5, 8), torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    att_a, att_b, p = attn(za, zb, mask)
    assert att_a.shape == (3, 5, 8) and att_b.shape == (3, 4, 8) and p.shape == (3, 5, 4)
    # a->b: each valid sentence has a distribution over the regions, padded sentences have none
    assert torch.allclose(p.sum(1)[mask], torch.ones(int(mask.sum())))
    assert p.transpose(1, 2)[~mask].abs().max().item() == 0
    # the padded slots' counterparts are BN(b_o): all equal
    pad = att_b[~mask]
    assert torch.allclose(pad, pad[:1].expand_as(pad), atol=1e-5)
    # b->a never looks at padded sentences: changing them changes neither the regions' counterparts ...
    zb2 = zb.clone()
    zb2[~mask] = 100 * torch.randn(int((~mask).sum()), 8)
    att_a2, att_b2, p2 = attn(za, zb2, mask)
    assert torch.allclose(att_a, att_a2, atol=1e-5) and torch.allclose(p, p2, atol=1e-6)
    # ... nor the valid sentences' counterparts
    assert torch.allclose(att_b[mask], att_b2[mask], atol=1e-5)
    # one set of weights: W_k, W_v, W_o and one BatchNorm (shared by modalities and directions)
    assert len(list(attn.parameters())) == 8
    # keys double as queries: scores are <W_k za, W_k zb>, by hand for one pair
    k = lambda x: attn.key(x)
    scores = (k(za[0]) @ k(zb[0]).t()) / math.sqrt(8)
    assert torch.allclose(p[0, :, :2], scores.softmax(0)[:, :2], atol=1e-6)  # over regions, per valid sentence


def test_random_sentence_swaps():
    import random
    rng = random.Random(0)
    sents = ["a", "b", "c", "d"]
    outs = [lovt.random_sentence_swaps(sents, 0.6, rng) for _ in range(2000)]
    assert all(sorted(o) == sents for o in outs)  # a permutation: nothing dropped or duplicated
    assert sents == ["a", "b", "c", "d"]  # input untouched
    # number of swaps ~ Geometric: P(0 swaps) = 0.4; identity also arises from swaps of a sentence with itself
    ident = sum(o == sents for o in outs) / len(outs)
    assert 0.4 < ident < 0.6
    assert lovt.random_sentence_swaps(["only"], 0.6, rng) == ["only"]


# ---------- the model and the training loop on a tiny configuration ----------
TINY = ["--preset", "demo", "--image-size", "64", "--train-samples", "32", "--eval-samples", "8", "--batch-size", "4",
        "--accum", "2", "--proj-dim", "32", "--proj-hidden", "64", "--pool-heads", "2", "--max-length", "64",
        "--workers", "0", "--epochs", "3", "--log-every", "1", "--viz", "0", "--lr", "1e-3", "--augment"]


def tiny_model_and_batch(n=4):
    args = common.parse_args(lovt.Args, lovt.PRESETS, TINY)
    ds = data.make_dataset("synthetic", split="train", image_size=64, train=True, num_samples=n)
    samples = [ds[i] for i in range(n)]
    tokenizer = data.build_tokenizer([s["text"] for s in samples])
    torch.manual_seed(0)
    return lovt.LoVT(args, tokenizer), data.collate(samples, tokenizer, max_length=64), tokenizer


def test_model_shapes_and_terms():
    model, batch, _ = tiny_model_and_batch()

    def forward():  # the same dropout masks every call
        torch.manual_seed(0)
        return model(batch)
    out = forward()
    terms = ("global_a2b", "global_b2a", "local_a_l2att", "local_a_att2l", "local_b_l2att", "local_b_att2l")
    assert set(out) == {"loss", *terms} and all(out[k].ndim == 0 for k in out)
    want = 0.75 * out["global_a2b"] + 0.25 * out["global_b2a"] + 0.375 * sum(out[k] for k in terms[2:])
    assert torch.allclose(out["loss"], want)
    model.args = dataclasses.replace(model.args, no_local=True)  # ablation: global only
    assert torch.allclose(forward()["loss"], 0.75 * out["global_a2b"] + 0.25 * out["global_b2a"], atol=1e-5)
    model.args = dataclasses.replace(model.args, no_local=False, uniform_weights=True, no_spatial_smoothing=True)
    assert not torch.allclose(forward()["local_a_l2att"], out["local_a_l2att"])
    assert torch.allclose(model.encode_image(batch["images"]).norm(dim=-1), torch.ones(4))
    assert torch.allclose(model.encode_text(batch).norm(dim=-1), torch.ones(4))
    regions, sentences = model.attention_maps(batch)  # 64 px -> 2 x 2 grid
    S = batch["sentence_mask"].shape[1]
    assert regions.shape == (4, 2, 2) and sentences.shape == (4, S, 2, 2)
    assert torch.allclose(regions.sum((1, 2)), torch.ones(4), atol=1e-5)
    assert torch.allclose(sentences.sum((2, 3)), batch["sentence_mask"].float(), atol=1e-5)


def test_lovt_loss_is_the_forward_and_pure():
    """The model's forward is lovt_loss on its modules' outputs, and lovt_loss is a function of its arguments alone:
    the same tensors give the same terms again and are left as they were."""
    model, batch, _ = tiny_model_and_batch()
    torch.manual_seed(0)  # the same dropout masks in both passes
    want = model(batch)
    torch.manual_seed(0)
    ya, ga, wa, grid = model.image_features(batch["images"])
    yb, gb, wb, mask = model.text_features(batch)
    za, zb = model.project_local_a(ya), model.project_local_b(yb)
    att_a, att_b, _ = model.cross(za, zb, mask)
    inputs = (model.project_global_a(ga), model.project_global_b(gb), za, att_a, zb, att_b, mask, wa, wb, grid)
    before = [x.detach().clone() if torch.is_tensor(x) else x for x in inputs]
    options = lovt.loss_hyperparameters(model.args)
    first, second = lovt.lovt_loss(*inputs, **options), lovt.lovt_loss(*inputs, **options)
    defaults = lovt.lovt_loss(*inputs)  # lovt_loss's defaults are the paper's, as Args'
    assert list(first) == list(want) == ["loss", "global_a2b", "global_b2a", "local_a_l2att", "local_a_att2l",
                                         "local_b_l2att", "local_b_att2l"]
    for k in want:
        assert torch.equal(first[k], want[k]) and torch.equal(second[k], first[k]) and torch.equal(defaults[k], want[k])
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(inputs, before))


def loss_inputs(B=4, d=8):
    """lovt_loss's tensors for B pairs of a 2 x 2 grid and 3 sentence slots (float64: exact comparisons)."""
    g = torch.Generator().manual_seed(4)
    x = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    return ([x(B, d), x(B, d), x(B, 4, d), x(B, 4, d), x(B, 3, d), x(B, 3, d)], mask, torch.rand(B, 4, generator=g),
            torch.rand(B, 3, generator=g))


def test_lovt_loss_with_gathered_columns_is_the_full_batch():
    """--gather-negatives: each process scores its rows against every process's columns (offset = its first row);
    the mean over the processes is the loss of the whole batch in one process."""
    features, mask, pool_a, pool_b = loss_inputs()
    full = lovt.lovt_loss(*features, mask, pool_a, pool_b, (2, 2))
    halves = [lovt.lovt_loss(*(x[rows] for x in features), mask[rows], pool_a[rows], pool_b[rows], (2, 2),
                             global_a_all=features[0], global_b_all=features[1], offset=rows.start)
              for rows in (slice(0, 2), slice(2, 4))]
    for k in full:
        assert torch.allclose((halves[0][k] + halves[1][k]) / 2, full[k]), k


def _gather_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        features, mask, pool_a, pool_b = loss_inputs()
        rows = slice(2 * rank, 2 * rank + 2)
        mine = [x[rows].clone().requires_grad_() for x in features]
        a_all, b_all, offset = common.gather_rows(*mine[:2])
        loss = lovt.lovt_loss(*mine, mask[rows], pool_a[rows], pool_b[rows], (2, 2), global_a_all=a_all,
                              global_b_all=b_all, offset=offset)["loss"]
        loss.backward()
        torch.save(dict(loss=loss.detach(), grads=[x.grad for x in mine]), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_negatives_on_two_processes_is_the_full_batch(tmp_path):
    """common.gather_rows then lovt_loss on 2 gloo processes of 2 pairs: the mean loss and, averaged as DDP does, the
    gradients reaching each process's features equal one process's on all 4 pairs."""
    features, mask, pool_a, pool_b = loss_inputs()
    full = [x.clone().requires_grad_() for x in features]
    want = lovt.lovt_loss(*full, mask, pool_a, pool_b, (2, 2))["loss"]
    want.backward()
    start_method = "fork" if sys.platform == "linux" else "spawn"  # fork: no re-import of torch in the children
    mp.start_processes(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method=start_method)
    got = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert torch.allclose((got[0]["loss"] + got[1]["loss"]) / 2, want.detach())
    for rank in range(2):
        rows = slice(2 * rank, 2 * rank + 2)
        assert all(torch.allclose(g / 2, f.grad[rows]) for g, f in zip(got[rank]["grads"], full))


def test_overfit_one_batch():
    model, batch, _ = tiny_model_and_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs: 6 steps straight; 3 steps, then --resume to 6 (the first stops mid-epoch 1)."""
    root = tmp_path_factory.mktemp("lovt")
    lovt.main(TINY + ["--out-dir", str(root / "straight"), "--max-steps", "6"])
    lovt.main(TINY + ["--out-dir", str(root / "resumed"), "--max-steps", "3", "--viz", "2"])
    short = common.load_checkpoint(root / "resumed" / "ckpt.pt")
    exported = torch.load(root / "resumed" / "image_encoder.pt", weights_only=True)  # of the 3-step run
    lovt.main(TINY + ["--out-dir", str(root / "resumed"), "--max-steps", "6", "--resume"])
    return root, short, exported


def test_resume_equals_uninterrupted(runs):
    root, short, _ = runs
    a = common.load_checkpoint(root / "straight" / "ckpt.pt")
    b = common.load_checkpoint(root / "resumed" / "ckpt.pt")
    assert short["step"] == 3 and short["micro"] == 6  # stopped in the middle of epoch 0 (8 micro-batches)
    assert a["step"] == b["step"] == 6 and a["epoch"] == b["epoch"] == 1
    assert any(not torch.equal(short["model"][k], b["model"][k]) for k in short["model"])  # the resumed half trained
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_three_step_run_writes_the_run_folder(runs):
    root, _, payload = runs
    run = root / "resumed"
    for name in ("args.json", "metrics.csv", "val.csv", "ckpt.pt", "best.pt", "eval.json", "text_encoder/config.json",
                 "text_encoder/tokenizer.json", "viz/sample0.png", "viz/sample1.png"):
        assert (run / name).exists(), name
    assert payload["arch"] == "resnet18" and payload["in_chans"] == 1 and payload["method"] == "lovt"
    assert payload["image_size"] == 64 and isinstance(payload["mean"], float)
    encoder, _ = common.load_image_encoder(str(run / "image_encoder.pt"))
    assert encoder(torch.zeros(1, 1, 64, 64))["global_feat"].shape == (1, 512)
    results = json.loads((run / "eval.json").read_text())  # common.save_results' layout
    assert set(results) == {"untrained", "trained"}
    for r in results.values():
        assert set(r) == {"retrieval", "zero_shot", "checks"} and r["checks"] == {}
        assert set(r["retrieval"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
        assert len(r["zero_shot"]["mean"]) == 3
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for k in ("lr", "loss/total", "loss/global_a2b", "loss/local_b_att2l", "perf/img_per_s", "perf/data_wait_frac"):
        assert k in header


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls, lovt_loss = [], lovt.lovt_loss

    def nan_from_fifth_call(*args, **kwargs):  # micro-batch 5 = the first of optimizer step 3
        calls.append(1)
        terms = lovt_loss(*args, **kwargs)
        return dict(terms, global_a2b=terms["global_a2b"] * float("nan"), loss=terms["loss"] * float("nan")) \
            if len(calls) >= 5 else terms
    monkeypatch.setattr(lovt, "lovt_loss", nan_from_fifth_call)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        lovt.main(TINY + ["--out-dir", str(tmp_path), "--max-steps", "6", "--ckpt-every", "1"])
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_an_epochs_shorter_last_step_is_the_mean_of_its_micro_batches(tmp_path, monkeypatch):
    """12 pairs in micro-batches of 4 with --accum 2: steps of micro-batches (1, 2) and (3,). At lr 0 the weights
    never move, so the gradient each step hands AdamW can be compared with the per-micro-batch gradients of an
    --accum 1 run: (g1 + g2) / 2 and g3 (it used to be g3 / 2: the last step divided by the full count)."""
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    flags = TINY + ["--train-samples", "12", "--epochs", "1", "--lr", "0", "--ckpt-every", "0"]
    lovt.main(flags + ["--accum", "1", "--out-dir", str(tmp_path / "one")])
    per_micro, seen[:] = list(seen), []
    lovt.main(flags + ["--accum", "2", "--out-dir", str(tmp_path / "two")])
    assert len(per_micro) == 3 and len(seen) == 2
    for want, got in zip([[(a + b) / 2 for a, b in zip(*per_micro[:2])], per_micro[2]], seen):
        assert all(torch.allclose(w, g, rtol=1e-4, atol=1e-7) for w, g in zip(want, got))


def test_resume_of_a_finished_run_trains_no_further_and_evaluates_again(tmp_path):
    """--resume on a run that reached --max-steps (or early stopping) goes straight to its evaluation: the way to
    evaluate again after fixing what made an evaluation fail."""
    lovt.main(TINY + ["--out-dir", str(tmp_path), "--max-steps", "2"])
    (tmp_path / "eval.json").unlink()
    lovt.main(TINY + ["--out-dir", str(tmp_path), "--max-steps", "2", "--resume"])
    assert common.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2 and (tmp_path / "eval.json").exists()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3  # the header and steps 1, 2


def test_a_failing_evaluation_is_one_message_and_the_run_is_saved(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("a finding no prompt can name")
    monkeypatch.setattr(lovt, "evaluate", broken)
    with pytest.raises(SystemExit) as stop:
        lovt.main(TINY + ["--out-dir", str(tmp_path), "--max-steps", "1"])
    message = str(stop.value)
    assert "Evaluation failed after training: ValueError: a finding no prompt can name" in message
    assert f"--resume --out-dir {tmp_path}" in message
    assert "Traceback" in (tmp_path / "eval_error.txt").read_text()
    for name in ("ckpt.pt", "image_encoder.pt", "text_encoder/config.json"):  # written before the evaluation
        assert (tmp_path / name).exists()

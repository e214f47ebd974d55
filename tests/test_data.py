"""Tests for data.py: synthetic data, sentence splitting, tokenization, collate, BatchAugment, CsvPairs."""
import csv
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import CHEXPERT_LABELS, SYNTH_FINDINGS

LABEL_OF = {"opacity": "Lung Opacity", "nodule": "Lung Lesion", "effusion": "Pleural Effusion",
            "pneumothorax": "Pneumothorax", "cardiomegaly": "Cardiomegaly"}
KEYWORDS = {"opacity": r"opacity|consolidation", "nodule": r"nodule", "effusion": r"effusion",
            "pneumothorax": r"pneumothorax", "cardiomegaly": r"cardiomegaly|enlarged"}
NEGATION = re.compile(r"\b(no|without)\b", re.I)


def positive_mentions(sentences):
    """(finding, sentence) for every sentence that states a finding (no negation)."""
    return [(f, s) for s in sentences if not NEGATION.search(s)
            for f, kw in KEYWORDS.items() if re.search(kw, s, re.I)]


def mask_side(mask):
    """Patient side of a mask: image left half = patient's right."""
    cols = np.nonzero(mask)[1]
    return "right" if cols.mean() < mask.shape[1] / 2 else "left"


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_splits_independent():
    a, b = data.SyntheticCXR("train", seed=3), data.SyntheticCXR("train", seed=3)
    for i in (0, 7):
        ra, rb = a.render(i), b.render(i)
        assert np.array_equal(ra["pixels"], rb["pixels"]) and ra["sentences"] == rb["sentences"]
        assert np.array_equal(ra["masks"], rb["masks"]) and np.array_equal(ra["boxes"], rb["boxes"])
    val = data.SyntheticCXR("validate", seed=3).render(0)
    assert not np.array_equal(val["pixels"], a.render(0)["pixels"])
    other_seed = data.SyntheticCXR("train", seed=4).render(0)
    assert not np.array_equal(other_seed["pixels"], a.render(0)["pixels"])
    assert len(data.SyntheticCXR("test")) == 500 and len(data.SyntheticCXR("train", num_samples=10)) == 10


def test_synthetic_masks_boxes_labels_and_report_agree():
    ds = data.SyntheticCXR("train", image_size=128)
    n_normal, sided = 0, 0
    for i in range(80):
        r = ds.render(i)
        labels, masks, sentences = r["labels"], r["masks"], r["sentences"]
        present = {f for t, f in enumerate(SYNTH_FINDINGS) if masks[t].any()}
        # labels <-> masks <-> boxes
        assert present == {f for f in SYNTH_FINDINGS if labels[CHEXPERT_LABELS.index(LABEL_OF[f])] == 1}
        for f in set(SYNTH_FINDINGS) - present:
            assert labels[CHEXPERT_LABELS.index(LABEL_OF[f])] == 0
        assert [SYNTH_FINDINGS[t] for t in r["box_labels"]] == [f for f in SYNTH_FINDINGS if f in present]
        for box, t in zip(r["boxes"], r["box_labels"]):
            rows, cols = np.nonzero(masks[t])
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        for name in ("Edema", "Pneumonia", "Atelectasis", "Pleural Other", "Fracture", "Support Devices"):
            assert math.isnan(labels[CHEXPERT_LABELS.index(name)])
        assert labels[CHEXPERT_LABELS.index("Enlarged Cardiomediastinum")] == float("cardiomegaly" in present)
        # report <-> masks: every stated finding is drawn, every drawn finding is stated
        mentions = positive_mentions(sentences)
        assert {f for f, _ in mentions} == present, sentences
        for f, s in mentions:
            if f != "cardiomegaly":
                side = {"right", "left"} & set(re.findall(r"right|left", s.lower()))
                assert side == {mask_side(masks[SYNTH_FINDINGS.index(f)])}, (s, i)
                sided += 1
        consolidation = labels[CHEXPERT_LABELS.index("Consolidation")]
        if any("consolidation" in s for f, s in mentions if f == "opacity"):
            assert consolidation == 1
        elif "opacity" in present:  # "opacity" does not say whether it is consolidation
            assert math.isnan(consolidation)
        else:
            assert consolidation == 0
        if not present:
            n_normal += 1
            assert labels[0] == 1 and any(s.startswith("No ") for s in sentences)
        else:
            assert labels[0] == 0
    assert 15 <= n_normal <= 40 and sided > 20


@pytest.mark.parametrize("size", [64, 256])
def test_synthetic_other_sizes(size):
    ds = data.SyntheticCXR("validate", num_samples=12, image_size=size)
    for i in range(12):
        s = ds[i]
        assert s["image"].shape == (1, size, size) and s["masks"].shape == (len(SYNTH_FINDINGS), size, size)
        assert s["image"].dtype == torch.float32 and s["labels"].shape == (14,)
        for t in s["box_labels"]:  # every finding keeps a mask, even small ones at 64 px
            assert s["masks"][t].any()
        assert s["text"] == " ".join(s["sentences"])


def test_synthetic_hflip_swaps_pixels_masks_boxes_and_words():
    plain = data.SyntheticCXR("train", train=True, hflip=0.0)
    flip = data.SyntheticCXR("train", train=True, hflip=1.0)
    n_sided = 0
    for i in range(10):
        a, b = plain[i], flip[i]
        assert torch.equal(b["image"], a["image"].flip(-1))
        assert torch.equal(b["masks"], a["masks"].flip(-1))
        w = a["image"].shape[-1]
        assert torch.equal(b["boxes"][:, [0, 2]], w - a["boxes"][:, [2, 0]])
        for sa, sb in zip(a["sentences"], b["sentences"]):
            assert sb == sa.replace("right", "\0").replace("left", "right").replace("\0", "left") \
                .replace("Right", "\0").replace("Left", "Right").replace("\0", "Left")
        for f, s in positive_mentions(b["sentences"]):  # the flipped text still matches the flipped masks
            if f != "cardiomegaly":
                assert mask_side(b["masks"][SYNTH_FINDINGS.index(f)].numpy()) in s.lower()
                n_sided += 1
    assert n_sided > 0
    assert torch.equal(data.SyntheticCXR("train", train=False, hflip=1.0)[0]["image"], plain[0]["image"])


def test_synthetic_mean_std_constants():
    ds = data.SyntheticCXR("train", image_size=128)
    mean, std = data.pixel_stats([ds.render(i)["pixels"] for i in range(100)])
    assert abs(mean - ds.mean) < 0.01 and abs(std - ds.std) < 0.01


# --------------------------------------------------------------------------------------------- text
def test_split_sentences():
    fixture = (" The heart size is normal.  The mediastinal and hilar contours are\n unremarkable.  There is a new "
               "patchy opacity in the right lower lobe.  No\n pleural effusion or pneumothorax is seen.")
    assert data.split_sentences(fixture) == [
        "The heart size is normal.", "The mediastinal and hilar contours are unremarkable.",
        "There is a new patchy opacity in the right lower lobe.", "No pleural effusion or pneumothorax is seen."]
    assert data.split_sentences("1. Small left effusion. 2. No pneumothorax.\n3. Nodule, 2.5 cm vs. 2.1 cm.") == [
        "Small left effusion.", "No pneumothorax.", "Nodule, 2.5 cm vs. 2.1 cm."]
    assert data.split_sentences("Discussed with Dr. ___ at 10:15 a.m. on ___.  Approx. 3 mm, i.e. tiny, e.g. "
                                "stable.") == ["Discussed with Dr. ___ at 10:15 a.m. on ___.",
                                               "Approx. 3 mm, i.e. tiny, e.g. stable."]
    assert data.split_sentences("Lungs are clear.  Heart size is normal.\n \n No acute process") == [
        "Lungs are clear.", "Heart size is normal.", "No acute process"]
    assert data.split_sentences(" IMPRESSION: \n \n ___\n") == ["IMPRESSION:"]
    assert data.split_sentences("  \n ___ . ") == []
    assert data.split_sentences("ET tube 4.5 cm above the carina! Is it? Yes.") == [
        "ET tube 4.5 cm above the carina!", "Is it?", "Yes."]
    ds = data.SyntheticCXR("test")  # the synthetic reports survive a round trip through their joined text
    for i in range(50):
        r = ds.render(i)
        assert data.split_sentences(" ".join(r["sentences"])) == r["sentences"]


def test_build_tokenizer_round_trip(tmp_path):
    tok = data.build_tokenizer(["No effusion.", "Left effusion, ___ small.", "no EFFUSION"], min_freq=1)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[5:9] == ["_", "effusion", ".", "no"]  # counts 3, 3, 2, 2; ties in code-point order
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    ids = tok("No effusion, pneumothorax.", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["no", "effusion", ",", "[UNK]", "."]
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("No effusion, pneumothorax.")["input_ids"] == [2] + ids + [3]
    assert len(data.build_tokenizer(["No effusion.", "Left effusion."], min_freq=2)) == 5 + 2  # effusion, .
    # the zero-shot prompts' words the reports lack go last, in order; known ones keep their place and count
    tok = data.build_tokenizer(["No effusion."], extra_texts=["pleural effusion", "no pleural effusion", "edema"])
    assert tok.convert_ids_to_tokens(list(range(5, len(tok)))) == [".", "effusion", "no", "pleural", "edema"]


def test_report_tokenizer_knows_the_prompts_its_evaluation_scores():
    train = data.make_dataset("synthetic", split="train", image_size=64, num_samples=3)
    words = set(data.report_tokenizer("tiny", train).get_vocab())
    assert {"airspace", "opacity", "pulmonary", "nodule", "pleural", "effusion", "pneumothorax", "no"} <= words
    assert "atelectasis" not in words  # a CheXpert prompt: real data's, not the synthetic set's
    names, phrases = data.zero_shot_findings(False)
    assert len(names) == 13 and "no finding" not in names and phrases[names.index("edema")] == "edema"


def test_zero_shot_targets_follow_zero_shot_findings():
    """Synthetic batches: a finding is present where its mask has a pixel; CheXpert batches: the labels without No
    Finding, uncertain (-1) and unknown (nan) as they are."""
    masks = torch.zeros(2, len(SYNTH_FINDINGS), 4, 4, dtype=torch.bool)
    masks[0, 1, 2, 3] = masks[1, 4, 0, 0] = True
    got = data.zero_shot_targets(dict(masks=masks, labels=torch.ones(2, 14)))
    assert got.tolist() == [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]] and got.shape[1] == len(data.zero_shot_findings(True)[0])
    labels = torch.tensor([[1.0, 0.0, -1.0] + [float("nan")] * 11])
    torch.testing.assert_close(data.zero_shot_targets(dict(labels=labels)), labels[:, 1:], equal_nan=True)


def test_train_view_is_one_rule_for_every_size():
    """The loader's training view (here 73 px, a CSV's 8/7 of 64) reaches --image-size: resized whole without an
    augmentation (the evaluation view's content), or through the method's BatchAugment; an already-sized view
    passes untouched."""
    x = torch.randn(2, 1, 73, 73)
    plain = data.train_view(x, 64)
    assert plain.shape == (2, 1, 64, 64)
    assert torch.allclose(plain, torch.nn.functional.interpolate(x, size=64, mode="bilinear", antialias=True))
    same = torch.randn(2, 1, 64, 64)
    assert data.train_view(same, 64) is same
    crop = data.crop_augment(224, 0.5, 0.25)
    params = crop.sample_params(4, 256, 256, torch.Generator().manual_seed(0))
    assert (params["height"] == 224).all() and (params["width"] == 224).all()  # a random 224 crop of 256
    assert data.train_view(torch.randn(4, 1, 256, 256), 224, crop).shape == (4, 1, 224, 224)
    window = torch.arange(256.0).expand(1, 1, 256, 256) / 255  # a crop at whole pixels: a copy, not a resampling
    one = {k: v[:1] for k, v in params.items()}
    out = crop.apply((window - 0.5) / 0.25, one) * 0.25 + 0.5
    top, left = int(one["top"]), int(one["left"])
    assert torch.allclose(out, window[..., top:top + 224, left:left + 224], atol=1e-4)  # float32 grid rounding




def test_synthetic_faint_same_scenes_findings_at_0_4_contrast():
    """synthetic-faint: the same scenes, masks and reports; what a finding changes in the pixels is 0.4 of the
    default's (against the same film rendered with finding_contrast 0), and the downstream records render it."""
    full, faint = (data.make_dataset(name, split="train", image_size=128, num_samples=12)
                   for name in ("synthetic", "synthetic-faint"))
    none = data.SyntheticCXR("train", 12, image_size=128, finding_contrast=0.0)
    ratios = []
    for i in range(12):
        f, w, n = full.render(i), faint.render(i), none.render(i)
        assert f["sentences"] == w["sentences"] and (f["masks"] == w["masks"]).all()
        inside = f["masks"][:3].any(0)  # opacity, nodule, effusion: they add density
        if inside.sum() > 50:
            change = lambda r: r["pixels"][inside].astype(float) - n["pixels"][inside]  # noqa: E731
            ratios.append(change(w).mean() / change(f).mean())
    assert len(ratios) >= 4 and all(abs(r - 0.4) < 0.05 for r in ratios), ratios
    records, classes = data.read_records("synthetic-faint", None, num_samples=10)
    rec = records[0]
    split, index = rec["synthetic"][:2]
    want = data.make_dataset("synthetic-faint", split=split, image_size=64, num_samples=rec["synthetic"][2])
    assert (data.load_record(rec, 64)["image"] == want.render(index)["pixels"]).all()


def test_check_data_root_names_the_missing_root():
    for name in ("mimic", "csv"):
        with pytest.raises(SystemExit, match=f"--data {name} needs --data-root"):
            data.check_data_root(name, "")
    data.check_data_root("mimic", "cache/mimic256")
    for name in data.SYNTHETIC_CONTRAST:  # generated: no root needed
        data.check_data_root(name, "")

def test_report_tokenizer_random_init_vocab_and_offline_message(tmp_path):
    ds = data.SyntheticCXR("train", num_samples=8, image_size=64)
    for text_model in ("tiny", "bert-base"):
        tok = data.report_tokenizer(text_model, ds)   # every training word is known, nothing becomes [UNK]
        ids = tok(data.report_texts(ds)[0])["input_ids"]
        assert tok.unk_token_id not in ids and len(ids) > 3
    with pytest.raises(SystemExit, match="no-such-model.*--text-model tiny"):
        data.report_tokenizer(str(tmp_path / "no-such-model"), ds)

def test_collate_joint_tokenization():
    tok = data.build_tokenizer(["no effusion . heart is normal . left pleural"])
    t = {w: tok.convert_tokens_to_ids(w) for w in "no effusion . heart is normal left pleural".split()}
    img = torch.zeros(1, 4, 4)
    a = dict(image=img, sentences=["No effusion.", "Heart is normal."], labels=torch.zeros(14), study_id="a")
    b = dict(image=img + 1, sentences=["Left pleural effusion."], labels=torch.ones(14), study_id="b")
    batch = data.collate([a, b], tok)
    assert batch["input_ids"].tolist() == [
        [2, t["no"], t["effusion"], t["."], t["heart"], t["is"], t["normal"], t["."], 3],
        [2, t["left"], t["pleural"], t["effusion"], t["."], 3, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 9, [1] * 6 + [0] * 3]
    assert batch["sentence_index"].tolist() == [[-1, 0, 0, 0, 1, 1, 1, 1, -1], [-1, 0, 0, 0, 0, -1, -1, -1, -1]]
    assert batch["sentence_mask"].tolist() == [[True, True], [True, False]]
    assert batch["images"].shape == (2, 1, 4, 4) and batch["labels"].shape == (2, 14)
    assert batch["study_ids"] == ["a", "b"] and batch["texts"][0] == "No effusion. Heart is normal."
    # max_length 6 -> 4 tokens: the second sentence of `a` (4 tokens) no longer fits and is dropped
    short = data.collate([a, b], tok, max_length=6)
    assert short["sentences"] == [["No effusion."], ["Left pleural effusion."]]
    assert short["sentence_index"].tolist() == [[-1, 0, 0, 0, -1, -1], [-1, 0, 0, 0, 0, -1]]
    # max_length 4 -> 2 tokens: a too-long first sentence is truncated and kept alone
    tiny = data.collate([a], tok, max_length=4)
    assert tiny["input_ids"].tolist() == [[2, t["no"], t["effusion"], 3]] and tiny["sentences"] == [["No effusion."]]
    # the sentence transform runs first
    rev = data.collate([a], tok, sentence_transform=lambda s: s[::-1])
    assert rev["sentences"] == [["Heart is normal.", "No effusion."]]
    assert rev["sentence_index"][0].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, -1]


def test_collate_synthetic_masks_and_boxes():
    ds = data.SyntheticCXR("train", num_samples=4, image_size=64)
    samples = [ds[i] for i in range(4)]
    tok = data.build_tokenizer([s["text"] for s in samples])
    batch = data.collate(samples, tok)
    assert len(batch["masks"]) == 4 and len(batch["boxes"]) == 4 and len(batch["box_labels"]) == 4
    assert (batch["input_ids"] == tok.unk_token_id).sum() == 0
    for i, s in enumerate(samples):  # each kept sentence owns at least one token, in order
        owners = batch["sentence_index"][i][batch["sentence_index"][i] >= 0]
        assert owners.unique().tolist() == list(range(len(s["sentences"])))
        assert (owners.diff() >= 0).all() and batch["sentence_mask"][i].sum() == len(s["sentences"])


# --------------------------------------------------------------------------------------------- augmentation
def identity_augment(size, **kw):
    args = dict(crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation=0.0, translate=0.0, scale=(1.0, 1.0),
                brightness=(1.0, 1.0), contrast=(1.0, 1.0), blur_sigma=(1e-3, 1e-3))
    args.update(kw)
    return data.BatchAugment(size, 0.5, 0.25, **args)


def test_batch_augment_shapes_kernel_and_determinism():
    aug = data.BatchAugment(224, 0.5, 0.25)
    assert aug.kernel_size == 23
    x = torch.randn(3, 1, 256, 256) * 0.25
    y1 = aug(x, generator=torch.Generator().manual_seed(0))
    y2 = aug(x, generator=torch.Generator().manual_seed(0))
    assert y1.shape == (3, 1, 224, 224) and torch.equal(y1, y2)
    assert not torch.equal(y1, aug(x, generator=torch.Generator().manual_seed(1)))
    assert ((y1 * 0.25 + 0.5) >= -1e-5).all() and ((y1 * 0.25 + 0.5) <= 1 + 1e-5).all()  # clamped pixels


def test_batch_augment_identity_and_colour_jitter():
    x = (torch.rand(2, 1, 32, 32) - 0.5) / 0.25  # normalized pixels in [0, 1]
    assert torch.allclose(identity_augment(32)(x), x, atol=1e-5)
    pixels = x * 0.25 + 0.5
    bright = identity_augment(32, brightness=(1.3, 1.3))(x) * 0.25 + 0.5
    assert torch.allclose(bright, (pixels * 1.3).clamp(0, 1), atol=1e-5)
    low = identity_augment(32, contrast=(0.5, 0.5))(x) * 0.25 + 0.5
    mean = pixels.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(low, 0.5 * pixels + 0.5 * mean, atol=1e-5)
    import torchvision.transforms.v2.functional as TF
    blurred = identity_augment(64, blur_sigma=(1.5, 1.5))(x.repeat(1, 1, 2, 2)) * 0.25 + 0.5
    assert torch.allclose(blurred, TF.gaussian_blur(pixels.repeat(1, 1, 2, 2), [7, 7], [1.5, 1.5]), atol=1e-5)


def test_batch_augment_zoom_out_fills_black():
    x = torch.full((2, 1, 32, 32), 2.0)  # bright everywhere
    y = identity_augment(32, scale=(0.5, 0.5))(x) * 0.25 + 0.5  # zoomed out: the border is black fill
    assert y[:, :, :6, :].abs().max() < 1e-5 and y[:, :, 8:24, 8:24].min() > 0.99


def test_batch_augment_parameter_ranges():
    aug = data.BatchAugment(224, 0.5, 0.25)
    p = aug.sample_params(4000, 256, 256, torch.Generator().manual_seed(0))
    top, left, h, w = p["top"], p["left"], p["height"], p["width"]
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 256).all()
    area, ratio = (h * w).double() / 256 ** 2, (w / h).double()
    assert area.min() > 0.59 and area.max() <= 1.0 and 0.74 < ratio.min() and ratio.max() < 1.34
    assert p["angle"].abs().max() <= 20 and p["angle"].abs().max() > 19
    assert p["tx"].abs().max() <= 22.4 and torch.equal(p["tx"], p["tx"].round())  # 10 % of 224, whole pixels
    for key, (lo, hi) in (("zoom", (0.95, 1.05)), ("brightness", (0.6, 1.4)), ("contrast", (0.6, 1.4)),
                          ("sigma", (0.1, 3.0))):
        assert lo <= p[key].min() < lo + 0.01 and hi - 0.01 < p[key].max() <= hi
    assert 0.45 < p["bright_first"].double().mean() < 0.55


def test_batch_augment_matches_torchvision_crop_then_affine():
    """The single composed resample equals torchvision's resized_crop followed by affine (same parameters),
    up to the second interpolation that the composition saves."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode
    img = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                                          size=(64, 64), mode="bicubic", align_corners=False).clamp(0, 1)
    params = dict(top=5, left=8, height=40, width=48, angle=15.0, tx=3.0, ty=-2.0, zoom=1.03, brightness=1.0,
                  contrast=1.0, bright_first=True, sigma=1e-3)
    mine = data.BatchAugment(48, 0.0, 1.0).apply(img, {k: torch.tensor([v]) for k, v in params.items()})
    bilinear = InterpolationMode.BILINEAR
    ref = TF.resized_crop(img, 5, 8, 40, 48, [48, 48], interpolation=bilinear, antialias=False)
    ref = TF.affine(ref, angle=15.0, translate=[3, -2], scale=1.03, shear=[0.0, 0.0], interpolation=bilinear, fill=0.0)
    fill = ((mine == 0) | (ref == 0)).float()
    fill[..., :2, :] = fill[..., -2:, :] = fill[..., :2] = fill[..., -2:] = 1  # and the image border
    near_fill = torch.nn.functional.max_pool2d(fill, 5, stride=1, padding=2) > 0  # edges are blended differently
    assert ((mine == 0) != (ref == 0)).float().mean() < 0.02
    assert (mine - ref).abs()[~near_fill].max() < 0.05 and (mine - ref).abs().mean() < 0.01


# --------------------------------------------------------------------------------------------- csv
def write_pairs(tmp_path, rows):
    for name in ("a.png", "b.png"):
        Image.fromarray((np.arange(40 * 30).reshape(30, 40) % 256).astype(np.uint8)).save(tmp_path / name)
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "report", "split", "Cardiomegaly"])
        writer.writerows(rows)
    return str(path)


def test_csv_pairs(tmp_path):
    path = write_pairs(tmp_path, [["a.png", "Heart is enlarged. No effusion.", "train", "1"],
                                  ["b.png", "Normal.", "test", ""]])
    train = data.CsvPairs(path, split="train", image_size=28, train=True)
    assert len(train) == 1 and 0 < train.mean < 1 and train.std > 0
    s = train[0]
    assert s["image"].shape == (1, 32, 32)  # train: native size 28 * 8 / 7 for BatchAugment
    assert s["sentences"] == ["Heart is enlarged.", "No effusion."]
    assert s["labels"][CHEXPERT_LABELS.index("Cardiomegaly")] == 1 and math.isnan(s["labels"][0])
    test = data.CsvPairs(path, split="test", image_size=28, train=False)
    assert test[0]["image"].shape == (1, 28, 28) and (test.mean, test.std) == (train.mean, train.std)
    assert math.isnan(test[0]["labels"][CHEXPERT_LABELS.index("Cardiomegaly")])
    assert len(data.make_dataset("csv", path, split=None, image_size=28)) == 2
    everything = data.CsvPairs(path, image_size=28)
    os.remove(os.path.join(os.path.dirname(path), "a.png"))  # report_texts never reads an image
    assert data.report_texts(everything) == ["Heart is enlarged. No effusion.", "Normal."]


def test_report_texts_follow_nested_subsets():
    ds = data.SyntheticCXR("train", num_samples=12, image_size=64)
    inner = torch.utils.data.Subset(ds, [3, 5, 7, 9, 11])
    outer = torch.utils.data.Subset(inner, [4, 0, 2])
    assert data.report_texts(outer) == [ds[i]["text"] for i in (11, 3, 7)]
    assert data.report_texts(ds) == [ds[i]["text"] for i in range(12)]


def test_csv_pairs_errors(tmp_path):
    path = write_pairs(tmp_path, [["a.png", "Fine.", "train", ""], ["missing.png", "Fine.", "train", ""]])
    with pytest.raises(ValueError, match=r"row 3.*missing\.png"):
        data.CsvPairs(path)
    path = write_pairs(tmp_path, [["a.png", "  ", "train", ""]])
    with pytest.raises(ValueError, match=r"row 2: empty report"):
        data.CsvPairs(path)
    path = write_pairs(tmp_path, [["a.png", "Fine.", "train", "yes"]])
    with pytest.raises(data.BadRecord, match=r"row 2: label 'Cardiomegaly' is not a number: 'yes'"):
        data.CsvPairs(path)
    path = write_pairs(tmp_path, [["a.png", "Fine.", "train", ""], ["a.png", "Fine.", "val", ""],
                                  ["a.png", "Fine.", "later", ""]])
    with pytest.raises(data.BadRecord, match=r"row 4: split 'later' is not one of"):  # "val" is a known spelling
        data.CsvPairs(path)
    # a bad test row is found when the training split is built, before any training
    path = write_pairs(tmp_path, [["a.png", "Fine.", "train", ""], ["bad.png", "Fine.", "test", ""]])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(data.BadRecord, match=r"row 3: not an image file .*bad\.png"):
        data.CsvPairs(path, split="train", mean=0.5, std=0.25)


def noise_image(path, size=64, seed=0, **save):
    """A noise image (so that its compressed data is as long as a real film's, relative to its header)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save)
    return path


def truncate(path, keep=0.5):
    data_ = path.read_bytes()
    path.write_bytes(data_[:int(len(data_) * keep)])
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_image_file_problem_detects_truncated_png_and_jpeg(tmp_path):
    png, jpeg = noise_image(tmp_path / "a.png"), noise_image(tmp_path / "a.jpg", quality=95)
    assert data.image_file_problem(str(png)) is None and data.image_file_problem(str(jpeg)) is None
    # PNG: verify() checks each chunk's CRC up to IEND, so any cut through the data (or a missing IEND) is found
    for keep in (0.5, 0.9):
        assert "truncated or damaged" in data.image_file_problem(str(truncate(noise_image(tmp_path / "b.png"), keep)))
    # JPEG: verify() accepts a cut file; only the missing end-of-image marker gives it away
    cut = truncate(noise_image(tmp_path / "b.jpg", quality=95), 0.9)
    with Image.open(cut) as im:
        im.verify()  # Pillow alone does not notice
    assert "no end-of-image marker" in data.image_file_problem(str(cut))
    padded = tmp_path / "c.jpg"
    padded.write_bytes(jpeg.read_bytes() + b"\0" * 16)  # zero padding after the marker is tolerated
    assert data.image_file_problem(str(padded)) is None
    (tmp_path / "d.png").write_bytes(b"not an image")
    assert "not an image file" in data.image_file_problem(str(tmp_path / "d.png"))


def test_csv_truncated_image_beyond_the_statistics_sample_is_found_at_construction(tmp_path):
    for k in range(4):
        noise_image(tmp_path / f"{k}.png", seed=k)
    truncate(noise_image(tmp_path / "cut.png"))
    rows = [[f"{i % 4}.png", "Fine.", "train", ""] for i in range(200)]
    rows[149][0] = "cut.png"  # index 149: not among the 64 evenly spaced rows (every 3rd) the statistics decode
    path = write_csv(tmp_path / "pairs.csv", ["image", "report", "split", "Cardiomegaly"], rows)
    with pytest.raises(data.BadRecord, match=r"1 bad record in .*pairs\.csv:\n .*pairs\.csv row 151: truncated"):
        data.CsvPairs(path, split="train", image_size=28)


def test_csv_bad_rows_all_listed_or_skipped(tmp_path, capsys):
    noise_image(tmp_path / "a.png")
    truncate(noise_image(tmp_path / "cut.png"))
    truncate(noise_image(tmp_path / "cut.jpg", quality=95), 0.9)
    rows = [["a.png", "Fine.", "train", "1"]] * 6 + [["a.png", "Fine.", "test", ""]] * 2
    rows[1], rows[3], rows[4] = ["missing.png", "Fine.", "train", ""], ["cut.png", "Fine.", "train", ""], \
        ["cut.jpg", "Fine.", "validate", ""]
    rows.append(["a.png", " ___ ", "test", ""])  # a report without a sentence
    path = write_csv(tmp_path / "pairs.csv", ["image", "report", "split", "Cardiomegaly"], rows)
    with pytest.raises(data.BadRecord) as e:
        data.CsvPairs(path, split="train", image_size=28)
    lines = str(e.value).splitlines()
    assert lines[0].startswith("4 bad records in") and lines[-1] == data.SKIP_BAD_HINT
    assert [re.search(r"row (\d+): (\w+)", line).groups() for line in lines[1:-1]] == [
        ("3", "image"), ("5", "truncated"), ("6", "truncated"), ("10", "empty")]
    assert "missing.png" in lines[1] and "end-of-image" in lines[3]
    ds = data.make_dataset("csv", path, split="train", image_size=28, skip_bad=True)
    assert "skipped 4 bad records" in capsys.readouterr().err
    assert len(ds) == 3 and all(ds[i]["image"].shape == (1, 32, 32) for i in range(len(ds)))  # the good train rows
    assert len(data.make_dataset("csv", path, split="test", image_size=28, train=False, skip_bad=True)) == 2
    assert "skipped" not in capsys.readouterr().err  # checked once per process, for every split
    rows = [[f"gone{i}.png", "Fine.", "train", ""] for i in range(25)]
    twenty_listed = r"(?s)^25 bad records in .*gone19\.png\n  \.\.\. and 5 more\n\(--skip-bad"
    with pytest.raises(data.BadRecord, match=twenty_listed):
        data.CsvPairs(write_csv(tmp_path / "gone.csv", ["image", "report", "split"], rows))


def split_ids(path, **kw):
    """{split: the study ids of its samples}."""
    datasets = {s: data.CsvPairs(path, split=s, image_size=28, mean=0.5, std=0.25, **kw) for s in data.SPLITS}
    return {s: [ds[i]["study_id"] for i in range(len(ds))] for s, ds in datasets.items()}


def test_csv_without_split_column_is_split_by_patient(tmp_path, capsys):
    noise_image(tmp_path / "a.png")
    sizes = np.random.default_rng(0).integers(1, 4, 100)  # 100 patients with 1-3 studies each
    rows = [["a.png", "Fine.", f"p{p}", f"s{p}-{k}"] for p, n in enumerate(sizes) for k in range(n)]
    path = write_csv(tmp_path / "pairs.csv", ["image", "report", "patient", "study_id"], rows)
    ids = split_ids(path)
    patients = {s: {i.split("-")[0] for i in ids[s]} for s in data.SPLITS}
    assert not (patients["train"] & patients["validate"] or patients["train"] & patients["test"]
                or patients["validate"] & patients["test"])  # no patient in two splits
    assert sum(map(len, ids.values())) == len(rows)
    for s, share in zip(data.SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(ids[s]) / len(rows) - share) < 0.03
    err = capsys.readouterr().err
    assert err.count("no 'split' column; split 80/10/10 by patient (seed 0): ") == 1  # once, for all splits
    assert f"{len(ids['train'])} train / {len(ids['validate'])} validate / {len(ids['test'])} test pairs" in err
    data._checked_pairs.cache_clear()
    assert split_ids(path) == ids  # deterministic; another split_seed gives another split
    assert split_ids(path, split_seed=1) != ids
    assert len(data.CsvPairs(path, image_size=28, mean=0.5, std=0.25)) == len(rows)  # split=None: every row


def test_csv_without_split_column_by_study_or_row_and_the_split_column_wins(tmp_path, capsys):
    noise_image(tmp_path / "a.png")
    rows = [["a.png", "Fine.", f"s{i // 2}"] for i in range(100)]  # 50 studies of two images
    ids = split_ids(write_csv(tmp_path / "studies.csv", ["image", "report", "study_id"], rows))
    assert [len(ids[s]) for s in data.SPLITS] == [80, 10, 10] and not set(ids["train"]) & set(ids["test"])
    assert "split 80/10/10 by study_id (seed 0)" in capsys.readouterr().err
    ids = split_ids(write_csv(tmp_path / "rows.csv", ["image", "report"], [r[:2] for r in rows]))
    assert [len(ids[s]) for s in data.SPLITS] == [80, 10, 10]
    assert "split 80/10/10 by row (seed 0): 80 train / 10 validate / 10 test pairs" in capsys.readouterr().err
    explicit = [["a.png", "Fine.", f"s{i}", "test" if i < 30 else "train"] for i in range(100)]
    ids = split_ids(write_csv(tmp_path / "explicit.csv", ["image", "report", "study_id", "split"], explicit))
    assert [len(ids[s]) for s in data.SPLITS] == [70, 0, 30] and "split" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- entry points
def test_make_dataset_synthetic_and_demo(tmp_path, capsys):
    ds = data.make_dataset("synthetic", split="validate", image_size=64, num_samples=3, seed=1)
    assert len(ds) == 3 and ds[0]["image"].shape == (1, 64, 64)
    with pytest.raises(ValueError):
        data.make_dataset("nope")
    data.main(["demo", "--out", str(tmp_path), "--n", "2", "--image-size", "64"])
    assert os.path.isfile(tmp_path / "synthetic_demo.png") and "image 1" in capsys.readouterr().out


def test_pixel_stats_pooled_over_chunks():
    images = torch.randint(0, 256, (600, 16, 24), dtype=torch.uint8)  # more than one chunk of 256
    pooled = images.double() / 255.0
    mean, std = data.pixel_stats(images)
    assert math.isclose(mean, pooled.mean().item(), rel_tol=1e-12)
    assert math.isclose(std, pooled.std(unbiased=False).item(), rel_tol=1e-12)
    assert data.pixel_stats(list(images.numpy())) == (mean, std)

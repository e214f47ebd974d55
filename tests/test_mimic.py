"""MIMIC-CXR part of data.py: MIT-LCP section parser, prepare-mimic cache (validation, resume, workers), MimicCXR.

The fixture is a tiny MIMIC-CXR-JPG 2.0.0 tree in the release's exact layout and CSV formats (made-up ids and texts;
MIT-LCP/mimic-cxr:dcm/create-mimic-cxr-jpg-metadata.ipynb, txt/section_parser.py)."""
import argparse
import csv
import gzip
import io
import json
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data as mp
from data import MimicCXR, parse_report_sections, prepare_mimic, report_sentences

S = 64  # the cache's image size in the tests

REPORT_1 = (  # made up, byte-exact in MIMIC-CXR's format: header line, one leading space, " " blank lines
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n \n"
    " INDICATION:  ___ year old man with cough and fever  // ?pneumonia\n \n"
    " TECHNIQUE:  Chest PA and lateral\n \n"
    " COMPARISON:  ___\n \n"
    " FINDINGS: \n \n"
    " The heart size is normal.  The mediastinal and hilar contours are\n"
    " unremarkable.  There is a new patchy opacity in the right lower lobe.  No\n"
    " pleural effusion or pneumothorax is seen.\n \n"
    " IMPRESSION: \n \n"
    " Right lower lobe opacity concerning for pneumonia.\n")
REPORT_2 = (  # no FINDINGS / IMPRESSION headers: MIT-LCP's last-paragraph fallback
    "                                 FINAL REPORT\n"
    " CHEST, PA LATERAL:\n \n"
    " INDICATION:  ___ with dyspnea.\n \n"
    " COMPARISON:  None.\n \n"
    " Lungs are clear without consolidation or effusion.  Heart size is normal.\n \n"
    " No acute cardiopulmonary process.\n")
HEAD = "                                 FINAL REPORT\n"
NORMAL = HEAD + " FINDINGS: \n \n Lungs are clear.\n \n IMPRESSION: \n \n Normal chest.\n"
REPORTS = {
    "50000001": REPORT_1,
    "50000002": REPORT_2,  # neither findings nor impression: rejected
    "51000004": NORMAL,
    "52000004": HEAD + " EXAMINATION:  CHEST\n \n IMPRESSION:  No acute cardiopulmonary process.\n",  # impression only
    # a lower-case "Impression:" is no header: it stays inside the findings
    "53000005": HEAD + " FINDINGS:  Mild cardiomegaly.\n Impression: stable.\n \n IMPRESSION: \n \n"
                       " Mild cardiomegaly, unchanged.\n",
    "54000006": NORMAL, "55000007": NORMAL, "59000011": NORMAL, "50913680": NORMAL,
    "56000008": HEAD + " IMPRESSION: \n \n ___\n",  # < 3 tokens
    "57000009": HEAD + " FINDINGS: \n \n No pneumothorax is seen.\n",  # findings only, no CheXpert row
}  # 58000010 has no report file
IMAGES = [  # subject, study, split, view, kind
    ("10000001", "50000001", "train", "PA", "ok"),
    ("10000001", "50000001", "train", "LATERAL", "ok"),
    ("10000001", "50000002", "train", "AP", "ok"),
    ("11000002", "51000003", "validate", "", "ok"),
    ("11000002", "51000004", "validate", "PA", "ok"),
    ("12000003", "52000004", "test", "PA", "ok"),
    ("13000004", "53000005", "train", "PA", "ok"),
    ("13000004", "53000005", "train", "AP", "dark"),
    ("14000005", "54000006", "train", "PA", "truncated"),
    ("14000005", "54000006", "train", "AP", "ok"),
    ("15000006", "55000007", "train", "PA", "constant"),
    ("16000007", "56000008", "train", "PA", "ok"),
    ("17000008", "57000009", "train", "AP", "ok"),
    ("18000009", "58000010", "train", "PA", "ok"),
    ("11851243", "50913680", "train", "PA", "ok"),  # a study in MIT-LCP's custom-rule tables
    ("19000010", "59000011", "train", "PA", "empty"),
]
CHEXPERT_CSV = ("subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
                "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,"
                "Support Devices\n") + """10000001,50000001,,,,,,,,1.0,,,,-1.0,0.0,
10000001,50000002,1.0,-1.0,,0.0,,,,1.0,,1.0,,,,1.0
11000002,51000003,,,,,,,,,1.0,,,,,
11000002,51000004,,,,,,,,,1.0,,,,,
12000003,52000004,,1.0,,,0.0,,,,,0.0,,,,
13000004,53000005,,1.0,,,,,,,,,,,,
"""
METADATA_HEADER = ("dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns,"
                   "StudyDate,StudyTime,ProcedureCodeSequence_CodeMeaning,ViewCodeSequence_CodeMeaning,"
                   "PatientOrientationCodeSequence_CodeMeaning")


def dicom_id(k):
    return f"{k:08x}-0b1e2f3a-4c5d6e7f-8091a2b3-c4d5e6f7"


def jpeg_bytes(k, kind, h=300, w=360):
    if kind == "constant":
        pixels = np.full((h, w), 128, np.uint8)
    else:
        rng = np.random.default_rng(k)
        y, x = np.mgrid[0:h, 0:w]
        pixels = 60 + 100 * (x / w) + 40 * np.sin(y / 9.0) + rng.normal(0, 8, (h, w))
        pixels = np.clip(pixels * (0.3 if kind == "dark" else 1.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    return {"truncated": data[: len(data) // 2], "empty": b""}.get(kind, data)


def make_mimic(base, gz=True, separate_reports=True):
    """Write the fixture tree; returns (root, reports) as prepare_mimic takes them."""
    root = base / "mimic-cxr-jpg" / "2.0.0"
    reports = base / "mimic-cxr-reports" if separate_reports else root
    split, meta = ["dicom_id,study_id,subject_id,split"], [METADATA_HEADER]
    for k, (subject, study, which, view, kind) in enumerate(IMAGES):
        folder = root / f"files/p{subject[:2]}/p{subject}/s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dicom_id(k)}.jpg").write_bytes(jpeg_bytes(k, kind))
        split.append(f"{dicom_id(k)},{study},{subject},{which}")
        name = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}.get(view, "")
        meta.append(f"{dicom_id(k)},{subject},{study},CHEST (PA AND LAT),{view},300,360,21800506,213014.531,"
                    f"CHEST (PA AND LAT),{name},Erect")
        if study in REPORTS:
            path = reports / f"files/p{subject[:2]}/p{subject}/s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(REPORTS[study])
    for name, text in [("split", "\n".join(split) + "\n"), ("metadata", "\n".join(meta) + "\n"),
                       ("chexpert", CHEXPERT_CSV)]:
        path = root / f"mimic-cxr-2.0.0-{name}.csv"
        if gz:
            with gzip.open(f"{path}.gz", "wt") as f:
                f.write(text)
        else:
            path.write_text(text)
    return root, reports


CACHE_FILES = ("images.bin", "manifest.csv", "studies.jsonl", "rejected.csv", "meta.json", "state.json")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_mimic(tmp_path_factory.mktemp("mimic"))


@pytest.fixture(scope="module")
def cache(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    prepare_mimic(tree[0], out, reports=tree[1], image_size=S, workers=1, chunk_size=2)
    return out


# ---------------------------------------------------------------------------------------------- section parser
def test_sections_fixture_reports():
    sections = parse_report_sections(REPORT_1)
    assert list(sections) == ["preamble", "examination", "indication", "technique", "comparison", "findings",
                              "impression"]
    assert sections["preamble"] == "                                 FINAL REPORT\n "
    assert sections["impression"] == "\n \n Right lower lobe opacity concerning for pneumonia.\n"
    assert sections["comparison"] == " ___\n "  # bodies are not stripped
    sections = parse_report_sections(REPORT_2)  # the title-like header becomes an empty findings and is dropped
    assert list(sections) == ["preamble", "indication", "comparison", "last_paragraph"]
    assert sections["comparison"] == " None."
    assert sections["last_paragraph"] == (" Lungs are clear without consolidation or effusion.  Heart size is "
                                          "normal.\n \n No acute cardiopulmonary process.\n")


def test_sections_rules():
    assert parse_report_sections("no headers here") == {"full report": "no headers here"}
    # upper case only: "Findings:" and headers with digits are plain text
    assert list(parse_report_sections("x\n Findings: a\n VIEW 2: b\n")) == ["full report"]
    assert parse_report_sections("x\n IMPRESSION: a\n IMPRESSION: b\n")["impression"] == "b\n"  # last wins
    text = ("x\n CONCLUSION: a\n CLINICAL HISTORY: b\n PA AND LATERAL VIEWS OF THE CHEST: c\n FOO BAR: d\n"
            " COMPARISIONS: e\n FINDINGS/ IMPRESSION: f\n")
    assert list(parse_report_sections(text)) == ["preamble", "impression", "history", "findings", "foo bar",
                                                 "comparison"]  # misspellings by the synonym map, then substrings
    # a header whose colon is followed by the newline swallows the next line: it cannot start a section
    assert parse_report_sections("x\n FINDINGS:\n IMPRESSION: a\n") == {"preamble": "x\n ",
                                                                        "findings": " IMPRESSION: a\n"}
    # empty findings (duplicated header) is dropped
    assert list(parse_report_sections("x\n FINDINGS: \n \n IMPRESSION: \n \n Normal.\n")) == ["preamble",
                                                                                             "impression"]


def test_report_sentences():
    assert report_sentences(REPORT_1) == [
        "The heart size is normal.", "The mediastinal and hilar contours are unremarkable.",
        "There is a new patchy opacity in the right lower lobe.", "No pleural effusion or pneumothorax is seen.",
        "Right lower lobe opacity concerning for pneumonia."]  # findings first, then impression
    assert report_sentences(REPORTS["52000004"]) == ["No acute cardiopulmonary process."]
    assert report_sentences(REPORT_2) == []  # the last paragraph is not used (LoVT)


# ---------------------------------------------------------------------------------------------- prepare-mimic
def test_prepare_counts_and_rejections(cache):
    meta = json.loads((cache / "meta.json").read_text())
    assert (meta["image_size"], meta["n_images"], meta["n_studies"], meta["non_frontal_skipped"]) == (S, 7, 6, 2)
    assert meta["rejected"] == {"constant_image": 1, "custom_rule_study": 1, "empty_image": 1, "missing_report": 1,
                                "no_findings_or_impression": 1, "no_valid_image": 2, "too_few_tokens": 1,
                                "unreadable_image": 1}
    with open(cache / "rejected.csv", newline="") as f:
        rejected = {(r["path"].rsplit("/", 1)[-1], r["reason"]) for r in csv.DictReader(f)}
    assert (f"{dicom_id(8)}.jpg", "unreadable_image") in rejected  # the truncated JPEG
    assert (f"{dicom_id(10)}.jpg", "constant_image") in rejected
    assert ("s50000002.txt", "no_findings_or_impression") in rejected
    assert (cache / "images.bin").stat().st_size == 7 * S * S
    with open(cache / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert [r["dicom_id"] for r in manifest] == [dicom_id(k) for k in (0, 4, 5, 6, 7, 9, 12)]  # sorted, frontal
    images = np.fromfile(cache / "images.bin", np.uint8).reshape(-1, S, S)
    for r, img in zip(manifest, images):  # the content box holds the image, the padding is zero
        x0, y0, x1, y1 = (int(r[k]) for k in ("x0", "y0", "x1", "y1"))
        assert (r["height"], r["width"], x1 - x0, y1 - y0) == ("300", "360", S, round(300 * S / 360))
        assert img[y0:y1, x0:x1].std() > 1 and img[:y0].max() == 0 and img[y1:].max() == 0
    # LoVT's statistics: mean of image means, variance = mean of image variances + variance of the means
    train = [img[int(r["y0"]):int(r["y1"])] / 255.0 for r, img in zip(manifest, images) if r["split"] == "train"]
    means, variances = np.array([t.mean() for t in train]), np.array([t.var() for t in train])
    stats = meta["stats"]["train"]
    assert stats["n_images"] == 5 and stats["mean"] == pytest.approx(means.mean(), abs=1e-9)
    assert stats["std"] == pytest.approx(math.sqrt(variances.mean() + means.var()), abs=1e-9)
    assert set(meta["stats"]) == {"train", "validate", "test"}
    studies = [json.loads(line) for line in (cache / "studies.jsonl").read_text().splitlines()]
    assert [s["study_id"] for s in studies] == ["50000001", "51000004", "52000004", "53000005", "54000006", "57000009"]
    assert studies[0]["impression"] == "Right lower lobe opacity concerning for pneumonia."
    assert studies[0]["findings"].startswith("The heart size is normal.  The mediastinal")
    assert (studies[2]["findings"], studies[3]["rows"], studies[4]["rows"]) == ("", [3, 4], [5])


def test_rerun_is_noop_and_size_change_refused(tree, cache, capsys):
    before = {name: (cache / name).read_bytes() for name in CACHE_FILES}
    prepare_mimic(tree[0], cache, reports=tree[1], image_size=S)
    assert "kept 7 images / 6 studies; skipped 2 non-frontal" in capsys.readouterr().out
    assert before == {name: (cache / name).read_bytes() for name in CACHE_FILES}
    with pytest.raises(SystemExit):
        prepare_mimic(tree[0], cache, reports=tree[1], image_size=S + 8)


@pytest.mark.parametrize("crash_in", ["_prepare_chunk", "_save_state"])
def test_resume_is_byte_identical(tree, cache, tmp_path, monkeypatch, crash_in):
    """Kill the run in the 3rd chunk (while decoding, or after its rows and lines were written but before the state
    was saved); the rerun must end with exactly the cache of an uninterrupted run."""
    original, calls = getattr(mp, crash_in), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 + (crash_in == "_save_state"):  # _save_state is also called once at the start
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(mp, crash_in, crashing)
    with pytest.raises(KeyboardInterrupt):
        prepare_mimic(tree[0], tmp_path, reports=tree[1], image_size=S, workers=1, chunk_size=2)
    assert not (tmp_path / "meta.json").exists()
    monkeypatch.setattr(mp, crash_in, original)
    prepare_mimic(tree[0], tmp_path, reports=tree[1], image_size=S, workers=1, chunk_size=2)
    for name in CACHE_FILES:
        assert (tmp_path / name).read_bytes() == (cache / name).read_bytes(), name


def test_workers_plain_csvs_and_reports_in_image_tree(cache, tmp_path):
    root, reports = make_mimic(tmp_path / "plain", gz=False, separate_reports=False)
    prepare_mimic(root, tmp_path / "cache", image_size=S, workers=2, chunk_size=3)
    for name in ("images.bin", "manifest.csv", "studies.jsonl", "meta.json"):
        assert (tmp_path / "cache" / name).read_bytes() == (cache / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- MimicCXR
def test_mimic_dataset_samples(cache):
    ds = MimicCXR(cache, split="train", image_size=48, train=True)
    assert len(ds) == 4 and len(MimicCXR(cache, split="train", one_image_per_study=False)) == 5
    assert len(MimicCXR(cache, split="validate")) == 1 and len(MimicCXR(cache, split="test")) == 1
    sample = ds[0]
    assert sample["study_id"] == "50000001" and sample["image"].shape == (1, S, S)  # the cached square
    assert sample["image"].dtype == torch.float32
    pixels = sample["image"] * ds.std + ds.mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert sample["sentences"] == report_sentences(REPORT_1) and sample["text"] == " ".join(sample["sentences"])
    labels = dict(zip(mp.CHEXPERT_LABELS, sample["labels"].tolist()))
    assert (labels["Lung Opacity"], labels["Pneumonia"], labels["Pneumothorax"]) == (1.0, -1.0, 0.0)
    assert sum(math.isnan(v) for v in labels.values()) == 11
    by_id = {ds.samples[i][0]["study_id"]: i for i in range(len(ds))}
    assert ds[by_id["53000005"]]["sentences"] == ["Mild cardiomegaly.", "Impression: stable.",
                                                  "Mild cardiomegaly, unchanged."]
    assert torch.isnan(ds[by_id["57000009"]]["labels"]).all()  # no CheXpert row: all blank
    ev = MimicCXR(cache, split="test", image_size=48, train=False)[0]
    assert ev["image"].shape == (1, 48, 48) and ev["study_id"] == "52000004"
    assert mp.report_texts(ds) == [ds[i]["text"] for i in range(len(ds))]


def test_mimic_cache_from_before_the_image_size_key_says_how_to_fix_it(cache, tmp_path):
    for name in ("meta.json", "studies.jsonl"):
        (tmp_path / name).write_text((cache / name).read_text().replace('"image_size"', '"size"'))
    with pytest.raises(ValueError, match="rename its key 'size' to 'image_size'"):
        MimicCXR(tmp_path)


def test_mimic_random_view_and_pickling(cache):
    ds = MimicCXR(cache, split="train")
    index = [s[0]["study_id"] for s in ds.samples].index("53000005")
    torch.manual_seed(0)
    means = {round(ds[index]["image"].mean().item(), 4) for _ in range(40)}
    assert len(means) == 2  # both frontal views of the study are drawn (one of them darker)
    assert ds._images is not None and len(pickle.dumps(ds)) < 20_000  # the memmap is not pickled
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=list)
    assert sum(len(batch) for batch in loader) == 4


def test_cli_registration(tree, cache, tmp_path):
    parser = argparse.ArgumentParser()
    mp.add_mimic_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-mimic", "--root", str(tree[0]), "--out", str(tmp_path), "--reports",
                              str(tree[1] / "files"), "--image-size", str(S), "--workers", "1"])
    assert args.func(args)["n_images"] == 7  # --reports may also name the files/ folder itself
    assert (tmp_path / "images.bin").read_bytes() == (cache / "images.bin").read_bytes()

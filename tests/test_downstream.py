"""Downstream readers (data.py) on fixture files written in the datasets' exact formats."""
import re

import numpy as np
import pytest
from PIL import Image

import data as ds
from data import BadRecord, load_record, read_records, rle_decode, rle_encode, split_records, take_fraction


def write_png(path, h, w, value=100, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w), value, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def by_id(records):
    return {r["id"]: r for r in records}


# ---- RLE ------------------------------------------------------------------------------------------------

def test_rle_decode_spec_examples_and_roundtrip():
    assert np.argwhere(rle_decode("5 2 3 1", 4, 4)).tolist() == [[1, 1], [2, 1], [2, 2]]
    m = rle_decode("204900 3 1021 3", 1024, 1024)
    assert m.sum() == 6 and m[100:103, 200:202].all()
    assert not rle_decode("-1", 4, 4).any() and not rle_decode("", 4, 4).any()
    rng = np.random.default_rng(0)
    mask = rng.random((7, 5)) > 0.6
    assert np.array_equal(rle_decode(rle_encode(mask), 7, 5), mask)
    assert rle_encode(np.zeros((3, 3), bool)) == "-1"
    with pytest.raises(BadRecord, match="runs past"):
        rle_decode("10 7", 4, 4)


# ---- RSNA -------------------------------------------------------------------------------------------------

RSNA_CSV = """patientId,x,y,width,height,Target
p-0001,,,,,0
p-0002,4.0,8.0,10.0,20.0,1
p-0002,30.0,8.0,12.0,22.0,1
p-0003,,,,,0
"""


def rsna_root(tmp_path):
    (tmp_path / "stage_2_train_labels.csv").write_text(RSNA_CSV)
    for pid in ("p-0001", "p-0002", "p-0003"):
        write_png(tmp_path / "stage_2_train_images" / f"{pid}.png", 64, 64)
    return tmp_path


def test_rsna_boxes_and_box_masks(tmp_path):
    records, classes = read_records("rsna", str(rsna_root(tmp_path)), task="det")
    r = by_id(records)
    assert classes == ["opacity"] and set(r) == {"p-0001", "p-0002", "p-0003"}
    assert r["p-0001"]["boxes"].shape == (0, 4) and r["p-0001"]["patient"] == "p-0001"
    np.testing.assert_array_equal(r["p-0002"]["boxes"], [[4, 8, 14, 28], [30, 8, 42, 30]])
    assert r["p-0002"]["box_labels"].tolist() == [0, 0]
    out = load_record(r["p-0002"], 32)  # 64 -> 32: everything halves
    assert out["image"].shape == (32, 32) and out["image"].dtype == np.uint8
    np.testing.assert_allclose(out["boxes"], [[2, 4, 7, 14], [15, 4, 21, 15]])
    full = load_record(r["p-0002"], 64)["mask"]
    expect = np.zeros((1, 64, 64), bool)
    expect[0, 8:28, 4:14] = expect[0, 8:30, 30:42] = True  # mask[round(y1):round(y2), round(x1):round(x2)]
    assert np.array_equal(full, expect)
    assert not load_record(r["p-0001"], 32)["mask"].any()


def test_box_outside_image_and_missing_image(tmp_path, capsys):
    root = rsna_root(tmp_path)
    (root / "stage_2_train_labels.csv").write_text(RSNA_CSV + "p-0004,50.0,50.0,20.0,5.0,1\np-0005,,,,,0\n")
    write_png(root / "stage_2_train_images" / "p-0004.png", 64, 64)  # box reaches x = 70 > 64 + 1
    with pytest.raises(BadRecord) as e:  # every bad record at once, in the same words as CsvPairs
        read_records("rsna", str(root))
    lines = str(e.value).splitlines()
    assert lines[0] == f"2 bad records in {root}:" and lines[-1] == ds.SKIP_BAD_HINT
    assert "p-0004.png: box outside" in lines[1] and re.search("p-0005.*missing image", lines[2])
    records, _ = read_records("rsna", str(root), skip_bad=True)
    assert len(records) == 3 and "skipped 2 bad records" in capsys.readouterr().err
    (root / "stage_2_train_labels.csv").write_text(RSNA_CSV + "p-0005,,,,,0\n")
    with pytest.raises(BadRecord, match="p-0005.*missing image"):
        read_records("rsna", str(root))


# ---- SIIM -------------------------------------------------------------------------------------------------

def siim_root(tmp_path, extra=""):
    ids = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    # header with ", " and values with a leading space, as in the real train-rle.csv
    (tmp_path / "train-rle.csv").write_text(
        "ImageId, EncodedPixels\n"
        f"{ids[0]}, -1\n"
        f"{ids[1]}, 7 3 3 3\n"       # rows 1-3 of column 1 (index col*6+row = 7..9), then 3 on: column 2
        f"{ids[1]}, 26 2\n"          # rows 2-3 of column 4
        f"{ids[2]}, -1\n" + extra)
    for i in ids:
        write_png(tmp_path / "dicom-images-train" / f"study{i}" / f"series{i}" / f"{i}.png", 6, 5)
    return tmp_path


def test_siim_rle_or_combined_pixel_by_pixel(tmp_path):
    records, classes = read_records("siim", str(siim_root(tmp_path)))
    r = by_id(records)
    assert classes == ["pneumothorax"] and len(r["1.2.3.2"]["rle"]) == 2
    expect = np.zeros((6, 5), bool)
    expect[1:4, 1] = expect[1:4, 2] = True  # first row
    expect[2:4, 4] = True                   # second row, OR-ed
    assert np.array_equal(rle_decode("7 3 3 3", 6, 5) | rle_decode("26 2", 6, 5), expect)
    out = load_record(r["1.2.3.2"], 6)  # 6 x 5 -> pad one column on the right (centred: left 0, right 1)
    assert np.array_equal(out["mask"][0, :, :5], expect) and not out["mask"][0, :, 5].any()
    assert not load_record(r["1.2.3.1"], 6)["mask"].any()
    with pytest.raises(ValueError, match="masks only"):
        read_records("siim", str(tmp_path), task="det")


def test_siim_rle_past_the_image_names_the_row(tmp_path):
    root = siim_root(tmp_path, extra="1.2.3.3, 28 5\n")  # 28 + 5 > 6 * 5
    with pytest.raises(BadRecord, match=r"train-rle.csv line 6 .*runs past the 6x5 image"):
        read_records("siim", str(root))
    records, _ = read_records("siim", str(root), skip_bad=True)
    assert sorted(by_id(records)) == ["1.2.3.1", "1.2.3.2"]


# ---- Object-CXR -----------------------------------------------------------------------------------------

def test_object_cxr_shapes(tmp_path):
    (tmp_path / "train.csv").write_text("image_name,annotation\n"
                                        "00001.jpg,0 2 2 10 8;1 20 20 40 30\n"
                                        "00002.jpg,\n")
    (tmp_path / "dev.csv").write_text("image_name,annotation\n00003.jpg,2 10 10 30 10 30 30 10 30\n")
    for part, stem in (("train", "00001"), ("train", "00002"), ("dev", "00003")):
        write_png(tmp_path / part / f"{stem}.jpg", 48, 64)
    records, classes = read_records("object-cxr", str(tmp_path), task="det")
    r = by_id(records)
    assert classes == ["foreign object"] and r["00003"]["split"] == "test" and r["00001"]["split"] is None
    np.testing.assert_array_equal(r["00001"]["boxes"], [[2, 2, 10, 8], [20, 20, 40, 30]])  # no w/h swap
    np.testing.assert_array_equal(r["00003"]["boxes"], [[10, 10, 30, 30]])
    assert r["00002"]["boxes"].shape == (0, 4)
    m = load_record(r["00001"], 64)["mask"][0][8:56]  # 48 x 64 image: 8 rows of padding above
    assert m[2:9, 2:11].all()                               # rectangle filled
    assert m[25, 30] and not m[20, 20] and not m[30, 40]    # ellipse: centre in, box corners out
    p = load_record(r["00003"], 64)["mask"][0][8:56]
    assert p[10:31, 10:31].all() and p.sum() == 21 * 21     # polygon (a square) filled, edges included
    with pytest.raises(BadRecord, match="cannot parse"):
        ds._object_cxr_shapes("3 1 2 3 4", "here")


# ---- NIH -------------------------------------------------------------------------------------------------

def test_nih_eight_classes(tmp_path):
    lines = ["Image Index,Finding Label,Bbox [x,y,w,h],,,"]
    for k, label in enumerate(ds.NIH_BOX_CLASSES):  # one image per class, one with two boxes
        lines.append(f"0000000{k}_000.png,{label},{4 + k}.5,6.25,10.0,12.0,,,")
    lines.append("00000001_001.png,Mass,1.0,2.0,3.0,4.0")  # a row without the trailing commas
    lines.append("00000001_001.png,Nodule,20.0,20.0,5.0,5.0,,,")
    (tmp_path / "BBox_List_2017.csv").write_text("\n".join(lines) + "\n")
    for k in range(8):
        write_png(tmp_path / "images_001" / "images" / f"0000000{k}_000.png", 32, 32)
    write_png(tmp_path / "images_002" / "images" / "00000001_001.png", 32, 32)
    records, classes = read_records("nih", str(tmp_path), task="det")
    r = by_id(records)
    assert classes == list(ds.NIH_BOX_CLASSES) and len(classes) == 8 and len(records) == 9
    for k in range(8):
        assert r[f"0000000{k}_000"]["box_labels"].tolist() == [k]
    np.testing.assert_allclose(r["00000003_000"]["boxes"], [[7.5, 6.25, 17.5, 18.25]])
    assert r["00000001_001"]["box_labels"].tolist() == [4, 5] and r["00000001_001"]["patient"] == "00000001"
    mask = load_record(r["00000001_001"], 32)["mask"]
    assert mask.shape == (8, 32, 32) and mask[4].sum() == 12 and mask[5].sum() == 25 and mask.sum() == 37
    # with Data_Entry and test_list.txt, LoVT's "No Finding" negatives of the test list are added
    (tmp_path / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000009_000.png,No Finding,0,9,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000010_000.png,No Finding,0,10,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000011_000.png,Mass,0,11,58,M,PA,2682,2749,0.143,0.143,\n")
    (tmp_path / "test_list.txt").write_text("00000009_000.png\n00000011_000.png\n")
    for k in (9, 10, 11):
        write_png(tmp_path / "images_003" / "images" / f"000000{k:02d}_000.png", 32, 32)
    r = by_id(read_records("nih", str(tmp_path), task="det")[0])
    assert len(r) == 10 and r["00000009_000"]["boxes"].shape == (0, 4)


# ---- COVID rural -----------------------------------------------------------------------------------------

def test_covid_rural(tmp_path):
    root = tmp_path / "covid_rural_annot"
    for pid, date in (("10000001", "01-02-2012"), ("10000001", "03-04-2012"), ("10000002", "01-02-2013")):
        stem = f"COVID-19-AR-{pid}_{date}-XR"
        write_png(root / "jpgs" / f"{stem}.jpg", 20, 16, mode="RGB")  # colour JPG of a grey scan
        mask = np.zeros((20, 16), np.uint8)
        mask[5:10, 3:8] = 1  # values 0/1
        Image.fromarray(mask).save(root / "pngs_masks" / f"{stem}.png") if (root / "pngs_masks").exists() else \
            ((root / "pngs_masks").mkdir(), Image.fromarray(mask).save(root / "pngs_masks" / f"{stem}.png"))
    records, classes = read_records("covid-rural", str(tmp_path))
    assert classes == ["opacity"] and len(records) == 3
    assert sorted(r["patient"] for r in records) == ["COVID-19-AR-10000001"] * 2 + ["COVID-19-AR-10000002"]
    out = load_record(records[0], 20)  # 20 x 16 -> two zero columns left and right
    assert out["mask"].shape == (1, 20, 20) and out["mask"][0, 5:10, 5:10].all() and out["mask"].sum() == 25
    assert out["image"][0, 0] == 0 and abs(int(out["image"][10, 10]) - 100) <= 2
    write_png(root / "jpgs" / "COVID-19-AR-10000003_01-01-2014-XR.jpg", 20, 16, mode="RGB")  # no mask
    with pytest.raises(BadRecord, match="no mask"):
        read_records("covid-rural", str(tmp_path))
    Image.fromarray(np.zeros((10, 16), np.uint8)).save(root / "pngs_masks" / "COVID-19-AR-10000003_01-01-2014-XR.png")
    with pytest.raises(BadRecord, match="mask is 10x16"):
        read_records("covid-rural", str(tmp_path))


# ---- folder ----------------------------------------------------------------------------------------------

def test_folder_masks_and_boxes_csv(tmp_path):
    for stem in ("a", "b"):
        write_png(tmp_path / "images" / f"{stem}.png", 16, 16)
        mask = np.zeros((16, 16), np.uint8)
        mask[2:4, 2:6] = 255
        Image.fromarray(mask).save((tmp_path / "masks").mkdir(exist_ok=True) or tmp_path / "masks" / f"{stem}.png")
    records, classes = read_records("folder", str(tmp_path))
    assert classes == ["mask"] and len(records) == 2 and load_record(records[0], 16)["mask"].sum() == 8
    with pytest.raises(ValueError, match="boxes CSV"):
        read_records("folder", str(tmp_path), task="det")
    (tmp_path / "boxes.csv").write_text("image,x,y,w,h,label\na.png,1,2,3,4,nodule\na.png,5,5,2,2,mass\n"
                                        "b.png,,,,,\n")
    records, classes = read_records("folder", str(tmp_path / "boxes.csv"), task="det")
    r = by_id(records)
    assert classes == ["mass", "nodule"] and r["a"]["box_labels"].tolist() == [1, 0]
    np.testing.assert_array_equal(r["a"]["boxes"], [[1, 2, 4, 6], [5, 5, 7, 7]])
    assert r["b"]["boxes"].shape == (0, 4)
    assert load_record(r["a"], 16)["mask"].shape == (2, 16, 16)  # seg from boxes: one channel per class


# ---- synthetic, splits, fractions ------------------------------------------------------------------------

def test_synthetic_records_and_fixed_splits():
    records, classes = read_records("synthetic", None, task="det", num_samples=10)
    assert len(classes) == 5 and len(records) == 10
    splits = split_records(records, seed=3)
    assert [len(splits[s]) for s in ("train", "validate", "test")] == [6, 2, 2]
    out = load_record(splits["test"][0], 64)
    assert out["image"].shape == (64, 64) and out["mask"].shape == (5, 64, 64)


def make_records(n_patients, per_patient=3):
    return [dict(id=f"p{p}-{i}", patient=f"p{p}", boxes=np.zeros((0, 4), np.float32))
            for p in range(n_patients) for i in range(per_patient)]


def test_split_by_patient_keeps_patients_together():
    records = make_records(20)
    splits = split_records(records, seed=1)
    owner = {}
    for s, recs in splits.items():
        for r in recs:
            assert owner.setdefault(r["patient"], s) == s
    assert sum(map(len, splits.values())) == 60 and [len(splits[s]) for s in ds.SPLITS] == [36, 12, 12]
    assert split_records(records, seed=1) == splits and split_records(records, seed=2) != splits
    # records with a fixed split keep it; the others fill the remaining splits by their ratios
    fixed = make_records(4, 1) + [dict(r, split="test") for r in make_records(2, 1)]
    s = split_records(fixed, seed=0)
    assert len(s["test"]) == 2 and len(s["train"]) == 3 and len(s["validate"]) == 1


def test_split_csv_lovt_folder_and_id_split_csv(tmp_path, capsys):
    records = make_records(2, 2)  # p0-0 p0-1 p1-0 p1-1
    folder = tmp_path / "lovt"
    folder.mkdir()
    (folder / "train.csv").write_text("ID,boxes,classes\np1-1,,\np0-0,1;2;3;4,1\n")
    (folder / "validation.csv").write_text("ID,boxes,classes\np0-1,,\n")
    (folder / "test.csv").write_text("ID,boxes,classes\nunknown,,\n")
    s = split_records(records, split_csv=str(folder / "train.csv"))
    assert [r["id"] for r in s["train"]] == ["p1-1", "p0-0"]  # file order (LoVT's "first rows" fractions)
    assert [r["id"] for r in s["validate"]] == ["p0-1"] and s["test"] == []
    assert "1 ids" in capsys.readouterr().err
    (tmp_path / "split.csv").write_text("image,split\np0-0.png,train\np0-1,val\np1-0,test\np1-1,validation\n")
    s = split_records(records, split_csv=str(tmp_path / "split.csv"))
    assert [len(s[k]) for k in ds.SPLITS] == [1, 2, 1]
    (tmp_path / "bad.csv").write_text("image,part\np0-0,train\n")
    with pytest.raises(ValueError, match="split column"):
        split_records(records, split_csv=str(tmp_path / "bad.csv"))


def test_take_fraction():
    records = make_records(100, 1)
    assert take_fraction(records, 0.1, seed=None) == records[:10]  # LoVT: the first rows
    sub = take_fraction(records, 0.1, seed=0)
    assert len(sub) == 10 and sub != records[:10] and sub == take_fraction(records, 0.1, seed=0)
    assert take_fraction(records, 1.0) == records
    with pytest.raises(ValueError, match="leaves none"):
        take_fraction(records, 0.001)


def test_pad_resize_centres_the_image():
    image = np.full((4, 8), 200, np.uint8)
    mask = np.ones((1, 4, 8), bool)
    img, m, boxes = ds.pad_resize(image, mask, np.array([[0, 0, 8, 4]], np.float32), 8)
    assert (img[:2] == 0).all() and (img[2:6] == 200).all() and (img[6:] == 0).all()
    assert m[0, 2:6].all() and m.sum() == 32
    np.testing.assert_array_equal(boxes, [[0, 2, 8, 6]])


def test_dicom_needs_pydicom(tmp_path, monkeypatch):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 200)
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install pydicom"):
        ds.read_image(str(path))

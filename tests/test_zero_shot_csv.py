"""--zero-shot-csv: every method scores zero-shot on a labelled image set other than its training data (a CSV of
images and CheXpert labels, data.LabelledImages) with its own score, untrained vs trained (LRCLR: per stage, with
paired differences), into eval.json; a bad file stops the run at its start, before any training."""
import csv
import json
import math
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import common
import data
import joimternet
import lovt
import lrclr
import place
import reclf

METHODS = {"lovt": lovt, "joimternet": joimternet, "lrclr": lrclr, "reclf": reclf, "place": place}
# The demo preset at toy size, one optimizer step (LRCLR: one per stage, base, control and LRCLR).
TOY = ["--train-samples", "16", "--eval-samples", "8", "--batch-size", "8", "--image-size", "64", "--workers", "0",
       "--viz", "0", "--max-steps", "1"]
OWN = {"lovt": [], "reclf": [], "place": ["--epochs", "1"],
       "joimternet": ["--epochs", "1", "--cls-train-samples", "8", "--eval-batch-size", "8"],
       "lrclr": ["--ft-batch-size", "8", "--ft-max-steps", "1", "--n-boot", "50"]}
# The fixture's labels, row by row (cycled): Cardiomegaly and Pleural Effusion have both outcomes (blank and -1 cells
# among them), Edema is negative everywhere (no AUC), No Finding is never scored.
LABELS = {"No Finding": ["0", "0", "1", "0"], "Cardiomegaly": ["1", "0", "", "1.0"],
          "Pleural Effusion": ["0", "1", "-1", "1"], "Edema": ["0", "0", "0", ""]}
COUNTED = ["cardiomegaly", "pleural effusion"]


def write_labelled_images(folder, n=12, image_col="image", rows_extra=()):
    """A labelled image CSV as the CheXpert sets are: no reports, films of several sizes and both orientations as
    8-bit PNG, 16-bit PNG and JPEG, paths relative to the CSV's folder, CheXpert label columns (LABELS).
    rows_extra: (row index, {column: value}) overrides, to plant a bad row."""
    rng = np.random.default_rng(1)
    os.makedirs(folder / "films", exist_ok=True)
    rows = []
    for i in range(n):
        (h, w), kind = [((300, 220), "png8"), ((180, 260), "png16"), ((257, 333), "jpeg")][i % 3]
        pixels = np.clip(90 + 60 * np.mgrid[0:h, 0:w][1] / w + rng.normal(0, 10, (h, w)), 0, 255)
        name = f"films/{i}.{'jpg' if kind == 'jpeg' else 'png'}"
        image = Image.fromarray((pixels * 256).astype(np.uint16)) if kind == "png16" else \
            Image.fromarray(pixels.astype(np.uint8))
        image.save(folder / name)
        rows.append({image_col: name, **{c: v[i % len(v)] for c, v in LABELS.items()}})
    for i, values in rows_extra:
        rows[i].update(values)
    path = folder / "external.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    return write_labelled_images(tmp_path_factory.mktemp("external"))


# ---------------------------------------------------------------------------------------------- the dataset
def test_labelled_images_reads_files_of_any_size_with_the_training_statistics(tmp_path):
    path = write_labelled_images(tmp_path, image_col="Path", rows_extra=[(0, {"Frontal/Lateral": "Lateral"})])
    ds = data.LabelledImages(path, 64, mean=0.4, std=0.2)
    assert len(ds) == 11  # CheXpert's Path column; the lateral view is left out
    samples = [ds[i] for i in range(len(ds))]
    assert {s["image"].shape for s in samples} == {(1, 64, 64)}
    # the zero padding beside a portrait film reads as the training statistics make it, (0 - mean) / std
    assert samples[2]["image"][0, 32, 0].item() == pytest.approx(-0.4 / 0.2)
    labels = torch.stack([s["labels"] for s in samples])  # rows 1..11 of LABELS' cycle
    c = data.CHEXPERT_LABELS.index
    assert labels[0, c("Cardiomegaly")] == 0 and labels[2, c("Cardiomegaly")] == 1  # "1.0"
    assert math.isnan(labels[1, c("Cardiomegaly")]) and labels[1, c("Pleural Effusion")] == -1
    assert math.isnan(labels[0, c("Lung Opacity")])  # a finding without a column: unknown


def test_labelled_images_stops_on_a_bad_file_naming_it(tmp_path):
    path = write_labelled_images(tmp_path / "bad", rows_extra=[(1, {"image": "films/gone.png"}),
                                                                (3, {"Cardiomegaly": "yes"})])
    with pytest.raises(data.BadRecord) as e:
        data.LabelledImages(path, 64, 0.5, 0.25)
    message = str(e.value)
    assert "2 bad records" in message and f"{path} row 3: image file not found" in message
    assert f"{path} row 5: label 'Cardiomegaly' is not a number: 'yes'" in message
    assert len(data.LabelledImages(path, 64, 0.5, 0.25, skip_bad=True)) == 10
    with pytest.raises(data.BadRecord, match="missing.csv: cannot be read as a CSV file"):
        data.LabelledImages(str(tmp_path / "missing.csv"), 64, 0.5, 0.25)
    (tmp_path / "reports.csv").write_text("image,report\nfilms/0.png,No effusion.\n")
    with pytest.raises(data.BadRecord, match="reports.csv: needs an image column .* and label columns"):
        data.LabelledImages(str(tmp_path / "reports.csv"), 64, 0.5, 0.25)
    one_outcome = write_labelled_images(tmp_path / "negative", n=3, rows_extra=[(0, {"Cardiomegaly": "0"}),
                                                                            (1, {"Pleural Effusion": "0"})])
    with pytest.raises(data.BadRecord, match="no finding has both positive"):  # No Finding (0, 0, 1) is not scored
        data.LabelledImages(one_outcome, 64, 0.5, 0.25)


# ---------------------------------------------------------------------------------------------- the shared function
class GlobalModel(torch.nn.Module):
    """The global interface of every method (encode_image, encode_text) in a few weights."""

    def __init__(self, vocabulary):
        super().__init__()
        self.image, self.words = torch.nn.Linear(16, 8), torch.nn.Embedding(vocabulary, 8)

    def encode_image(self, images):
        return torch.nn.functional.normalize(self.image(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)))

    def encode_text(self, batch):
        mask = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((self.words(batch["input_ids"]) * mask).sum(1) / mask.sum(1))


def global_and_twice(model, images, prompts):
    """A method's score with two kinds (as LRCLR's and RECLF's): the global cosine, and twice it."""
    cosine = common.global_zero_shot_scores(model, images, prompts)["global"]
    return {"global": cosine, "twice": 2 * cosine}


def test_external_zero_shot_is_the_auc_of_the_margins_computed_by_hand(external):
    torch.manual_seed(0)
    names, phrases = data.zero_shot_findings(False)
    prompts = phrases + [f"no {p}" for p in phrases]
    tokenizer = data.build_tokenizer(prompts)
    model = GlobalModel(len(tokenizer))
    ds = data.LabelledImages(external, 64, 0.5, 0.25)
    result = common.external_zero_shot(dict(toy=model), ds, tokenizer, torch.device("cpu"), n_boot=200, batch_size=5)
    two_kinds = common.external_zero_shot(dict(toy=model), ds, tokenizer, torch.device("cpu"), global_and_twice,
                                          n_boot=200)
    with torch.no_grad():  # by hand: one image at a time, every prompt
        s = torch.cat([model.encode_image(ds[i]["image"][None]) for i in range(len(ds))]).double() @ \
            model.encode_text(data.prompt_batch(prompts, tokenizer)).double().T
    labels = torch.stack([ds[i]["labels"][1:] for i in range(len(ds))]).double().numpy()
    margin = (s[:, :len(names)] - s[:, len(names):]).numpy()
    assert result["names"] == COUNTED and list(result["ci"]["toy"]) == COUNTED + ["mean"]  # edema: negatives only
    aucs = []
    for name in COUNTED:
        c = names.index(name)
        auc = common.roc_auc(margin[:, c], labels[:, c])
        assert result["ci"]["toy"][name][0] == pytest.approx(auc, abs=1e-6)
        low, high = common.bootstrap_ci(common.roc_auc, margin[:, c], labels[:, c], n=200)
        assert result["ci"]["toy"][name][1:] == pytest.approx((low, high), abs=1e-6) and low <= auc <= high
        aucs.append(auc)
    assert result["ci"]["toy"]["mean"][0] == pytest.approx(np.mean(aucs), abs=1e-6)
    assert set(two_kinds["ci"]) == {"toy global", "toy twice"}  # a model scored two ways: a column per score
    table = lambda ci: np.array(list(ci.values()))  # noqa: E731
    np.testing.assert_allclose(table(two_kinds["ci"]["toy global"]), table(result["ci"]["toy"]))  # batch 64 or 5
    np.testing.assert_allclose(table(two_kinds["ci"]["toy twice"]), table(result["ci"]["toy"]))  # a monotone score


# ---------------------------------------------------------------------------------------------- every method
def zero_shot_entry(method, out):
    """eval.json's "zero_shot_csv" of the run's last folder (LRCLR: lrclr/), and that of LRCLR's base/."""
    folder = os.path.join(out, "lrclr") if method == "lrclr" else out
    with open(os.path.join(folder, "eval.json")) as f:
        results = json.load(f)
    assert "trained" in results  # the held-out evaluation is still there
    return results["zero_shot_csv"]


COLUMNS = {"lovt": {"untrained", "trained"}, "joimternet": {"untrained", "trained"}, "place": {"untrained", "trained"},
           "reclf": {f"{m} {k}" for m in ("untrained", "trained") for k in ("global", "local", "both")},
           "lrclr": {"base", "control", "LRCLR global", "LRCLR local", "LRCLR global+local"}}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_scores_the_external_set_untrained_vs_trained(method, external, tmp_path):
    out = str(tmp_path / "run")
    METHODS[method].main(["--preset", "demo", *TOY, *OWN[method], "--out-dir", out, "--zero-shot-csv", external])
    entry = zero_shot_entry(method, out)
    assert entry["csv"] == os.path.abspath(external) and entry["images"] == 12
    assert set(entry["zero_shot_ci"]) == COLUMNS[method]
    for column, ci in entry["zero_shot_ci"].items():
        assert list(ci) == COUNTED + ["mean"], column
        for auc, low, high in ci.values():
            assert all(map(math.isfinite, (auc, low, high))) and low <= auc <= high, (column, ci)
    if method == "lrclr":  # paired differences, LRCLR's base stage too
        assert set(entry["paired_delta"]) == {"LRCLR global+local - base", "LRCLR local - base",
                                              "LRCLR global+local - control", "control - base"}
        with open(os.path.join(out, "base", "eval.json")) as f:
            assert set(json.load(f)["zero_shot_csv"]["zero_shot_ci"]) == {"untrained", "base"}


@pytest.mark.parametrize("problem", ["bad rows", "no file"])
@pytest.mark.parametrize("method", METHODS)
def test_a_bad_external_csv_stops_the_run_before_training(method, problem, tmp_path):
    path = (write_labelled_images(tmp_path / "bad", rows_extra=[(0, {"image": "films/gone.png"}),
                                                                (1, {"Edema": "n/a"})])
            if problem == "bad rows" else str(tmp_path / "chexpert_val.csv"))
    out = tmp_path / "run"
    with pytest.raises(data.BadRecord, match=re.escape(path)):
        METHODS[method].main(["--preset", "demo", *TOY, *OWN[method], "--out-dir", str(out), "--zero-shot-csv", path])
    assert not list(out.rglob("ckpt.pt")) and not list(out.rglob("metrics.csv"))  # stopped before any step


def test_a_failing_external_evaluation_keeps_the_run(external, tmp_path, monkeypatch):
    """The external set is scored inside the end-of-run guard: a failure there is one message, the run is saved."""
    def broken(*args, **kwargs):
        raise ValueError("an image the encoder cannot take")
    monkeypatch.setattr(common, "external_zero_shot", broken)
    with pytest.raises(SystemExit, match="Evaluation failed after training: ValueError: an image the encoder"):
        lovt.main(["--preset", "demo", *TOY, "--out-dir", str(tmp_path), "--zero-shot-csv", external])
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "image_encoder.pt").exists()

"""The paths a user takes after the demo, end to end for every method (CPU, toy sizes):

- `torchrun --nproc_per_node=2 <method>.py` on the default job (gloo), through the final evaluation;
- `--data csv` on real-world-like files (sizes and aspect ratios, 8- and 16-bit PNG, JPEG, RGB; report words the
  training vocabulary lacks; no split column; with and without CheXpert label columns, blanks included);
- a run killed with SIGKILL and continued with --resume logs exactly the losses of a run never stopped (which
  also shows that two processes running the same command log the same losses).
`--data mimic` on the fixture's prepare-mimic cache and the paper presets (one step, offline) run in
test_commands.py, as the documented commands `<method>.py --preset paper --data mimic --data-root CACHE`.
"""
import csv
import os
import signal
import subprocess
import sys
import time

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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"lovt": lovt, "joimternet": joimternet, "lrclr": lrclr, "reclf": reclf, "place": place}
# The demo preset at toy size: 32 training pairs in batches of 8, 64 px, one pass (JoImTeRNet and PLACE train
# several in their demos), LRCLR's fine-tuning stages two steps each.
TOY = ["--train-samples", "32", "--eval-samples", "16", "--batch-size", "8", "--image-size", "64", "--viz", "1",
       "--workers", "0"]
OWN = {"lovt": [], "reclf": [], "place": ["--epochs", "1"],
       "joimternet": ["--epochs", "1", "--cls-train-samples", "16", "--eval-batch-size", "8"],
       "lrclr": ["--ft-batch-size", "8", "--ft-max-steps", "2", "--n-boot", "50"]}


def toy(method):
    return TOY + OWN[method]


def final_folder(method, out):
    """Where the run's eval.json and exports are: LRCLR's default job ends in its lrclr/ sub-run."""
    return os.path.join(out, "lrclr") if method == "lrclr" else out


def env(threads):
    return dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def check_run(method, out):
    folder = final_folder(method, out)
    for name in ("eval.json", "image_encoder.pt", "ckpt.pt", "text_encoder/config.json"):
        assert os.path.exists(os.path.join(folder, name)), f"{method}: no {name} in {folder}"
    encoder, meta = common.load_image_encoder(os.path.join(folder, "image_encoder.pt"))
    assert meta["method"] == method and meta["image_size"] == 64


# ---------------------------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("method", METHODS)
def test_torchrun_two_processes_default_job_through_evaluation(method, tmp_path):
    """What `torchrun --nproc_per_node=2 <method>.py` does, at toy size: both ranks train (gloo), rank 0 evaluates
    with no collective, and every process exits 0."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           f"{method}.py", *toy(method), "--out-dir", out]
    result = subprocess.run(cmd, cwd=REPO, env=env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check_run(method, out)
    assert "run folder" in result.stdout


# ---------------------------------------------------------------------------------------------- --data csv
def write_pairs(folder, labels, n=40):
    """Real-world-like image-report pairs: portrait and landscape films of several sizes, 8- and 16-bit PNG, JPEG and
    RGB PNG; reports share their findings sentences, and each has a word no other report has (so the test reports'
    are outside the training vocabulary); no split column. labels: two CheXpert columns, blank cells included."""
    rng = np.random.default_rng(0)
    os.makedirs(folder / "img", exist_ok=True)
    findings = ["Heart size is normal. Lungs are clear.", "Small left pleural effusion. No pneumothorax.",
                "Right lower lobe opacity concerning for pneumonia.", "Mild cardiomegaly. No focal consolidation."]
    rows = []
    for i in range(n):
        (h, w), kind = [((410, 300), "png8"), ((700, 1024), "png16"), ((333, 257), "jpeg"), ((500, 380), "rgb")][i % 4]
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.clip(60 + 100 * x / w + 40 * np.sin(y / 9.0) + rng.normal(0, 8, (h, w)), 0, 255)
        name = f"img/{i}.{'jpg' if kind == 'jpeg' else 'png'}"
        image = {"png16": lambda: Image.fromarray((pixels * 256).astype(np.uint16)),
                 "rgb": lambda: Image.fromarray(np.stack([pixels.astype(np.uint8)] * 3, -1))}.get(
            kind, lambda: Image.fromarray(pixels.astype(np.uint8)))()
        image.save(folder / name)
        row = dict(image=name, report=f"{findings[i % 4]} Incidental note {'qxz' + chr(97 + i % 26) * (1 + i // 26)}.")
        if labels:
            row.update({"Cardiomegaly": ["1", "0", "", "1.0"][i % 4], "Pleural Effusion": ["0", "1", "-1", ""][i % 4]})
        rows.append(row)
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {labels: write_pairs(root / ("labelled" if labels else "plain"), labels) for labels in (True, False)}


def test_pairs_fixture_is_what_real_files_are(pairs):
    modes = {Image.open(os.path.join(os.path.dirname(pairs[True]), f"img/{i}.{e}")).mode
             for i, e in ((0, "png"), (1, "png"), (2, "jpg"), (3, "png"))}
    assert modes == {"L", "I;16", "RGB"}
    train = data.make_dataset("csv", pairs[True], "train", 64, train=True)
    test = data.make_dataset("csv", pairs[True], "test", 64, train=False)
    assert train[0]["image"].shape == (1, 73, 73) and test[0]["image"].shape == (1, 64, 64)  # 8/7 of 64 to train
    vocabulary = data.report_tokenizer("tiny", train).get_vocab()
    assert "cardiomegaly" in vocabulary and "edema" in vocabulary  # prompt words, though no report says "edema"
    unseen = {w for t in data.report_texts(test) for w in t.lower().rstrip(".").split() if w.startswith("qxz")}
    assert unseen and not unseen & set(vocabulary)  # the test reports have words the vocabulary lacks


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("method", METHODS)
def test_csv_pairs_train_and_evaluate(method, labels, pairs, tmp_path):
    out = str(tmp_path / "run")
    METHODS[method].main(["--preset", "demo", "--data", "csv", "--data-root", pairs[labels], *toy(method),
                          "--train-samples", "0", "--eval-samples", "0", "--out-dir", out])
    check_run(method, out)


# ---------------------------------------------------------------------------------------------- kill -9, --resume
def logged_losses(out):
    """{sub-run: [(step, epoch, lr, loss/... columns)]} of every metrics.csv under out (perf columns differ)."""
    found = {}
    for root, _, files in sorted(os.walk(out)):
        if "metrics.csv" in files:
            with open(os.path.join(root, "metrics.csv"), newline="") as f:
                found[os.path.relpath(root, out)] = [{k: v for k, v in row.items() if not k.startswith("perf/")}
                                                     for row in csv.DictReader(f)]
    return found


@pytest.mark.parametrize("method", METHODS)
def test_killed_run_resumes_to_the_same_losses(method, tmp_path):
    """The demo preset for two epochs of 4 steps, a checkpoint every 3 steps and a metrics row every 2 (so a
    checkpoint falls between two rows): a run killed with SIGKILL once it has a checkpoint and 3 rows and continued
    with --resume logs exactly what a run never stopped logs. The run that is killed runs in a process of its own;
    the other two in the test's (two processes, the same bits). LRCLR: its default job, base then lrclr, killed
    during the base."""
    flags = [*toy(method), "--epochs", "2", "--ckpt-every", "3", "--log-every", "2", "--viz", "0", "--eval-samples",
             "8", *(["--no-control"] if method == "lrclr" else [])]
    cmd = [sys.executable, f"{method}.py", *flags]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert torch.get_num_threads() == 2  # as the runs below (OMP_NUM_THREADS=2): the same kernels, the same bits
    METHODS[method].main(flags + ["--out-dir", straight])
    run = subprocess.Popen(cmd + ["--out-dir", killed], cwd=REPO, env=env(2), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    first_checkpoint = os.path.join(killed, "base" if method == "lrclr" else "", "ckpt.pt")
    while run.poll() is None and not (os.path.exists(first_checkpoint)
                                      and sum(map(len, logged_losses(killed).values())) >= 3):
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    METHODS[method].main(flags + ["--out-dir", killed, "--resume"])
    want = logged_losses(straight)
    assert sum(map(len, want.values())) > 4
    assert logged_losses(killed) == want

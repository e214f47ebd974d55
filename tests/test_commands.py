"""Every command printed in README.md's code blocks and in the five method docstrings runs as written.

Each line is read from the text and expanded (`a | b` alternatives, `base|lrclr`, optional `[...]` groups); its
placeholders (CACHE, pairs.csv, runs/<method>-XXXX, RUN, SIIM, ...) become fixture files, and toy-size flags are
appended: fewer pairs, one step, 64 px, one thread of work, offline stand-ins for the downloads (`--image-weights
none`, `--text-model tiny`) where the line does not name its own. A torchrun line first checks that its --accum suits
its number of processes, then runs in this process (test_paths.py runs the 2-process path itself).
"""
import ast
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

import common
import data
import eval_det
import eval_seg
import joimternet
import lovt
import lrclr
import place
import reclf
from test_mimic import make_mimic
from test_paths import write_pairs
from test_zero_shot_csv import write_labelled_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"lovt": lovt, "joimternet": joimternet, "lrclr": lrclr, "reclf": reclf, "place": place}
SCRIPTS = {**{f"{m}.py": m for m in METHODS}, "eval_seg.py": "eval_seg", "eval_det.py": "eval_det",
           "data.py": "data"}
TOY = ["--train-samples", "16", "--eval-samples", "6", "--batch-size", "4", "--image-size", "64", "--workers", "0",
       "--viz", "0", "--max-steps", "1"]
OWN = {"lovt": [], "reclf": [], "place": ["--epochs", "1"],
       "joimternet": ["--epochs", "1", "--cls-train-samples", "8", "--eval-batch-size", "4"],
       "lrclr": ["--ft-batch-size", "4", "--ft-max-steps", "1", "--n-boot", "20"]}
OFFLINE = {"--image-weights": "none", "--text-model": "tiny"}  # the paper presets' downloads, where a line has none


def expand(line):
    """One printed line -> the commands it stands for."""
    line = re.sub(r"\s+#.*$", "", line).strip()
    if ";" in line:
        return [c for part in line.split(";") for c in expand(part)]
    if "[" in line:  # optional groups: the line without any, and with all of them
        return expand(re.sub(r"\s*\[[^\]]*\]", "", line)) + expand(re.sub(r"\[([^\]]*)\]", r"\1", line))
    if " | " in line:
        first, *others = line.split(" | ")
        tokens = first.split()
        cut = next(i for i, t in enumerate(tokens) if t.startswith("--"))
        base = " ".join(tokens[:cut])
        return [c for alt in [" ".join(tokens[cut:]), *others] if alt.strip() != "..." for c in expand(f"{base} {alt}")]
    tokens = line.split()
    for i, t in enumerate(tokens):
        if "|" in t:
            return [c for alt in t.split("|") for c in expand(" ".join(tokens[:i] + [alt] + tokens[i + 1:]))]
    return [line]


def documented_commands():
    """(where, command) for every python / torchrun line of the README's code blocks and the method docstrings."""
    sources = [("README.md", block) for block in re.findall(r"```(?:bash|sh)?\n(.*?)```",
                                                             open(os.path.join(REPO, "README.md")).read(), re.S)]
    for m in METHODS:
        sources.append((f"{m}.py", ast.get_docstring(ast.parse(open(os.path.join(REPO, f"{m}.py")).read()))))
    found = {}
    for where, text in sources:
        for line in text.replace("\\\n", " ").splitlines():
            if line.strip().startswith(("python ", "torchrun ")):
                for command in expand(line):  # printed twice, or with another cache's name: run once
                    found.setdefault(re.sub(r"cache/mimic\d+", "CACHE", " ".join(command.split())), where)
    return [(where, c) for c, where in found.items() if not c.startswith("python -m pytest")]


COMMANDS = documented_commands()


def test_every_method_has_its_commands_read():
    scripts = {shlex.split(c)[2 if c.startswith("torchrun") else 1] for _, c in COMMANDS}
    assert scripts == set(SCRIPTS)
    assert not [c for _, c in COMMANDS if "..." in c or "|" in c or "[" in c]
    assert sum(c.startswith("torchrun") for _, c in COMMANDS) >= 7


# ---------------------------------------------------------------------------------------------- the fixtures
def write_siim(root, n=20):
    """SIIM-ACR's layout: train-rle.csv (relative, column-major RLE; -1 = empty) and one PNG per image id."""
    lines = ["ImageId, EncodedPixels"]
    for i in range(n):
        image_id = f"1.2.276.{i}"
        folder = root / "dicom-images-train" / f"study{i}" / f"series{i}"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((80, 80), 60 + 7 * i, np.uint8)).save(folder / f"{image_id}.png")
        lines.append(f"{image_id}, {'-1' if i % 2 else f'{80 * (10 + i) + 20} 15'}")
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return root


def write_rsna(root, n=20):
    """RSNA Pneumonia's layout (stage_2_train_labels.csv, one PNG per patient) and LoVT's split folder (ID columns)."""
    rows, ids = ["patientId,x,y,width,height,Target"], [f"p-{i:04d}" for i in range(n)]
    (root / "stage_2_train_images").mkdir(parents=True)
    for i, pid in enumerate(ids):
        Image.fromarray(np.full((80, 80), 50 + 6 * i, np.uint8)).save(root / "stage_2_train_images" / f"{pid}.png")
        rows.append(f"{pid},,,,,0" if i % 2 else f"{pid},{10 + i},{12},{20},{30},1")
    (root / "stage_2_train_labels.csv").write_text("\n".join(rows) + "\n")
    split = root / "lovt-split"
    split.mkdir()
    for name, part in (("train", ids[:12]), ("validation", ids[12:16]), ("test", ids[16:])):
        (split / f"{name}.csv").write_text("ID,boxes,classes\n" + "".join(f"{pid},,\n" for pid in part))
    return root, split


def toy_flags(script, argv):
    """What is appended to a documented command so that it runs here in seconds."""
    if script == "data":
        return ["--image-size", "64", "--workers", "1"]
    if script in ("eval_seg", "eval_det"):
        return ["--image-size", "64", "--epochs", "1", "--seeds", "1", "--batch-size", "8", "--synthetic-samples", "12"]
    flags = TOY + OWN[script] + (["--bench", "1"] if "--bench" in argv else [])
    if "--preset" in argv and script != "joimternet":  # the paper presets download their encoders
        flags += [x for k, v in OFFLINE.items() if k not in argv for x in (k, v)]
        if script == "place" and "--text-model" not in argv:
            flags += ["--text-width", "96"]  # the tiny BERT as wide as 12 decoder heads can split
    return flags


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """The files the placeholders stand for, and a toy demo run of every method (what runs/<method>-XXXX are)."""
    root = tmp_path_factory.mktemp("commands")
    tree, reports = make_mimic(root / "mimic")
    cache = root / "cache"
    data.prepare_mimic(tree, cache, reports=reports, image_size=72, workers=1)
    rsna, rsna_split = write_rsna(root / "rsna")
    out = {"CACHE": cache, "pairs.csv": write_pairs(root / "csv", True),
           "physionet.org/files/mimic-cxr-jpg/2.0.0": tree, "physionet.org/files/mimic-cxr/2.0.0": reports,
           "MIMIC_JPG": tree, "SIIM": write_siim(root / "siim"), "RSNA": rsna,
           "lovt/datasets/RSNA-Pneunomia-Detection": rsna_split,
           "chexpert_val.csv": write_labelled_images(root / "chexpert")}  # --zero-shot-csv: images and labels
    for m, module in METHODS.items():
        module.main(["--preset", "demo", *TOY, *OWN[m], "--out-dir", str(root / "runs" / m)])
        out[f"runs/{m}-XXXX"] = root / "runs" / m
    lrclr_run = root / "runs" / "lrclr"
    out.update({"runs/lrclr-base-XXXX": lrclr_run / "base", "RUN": lrclr_run / "base", "BASE": lrclr_run / "base",
                "CONTROL": lrclr_run / "control", "runs/lrclr-XXXX": lrclr_run / "lrclr"})
    return {k: str(v) for k, v in out.items()}


def substitute(tokens, places, fresh):
    """Placeholders -> fixture paths (a prepare-mimic --out: a fresh folder)."""
    out = []
    for i, token in enumerate(tokens):
        if i and tokens[i - 1] == "--out":  # prepare-mimic writes a new cache
            out.append(fresh)
            continue
        for key in sorted(places, key=len, reverse=True):
            if token == key or token.startswith(key + "/"):
                token = places[key] + token[len(key):]
                break
        out.append(token)
    return out


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c}" for w, c in COMMANDS])
def test_documented_command_runs(where, command, places, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run folders (runs/<method>-<time>) land here
    tokens = shlex.split(command)
    nproc = 1
    if tokens[0] == "torchrun":
        nproc = int(next(t for t in tokens if t.startswith("--nproc_per_node")).split("=")[1])
        tokens = ["python", *tokens[2:]]
    script = SCRIPTS[tokens[1]]
    argv = substitute(tokens[2:], places, str(tmp_path / "cache"))
    if script in METHODS and not argv:  # `python <method>.py`: the demo, which the fixture ran at toy size
        assert os.path.exists(os.path.join(places[f"runs/{script}-XXXX"], "eval.json"))  # LRCLR's: its lrclr/
    elif script in METHODS:
        module = METHODS[script]
        args = common.parse_args(module.Args, module.PRESETS, argv, default_preset="demo")
        if hasattr(args, "accum"):  # stops with a message where the processes cannot share the accumulation
            common.micro_batches_per_step(args.accum, nproc, args.batch_size)
        module.main(argv + toy_flags(script, argv))
    else:
        {"eval_seg": eval_seg, "eval_det": eval_det, "data": data}[script].main(argv + toy_flags(script, argv))

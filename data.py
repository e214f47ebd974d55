"""Data for cxr-vlp: image-report datasets, batch augmentation, tokenization, downstream readers and the data CLI.

Every dataset yields the same sample dict (see DESIGN.md):
    image     float32 1 x H x W, normalized ((pixel/255 - mean) / std)
    sentences list[str] (findings then impression);  text = " ".join(sentences)
    labels    float32 (14,) in CHEXPERT_LABELS order: 1 pos / 0 neg / -1 uncertain / nan unknown
    study_id  str;  synthetic samples also carry masks, boxes and box_labels

train=False returns the evaluation view (centred square, resized to image_size). train=True returns the
un-augmented full square view at the dataset's native size; the training loop applies BatchAugment on its
device, which crops, jitters, blurs and resizes to image_size in one batched pass.

Sections, in file order:
  1. Text, image and CSV utilities  split_sentences, load_grayscale, square_resize, to_image_tensor, pixel_stats,
                                    one CSV reader; BadRecord and the report that lists every bad record at once
  2. Synthetic chest X-rays         SyntheticCXR (offline, with masks and boxes): anatomy, one draw_<finding> per
                                    finding, exposure, the report and its labels
  3. MIMIC-CXR                      the MIT-LCP section parser, the prepare-mimic cache (resumable, validated),
                                    MimicCXR
  4. CSV pairs                      CsvPairs (image path + report: IU X-ray, CheXpert Plus, own data; every row
                                    checked up front); LabelledImages (image path + CheXpert labels: the
                                    external zero-shot set); make_dataset, the entry point the methods call;
                                    check_data_root; report_texts
  5. Augmentation and batching      BatchAugment (on the training device), collate, build_tokenizer,
                                    report_tokenizer
  6. Downstream readers             read_records, load_record, split_records, take_fraction: RSNA, SIIM, COVID
                                    rural, Object-CXR, NIH, a folder, synthetic (for eval_seg.py, eval_det.py)
  7. CLI                            python data.py demo --out DIR     synthetic reports, a PNG grid with mask outlines
                                    python data.py prepare-mimic ...  the MIMIC-CXR cache
Throughput benchmarks (generator, BatchAugment, collate, prepare-mimic, the CSV check): python tests/bench_data.py
"""
import argparse
import bisect
import csv
import gzip
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import zlib
from collections import Counter, namedtuple
from dataclasses import dataclass
from functools import lru_cache, partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")
SYNTH_FINDINGS = ("opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly")
SYNTH_PROMPTS = dict(opacity="airspace opacity", nodule="pulmonary nodule", effusion="pleural effusion",
                     pneumothorax="pneumothorax", cardiomegaly="cardiomegaly")  # the reports' wording: zero-shot prompts
SPLITS = ("train", "validate", "test")
_SPLIT_NAMES = {"train": "train", "validation": "validate", "validate": "validate", "val": "validate",
                "valid": "validate", "test": "test"}  # the spellings split files use -> SPLITS


# ==== 1. Text, image and CSV utilities; bad-record reports ==========================================================
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "prof", "approx", "vs", "e.g", "i.e", "etc", "fig", "cf", "ca",
                  "resp", "incl", "esp", "al", "pt", "hx", "dx", "a.m", "p.m", "st"}
# A sentence ends at . ! ? followed by whitespace; the checks in split_sentences veto false ends.
_SENTENCE_END = re.compile(r"[.!?]+(?=\s)")
_NUMBERED_ITEM = re.compile(r"(?:^|(?<=\s))(\d{1,2})[.)]\s+(?=\S)")


def split_sentences(text):
    """Split report text into sentences without dependencies (LoVT uses Stanza: a documented deviation).

    Handles abbreviations ("Dr.", "approx.", "vs.", "e.g.", "i.e."), decimals ("2.5 cm": no space after the
    point), numbered lists ("1. ... 2. ..." start new sentences and the markers are dropped), MIMIC's "___"
    placeholders (kept as words; "___." still ends a sentence) and newlines (a blank line ends a sentence,
    a single line break is a wrap). Pieces are stripped; pieces without a letter or digit (empty, bare
    punctuation, a lone "___") are dropped.
    """
    out = []
    for paragraph in re.split(r"\n\s*\n", text.replace("\r", "")):
        paragraph = " ".join(paragraph.split())
        # Numbered items become separate chunks: "1. Foo. 2. Bar." -> ["Foo.", "Bar."].
        for chunk in _NUMBERED_ITEM.split(" " + paragraph)[::2]:
            start = 0
            for m in _SENTENCE_END.finditer(chunk):
                word = chunk[start:m.start()].rsplit(" ", 1)[-1].lower()
                if m.group() == "." and (word in _ABBREVIATIONS or re.fullmatch(r"[a-z]", word)):
                    continue  # "Dr. Smith", "e.g. foo", initials "J. Doe"
                out.append(chunk[start:m.end()])
                start = m.end()
            out.append(chunk[start:])
    return [s.strip() for s in out if re.search(r"[A-Za-z0-9]", s)]  # drops bare "___" and punctuation


def clean_report(sentences):
    """GLoRIA's and MGCA's report cleaning (create_path_2_sent_mapping in gloria/datasets/pretraining_dataset.py and
    mgca/datasets/pretrain_dataset.py), on a report's sentences joined: split at "<digits>." and at every ".", keep
    each piece's lower-cased \\w+ tokens (ASCII only; punctuation goes), drop pieces of at most one token.
    -> sentences, each its tokens joined by spaces."""
    text = " ".join(sentences).replace("\n", " ").replace("\ufffd\ufffd", " ")
    out = []
    for point in re.split(r"[0-9]+\.", text):
        for piece in point.split("."):
            tokens = re.findall(r"\w+", piece.lower())
            ascii_tokens = [t.encode("ascii", "ignore").decode("ascii") for t in tokens]
            if len(tokens) > 1 and any(ascii_tokens):
                out.append(" ".join(t for t in ascii_tokens if t))
    return out


def _swap_left_right(sentence):
    """'left' <-> 'right' (whole words, capitalisation kept), for horizontal flips."""
    def swap(m):
        word = {"left": "right", "right": "left"}[m.group().lower()]
        return word.capitalize() if m.group()[0].isupper() else word
    return re.sub(r"\b(?:[Ll]eft|[Rr]ight)\b", swap, sentence)


def train_native_size(image_size):
    """Size of the un-augmented training view: 8/7 of the output (256 for 224), so BatchAugment can crop."""
    return int(round(image_size * 8 / 7))


def load_grayscale(path, min_size=None):
    """Open an image as an 8-bit grayscale PIL image. JPEGs are decoded at a reduced DCT scale (1/2, 1/4,
    1/8) when `min_size` allows it (about 2x faster on full-size films); 16-bit images are rescaled by
    their maximum rather than clipped."""
    img = Image.open(path)
    if img.format == "JPEG" and min_size is not None:
        img.draft("L", (min_size, min_size))  # never decodes below min_size on the short side
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        img = Image.fromarray((arr * (255.0 / max(float(arr.max()), 1.0))).astype(np.uint8))
    return img.convert("L")


def square_resize(img, image_size):
    """Resize the longer side to `image_size` (area averaging when shrinking) and zero-pad centred to a square.
    Same result as pad-then-resize up to rounding, but cheaper on full-size films. Returns uint8 S x S."""
    w, h = img.size
    s = image_size / max(w, h)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    img = img.resize((nw, nh), Image.BOX if s < 1 else Image.BICUBIC)
    out = np.zeros((image_size, image_size), np.uint8)
    top, left = (image_size - nh) // 2, (image_size - nw) // 2
    out[top:top + nh, left:left + nw] = np.asarray(img)
    return out


def to_image_tensor(pixels, mean, std):
    """uint8 H x W -> normalized float32 tensor 1 x H x W."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().div_(255.0)
    return x.sub_(mean).div_(std).unsqueeze(0)


def pixel_stats(images):
    """LoVT's scalar statistics in [0,1] units: mean of per-image means, variance = mean of per-image
    variances + variance of the means (exact pooled variance for equal-sized images). images: a sequence or
    array of uint8 H x W images, read in chunks (a float64 copy of RSNA at 224 px would be 6 GB)."""
    means, variances = [], []
    for i in range(0, len(images), 256):
        x = np.stack([np.asarray(a, np.float64) for a in images[i:i + 256]])
        x = x.reshape(len(x), -1) / 255.0
        means.append(x.mean(1))
        variances.append(x.var(1))
    means, variances = np.concatenate(means), np.concatenate(variances)
    return float(means.mean()), float(math.sqrt(variances.mean() + means.var()))


def _csv_table(path):
    """A CSV or .csv.gz read by column name -> (header, [(row number, {column: value})]). Names and values are
    stripped of spaces (SIIM writes "ImageId, EncodedPixels"), cells missing at a row's end read as "", blank lines
    are skipped, and rows are numbered as a spreadsheet shows them (the header is row 1) for error messages. Ids
    stay strings (leading zeros matter)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        return header, [(line, dict(zip(header, [v.strip() for v in row] + [""] * (len(header) - len(row)))))
                        for line, row in enumerate(reader, start=2) if row]


def _csv_rows(path):
    """_csv_table's rows alone."""
    return _csv_table(path)[1]


class BadRecord(ValueError):
    """A row or file that cannot be used; the message names the file (and row)."""


SKIP_BAD_HINT = "(--skip-bad skips such records and counts them)"


class _BadRecords:
    """Collects the bad records of one reading pass and reports them all at once, instead of stopping at the
    first one (a user would fix one row per run) or failing deep inside training: finish() raises ONE BadRecord
    listing the first `max_listed` problems (each names its file and row) and the total, ending with
    SKIP_BAD_HINT; with skip_bad=True it prints how many were skipped instead. CsvPairs and the downstream
    readers (eval_seg/eval_det --skip-bad) share it, so both say the same thing."""

    def __init__(self, source, skip_bad, max_listed=20):
        self.source, self.skip_bad, self.max_listed, self.problems = source, skip_bad, max_listed, []

    def __call__(self, fn, *args):
        """fn(*args); a BadRecord it raises is recorded and None returned."""
        try:
            return fn(*args)
        except BadRecord as e:
            self.problems.append(str(e))
            return None

    def add(self, problem):
        self.problems.append(problem)

    def finish(self):
        n = len(self.problems)
        records = f"{n} bad record{'s' if n != 1 else ''}"
        if n and self.skip_bad:
            print(f"{self.source}: skipped {records} (skip_bad=True); first: {self.problems[0]}", file=sys.stderr)
        elif n:
            listed = "".join(f"\n  {p}" for p in self.problems[:self.max_listed])
            more = f"\n  ... and {n - self.max_listed} more" if n > self.max_listed else ""
            raise BadRecord(f"{records} in {self.source}:{listed}{more}\n{SKIP_BAD_HINT}")


# ==== 2. Synthetic chest X-rays with reports, labels, masks and boxes ===============================================
_SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}  # separates the splits' random streams
_DEFAULT_NUM_SAMPLES = {"train": 4000, "validate": 500, "test": 500}
_CM_PER_UNIT = 17.0  # the canonical frame spans 2 units = a 34 cm wide film; used for nodule sizes in cm

# Phrasings. {side} = "right"/"left", {zone} e.g. "lower lobe", {size} a severity word, {noun} the opacity word.
_ZONES = {"upper": ("upper lobe", "upper zone", "apex"), "middle": ("mid lung", "mid lung zone"),
          "lower": ("lower lobe", "lung base", "lower zone")}
_POSITIVE = {
    "opacity": ("There is {a} {noun} in the {side} {zone}.", "{A} {noun} is seen in the {side} {zone}.",
                "Patchy {noun} in the {side} {zone}.", "New {noun} in the {side} {zone}."),
    "nodule": ("There is a {cm} cm nodule in the {side} {zone}.", "A {cm} cm pulmonary nodule is seen in the "
               "{side} {zone}.", "Well-circumscribed {cm} cm nodule in the {side} {zone}."),
    "effusion": ("There is a {size} {side} pleural effusion.", "{Size} {side} pleural effusion.",
                 "{Size} {side}-sided pleural effusion is present."),
    "pneumothorax": ("There is a {size} {side} {apical}pneumothorax.", "{Size} {side} {apical}pneumothorax.",
                     "A {size} {side}-sided {apical}pneumothorax is seen."),
    "cardiomegaly": ("The heart is {adverb} enlarged.", "{Size} cardiomegaly.", "There is {size} cardiomegaly.",
                     "The cardiac silhouette is {adverb} enlarged."),
}
_IMPRESSION = {
    "opacity": ("{Side} {zone} {noun}.", "{A} {noun} in the {side} {zone}."),
    "nodule": ("{cm} cm {side} {zone} nodule.", "{Side} {zone} nodule, measuring {cm} cm."),
    "effusion": ("{Size} {side} pleural effusion.", "{Side} pleural effusion."),
    "pneumothorax": ("{Size} {side} {apical}pneumothorax.", "{Side} {apical}pneumothorax."),
    "cardiomegaly": ("{Size} cardiomegaly.", "Cardiomegaly."),
}
_NEGATIVE = {
    "opacity": ("No focal consolidation.", "There is no focal consolidation.", "No focal airspace opacity."),
    "nodule": ("No pulmonary nodules are identified.", "No suspicious nodules.", "There is no nodule."),
    "effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusion is seen."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."),
    "cardiomegaly": ("The heart size is normal.", "Heart size is within normal limits.",
                     "The cardiac silhouette is normal in size.", "Normal heart size."),
}
_NEGATIVE_PLEURA = ("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax.",
                    "No pneumothorax or pleural effusion is seen.")
_FILLERS = ("The mediastinal and hilar contours are unremarkable.", "Mediastinal contours are normal.",
            "No acute osseous abnormality.", "The visualized osseous structures are unremarkable.")
_NORMAL_IMPRESSION = ("No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "No acute intrathoracic process.")
_N_FINDINGS_CDF = (1 / 3, 2 / 3, 8 / 9)
_SIZE_WORDS = {"effusion": ("small", "moderate", "large"), "pneumothorax": ("small", "moderate", "large"),
               "cardiomegaly": ("mild", "moderate", "severe")}
_OPACITY_NOUNS = ("opacity", "airspace opacity", "consolidation", "airspace consolidation")

# Geometry in the canonical frame (u to the image right, v down; the film spans [-1, 1]^2).
_LUNGS = ((-0.40, 0.30, 0.40), (0.43, 0.29, 0.45))  # (centre u, half-width, dome height v) per lung
_ZONE_V = {"upper": (-0.55, -0.3), "middle": (-0.12, 0.05), "lower": (0.17, 0.27)}  # lesion centre v per zone
_EDGE_SLOPE = 0.25  # ramp slope per canonical unit and pixel of image side: edges ~2 px wide at any size
_HALF_STRENGTH = 0.5  # a soft shape's mask is where it reaches half strength
_INSIDE_LUNG = 0.25  # hard masks stop inside the lung's soft edge, so small findings at 64 px keep a mask
_SKELETON_RANGE = 1.4  # canonical coordinates reachable under the per-image jitter: |u|, |v| < 1.31

_Grids = namedtuple("_Grids", "x y textures ridges noise skeleton ribs")
_GRID_CACHE = {}


def _grids(image_size, n_textures=24):
    """Per-size constants: pixel-centre coordinates x, y in [-1, 1], banks of smooth random textures and thin
    "vessel" ridges (fixed seed), a noise field twice the image size that images take random windows of, and
    the skeleton. Rendering an image then costs only vectorised arithmetic."""
    if image_size not in _GRID_CACHE:
        c = ((np.arange(image_size, dtype=np.float32) + 0.5) / image_size) * 2 - 1
        y, x = np.meshgrid(c, c, indexing="ij")  # H x W each; x grows to the right, y downwards
        rng = np.random.default_rng(12345)

        def smooth_noise(octaves):
            out = np.zeros((n_textures, image_size, image_size), np.float32)
            for cells, amplitude in octaves:
                # Bilinear up-sampling matrix (size x cells+1): texture = M @ G @ M.T with G random.
                pos = (np.arange(image_size) + 0.5) / image_size * cells
                m = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(cells + 1)[None])).astype(np.float32)
                g = rng.standard_normal((n_textures, cells + 1, cells + 1)).astype(np.float32)
                out += amplitude * np.einsum("ij,njk,lk->nil", m, g, m, optimize=True)  # M @ G @ M.T
            return out / out.std(axis=(1, 2), keepdims=True)

        textures = np.clip(smooth_noise(((4, 1.0), (8, 0.6), (16, 0.35), (32, 0.2))), -2, 2)
        # Lung markings: thin ridges where a finer noise crosses zero look like branching vessels.
        ridges = np.maximum(0, 1 - 4 * np.abs(smooth_noise(((6, 1.0), (12, 0.7), (24, 0.3))))).astype(np.float32)
        noise = rng.standard_normal((2 * image_size, 2 * image_size)).astype(np.float32)
        _GRID_CACHE[image_size] = _Grids(x, y, textures, ridges, noise, *_skeleton(image_size))
    return _GRID_CACHE[image_size]


def _skeleton(image_size):
    """Fixed anatomy in the canonical frame, sampled every half pixel over [-1.4, 1.4]^2: body (soft tissue
    widening towards the shoulders, brighter towards the abdomen), mediastinum and spine, ribs (arcs) and
    clavicles. Returns (density, ribs): rendering looks both up at each pixel's (u, v) (nearest neighbour),
    which costs a few operations instead of some sixty."""
    k = int(2 * _SKELETON_RANGE * image_size) + 1
    c = (np.arange(k, dtype=np.float32) / image_size - _SKELETON_RANGE).astype(np.float32)
    v, u = np.meshgrid(c, c, indexing="ij")
    au, edge = np.abs(u), 0.25 * image_size
    body = (0.30 + 0.12 * v) * _ramp(0.93 - 0.07 * v - au, 6.0) + 0.04
    mediastinum = _ramp(0.11 - au, edge)
    phase = 4.0 * (v - 0.55 * au * au)  # 4 rib arcs per canonical unit; a triangle wave is a cheap cosine
    ribs = _ramp(0.2 - np.abs(phase - np.rint(phase)), 8.0) * _ramp(0.8 - au, 8) * _ramp(0.55 - v, 8)
    clavicles = _ramp(0.035 - np.abs(v + 0.66 - 0.3 * au * au), edge) * _ramp(0.7 - au, 8) * _ramp(au - 0.06, 8)
    density = body + 0.07 * mediastinum + 0.03 * ribs + 0.12 * clavicles
    return density.astype(np.float32).ravel(), ribs.astype(np.float32).ravel()


def _ramp(d, k):
    """Soft inside-ness: 0 where d <= 0, 1 where d >= 1/k, linear between (anti-aliased edges)."""
    return np.clip(d * k, 0.0, 1.0)


@dataclass
class _Film:
    """One film being drawn. Arrays are float32 H x W over the pixels; anatomy fills them in, in the order the
    random stream expects (pose, lungs, heart), then each finding edits `lucent` and `dense`."""
    u: np.ndarray                # canonical coordinates of every pixel centre (u to the image right, v down)
    v: np.ndarray
    edge: float                  # ramp slope per canonical unit: edges ~2 px wide at any image size
    scale: float                 # image half-widths per canonical unit (for nodule sizes in cm)
    body: np.ndarray = None      # body, mediastinum, ribs and clavicles, looked up in the skeleton
    ribs: np.ndarray = None      # the ribs alone: they show more over the lungs
    lungs: list = None           # two soft lung masks, index 0 = image left = patient's right
    radii: list = None           # per lung (du, r2): normalized horizontal offset and squared elliptic radius
    lung: np.ndarray = None      # lungs[0] + lungs[1]
    markings: np.ndarray = None  # vessel-like lung markings
    texture: np.ndarray = None   # a smooth random texture that makes opacities irregular
    heart: np.ndarray = None     # soft heart mask
    grade: int = 0               # cardiomegaly grade 0-2, drawn for every film
    lucent: np.ndarray = None    # lung darkness, subtracted from the body
    dense: np.ndarray = None     # densities added to the body


def draw_anatomy(rng, image_size, enlarged_heart, lung_darkness=0.25, marking_density=0.08, rib_contrast=0.05):
    """Pose, body, lungs and heart of one film -> the _Film the findings then edit. lung_darkness: lucency of
    air-filled lung; marking_density: how much the markings show against it; rib_contrast: extra rib
    brightness over the lungs."""
    grids = _grids(image_size)
    film = _place_film(rng, grids, image_size)
    offset = _SKELETON_RANGE * image_size + 0.5  # + 0.5: round to the nearest skeleton sample
    width = int(2 * _SKELETON_RANGE * image_size) + 1  # the skeleton's side, as in _skeleton
    at = (film.v * image_size + offset).astype(np.intp) * width + (film.u * image_size + offset).astype(np.intp)
    film.body = grids.skeleton.take(at)
    draw_lungs(rng, film, grids)
    draw_heart(rng, film, enlarged_heart)
    # Findings edit the lucency (lung darkness) and add densities. Ribs show more over the lungs.
    film.lucent = (film.lung * (1 - film.heart)) * lung_darkness - marking_density * film.markings
    film.dense = rib_contrast * grids.ribs.take(at) * film.lung
    return film


def _place_film(rng, grids, image_size, rotation=0.08, scale_range=(0.88, 1.0), shift=0.06):
    """Pixel -> canonical frame by a random similarity: (u, v) = R(angle) ((x, y) - shift) / scale. rotation: max
    |angle| in radians; scale_range: the range of scale; shift: max |offset| of the frame centre along x and y."""
    angle, scale = rng.uniform(-rotation, rotation), rng.uniform(*scale_range)
    ca, sa = math.cos(angle) / scale, math.sin(angle) / scale
    sx, sy = rng.uniform(-shift, shift, 2).tolist()  # python floats keep the maths in float32
    u = ca * (grids.x - sx) - sa * (grids.y - sy)
    v = sa * (grids.x - sx) + ca * (grids.y - sy)
    return _Film(u=u, v=v, edge=_EDGE_SLOPE * image_size * scale, scale=scale)


def draw_lungs(rng, film, grids, centre_v=-0.08, half_height=0.7, dome_jitter=0.03, dome_curve=0.12, fade=0.7):
    """Lungs (index 0 = image left = patient right, _LUNGS): an ellipse cut at the bottom by a diaphragm dome
    that is highest mid-lung and lowest at the lateral costophrenic angle; the right dome sits higher. Then the
    lung markings, fading towards the periphery, and the texture for opacities. centre_v, half_height: both
    ellipses' centre and vertical half-axis; dome_jitter: max |shift| of each dome; dome_curve: how far the dome
    drops per du^2; fade: how much the markings fade from the hilum to the lung edge."""
    film.lungs, film.radii = [], []
    for uc, a, dome in _LUNGS:
        du, dv = (film.u - uc) * (1 / a), (film.v - centre_v) * (1 / half_height)
        r2 = du * du + dv * dv
        # The ellipse's ramp is 0.5 * a * edge per unit of r2, i.e. `edge` per canonical unit at its side.
        lung = _ramp(1 - r2, 0.5 * a * film.edge) * _ramp(
            dome + rng.uniform(-dome_jitter, dome_jitter) + dome_curve * du * du - film.v, film.edge)
        film.lungs.append(lung)
        film.radii.append((du, r2))
    film.lung = film.lungs[0] + film.lungs[1]
    markings_index, texture_index = rng.permutation(len(grids.textures))[:2].tolist()
    film.texture = grids.textures[texture_index]
    periphery = film.radii[0][1] * film.lungs[0] + film.radii[1][1] * film.lungs[1]
    film.markings = grids.ridges[markings_index] * film.lung * (1 - fade * periphery)


def draw_heart(rng, film, enlarged, centre=(0.08, 0.22), centre_jitter=0.03, half_width=(0.27, 0.32),
               enlarged_width=(0.42, 0.05, 0.04), half_height=(0.2, 0.23), enlarged_height=1.15):
    """Heart: a soft-tissue ellipse right of centre (patient's left) over the medial lung bases; it hides the
    lung behind it. Cardiomegaly widens it (cardiothoracic ratio ~0.45 -> 0.6-0.75). centre (u, v) with
    centre_jitter along u; half_width: range when normal; enlarged_width (base, per grade, random extra):
    half-width when enlarged; half_height: its range, times enlarged_height when enlarged."""
    film.grade = int(rng.integers(3))
    base, per_grade, extra = enlarged_width
    ha = base + per_grade * film.grade + rng.uniform(0, extra) if enlarged else rng.uniform(*half_width)
    hb = rng.uniform(*half_height) * (enlarged_height if enlarged else 1.0)
    hu, hv = centre[0] + rng.uniform(-centre_jitter, centre_jitter), centre[1]
    film.heart = _ramp(1 - ((film.u - hu) * (1 / ha)) ** 2 - ((film.v - hv) * (1 / hb)) ** 2, 0.5 * ha * film.edge)


def _place_in_zone(rng, finding, centre_jitter=0.1):
    """A lung zone and a lesion centre (u, v) in it, on the finding's side; centre_jitter: max |u| off the lung's
    centre line."""
    finding["zone"] = tuple(_ZONE_V)[rng.integers(3)]
    lo, hi = _ZONE_V[finding["zone"]]
    return _LUNGS[finding["side"]][0] + rng.uniform(-centre_jitter, centre_jitter), rng.uniform(lo, hi)


def draw_opacity(rng, film, finding, radius=(0.11, 0.18), irregularity=0.4, softness=4.0, density=0.22,
                 mottling=0.2):
    """Irregular textured patch in one lung zone -> its mask. radius: range of the patch radius; irregularity: how
    far the texture pushes the outline in and out; softness: ramp slope of the outline; density: brightness
    added; mottling: the texture's share of that brightness."""
    cu, cv = _place_in_zone(rng, finding)
    finding["noun"] = _OPACITY_NOUNS[int(rng.random() * len(_OPACITY_NOUNS))]
    rad = rng.uniform(*radius)
    patch = _ramp(1 - ((film.u - cu) ** 2 + (film.v - cv) ** 2) * (1 / rad ** 2) - irregularity * film.texture,
                  softness)
    patch *= film.lungs[finding["side"]]
    film.dense += density * patch * (1 - mottling + mottling * film.texture)
    return patch > _HALF_STRENGTH


def draw_nodule(rng, film, finding, radius=(0.035, 0.06), density=0.26, softness=3.0):
    """Small bright disc in one lung zone, its diameter reported in cm -> its mask. radius: range of the disc
    radius; density: brightness added at its centre; softness: ramp slope of its edge (in units of r^2)."""
    cu, cv = _place_in_zone(rng, finding)
    rad = rng.uniform(*radius)
    finding["cm"] = round(2 * rad * film.scale * _CM_PER_UNIT, 1)
    d2 = (film.u - cu) ** 2 + (film.v - cv) ** 2
    film.dense += density * _ramp(1 - d2 * (1 / rad ** 2), softness)
    return d2 < rad ** 2


def draw_effusion(rng, film, finding, levels=(0.24, 0.1, -0.08), level_jitter=0.03, meniscus_depth=0.06,
                  meniscus_rise=0.2, density=0.05):
    """Fluid at a lung base with a meniscus that blunts the costophrenic angle -> its mask. levels: fluid level v
    for a small, moderate, large effusion; level_jitter: max |shift| of it; meniscus_depth: how far the medial
    surface lies below the level; meniscus_rise: how far it climbs the lateral chest wall; density: brightness of
    the fluid (it also removes the lung's lucency)."""
    finding["size"] = int(rng.integers(3))
    level = levels[finding["size"]] + rng.uniform(-level_jitter, level_jitter)
    du, _ = film.radii[finding["side"]]
    lateral = np.clip(du * (1 if finding["side"] else -1), 0, 1)  # 0 medial half .. 1 lateral edge
    below = film.v - level - meniscus_depth + meniscus_rise * lateral * lateral
    lung = film.lungs[finding["side"]]
    fluid = _ramp(below, film.edge) * lung
    film.lucent *= 1 - fluid
    film.dense += density * fluid
    return (below > 0) & (lung > _INSIDE_LUNG)


def draw_pneumothorax(rng, film, finding, widths=((0.2, 0.26), (0.3, 0.38), (0.45, 0.55)), lowest=(-0.2, 0.05, 0.2),
                      erase_markings=0.09, darkening=0.06, line_density=0.15):
    """Peripheral lucent band without lung markings, with the visceral pleural line at its inner edge -> its
    mask. widths: range of the band width (in units of the elliptic radius) for a small, moderate, large one;
    lowest: the v it reaches down to (small ones are apical only); erase_markings: removes the markings
    (draw_anatomy's marking_density plus a little); darkening: extra lucency; line_density: the line's brightness."""
    finding["size"] = int(rng.integers(3))
    t = [rng.uniform(lo, hi) for lo, hi in widths][finding["size"]]  # all three drawn: the stream stays aligned
    cut = lowest[finding["size"]]
    _, r2 = film.radii[finding["side"]]
    r, a, lung = np.sqrt(r2), _LUNGS[finding["side"]][1], film.lungs[finding["side"]]
    band = _ramp(r - (1 - t), a * film.edge) * _ramp(cut - film.v, film.edge) * lung
    # The visceral pleural line at the band's inner edge, ~2 px wide.
    line = _ramp(1 - np.abs(r - (1 - t)) * (a * film.edge), 1.0) * _ramp(cut - film.v, film.edge) * lung
    film.lucent += band * (erase_markings * film.markings + darkening)
    film.dense += line_density * line
    return (r > 1 - t) & (film.v < cut) & (lung > _INSIDE_LUNG)


def draw_cardiomegaly(rng, film, finding):
    """The enlarged heart itself is drawn with the anatomy (draw_heart); here its grade becomes the finding's size
    and the heart its mask."""
    finding["size"] = int(film.grade)
    return film.heart > _HALF_STRENGTH


DRAW_FINDING = {"opacity": draw_opacity, "nodule": draw_nodule, "effusion": draw_effusion,
                "pneumothorax": draw_pneumothorax, "cardiomegaly": draw_cardiomegaly}


def expose(rng, film, image_size, grey=0.35, contrast=(0.8, 1.2), brightness=0.06, noise=0.015):
    """Exposure jitter (contrast about `grey`, brightness up to +-brightness), quantum noise of std `noise`, then
    8 bits -> uint8 H x W."""
    img = film.body + film.dense - film.lucent
    img = (img - grey) * rng.uniform(*contrast) + grey + rng.uniform(-brightness, brightness)
    oy, ox = rng.integers(image_size, size=2)
    img += noise * _grids(image_size).noise[oy:oy + image_size, ox:ox + image_size]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _mask_boxes(masks, present):
    """Tight boxes (x1, y1, x2, y2 in pixels, float32 N x 4) and their finding indices (int64 N) of the present
    findings' masks, in SYNTH_FINDINGS order."""
    boxes, box_labels = [], []
    for t in present:
        rows, cols = np.flatnonzero(masks[t].any(1)), np.flatnonzero(masks[t].any(0))
        if len(rows):
            boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            box_labels.append(t)
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(box_labels, np.int64)


# The synthetic datasets by name: the findings' contrast (SyntheticCXR.finding_contrast)
SYNTHETIC_CONTRAST = {"synthetic": 1.0, "synthetic-faint": 0.4}


class SyntheticCXR(Dataset):
    """Built-in synthetic frontal chest films with MIMIC-style reports, CheXpert labels, masks and boxes.

    Image convention: as radiographs are displayed, the patient's RIGHT is on the image's LEFT. A finding
    drawn in the image's left half is reported as "right", in the right half as "left". The heart sits
    right of the image centre (patient's left).

    Anatomy is drawn in a canonical frame (u, v) in [-1, 1]^2 (u to the image right, v down) that is mapped to
    the pixels by a random similarity transform (position, scale, rotation), then brightness and contrast are
    jittered and noise is added. Findings (SYNTH_FINDINGS, at most one of each, 0-3 per image, a third of the
    images normal) are drawn in the same frame, so masks follow the anatomy:
      opacity       irregular textured patch in one lung zone      -> Lung Opacity (+ Consolidation if the
                                                                      report says "consolidation", else nan)
      nodule        small bright disc, size reported in cm         -> Lung Lesion
      effusion      fluid at a lung base with a meniscus that blunts the costophrenic angle -> Pleural Effusion
      pneumothorax  peripheral lucent band without lung markings and a pleural line  -> Pneumothorax
      cardiomegaly  enlarged heart (mask = heart)                   -> Cardiomegaly, Enlarged Cardiomediastinum
    Normal images are labelled No Finding; labels of findings never modelled (Edema, Pneumonia, Atelectasis,
    Pleural Other, Fracture, Support Devices) are nan. The report states side, zone and size of each finding
    (visible only in the image) and negations for a random subset of the absent ones.

    Everything is a deterministic function of (seed, split, index); splits draw from disjoint random streams.
    Native size = image_size for train and eval (images are square). hflip > 0 (train only) flips the image,
    masks and boxes and swaps "left"/"right" in the report with probability hflip, drawn from torch's RNG.
    LoVT flips with p = 0.5 although its reports say left/right; the suite's default is off.
    Normalization: mean/std below were measured once on 500 train images at 128 px (they move < 0.01 with
    the size and split).
    finding_contrast scales what every finding adds to or takes from the film (1 = as drawn; the dataset name
    "synthetic-faint" uses SYNTHETIC_CONTRAST's 0.4): the same scenes, masks, boxes and reports with fainter
    findings, a harder setting in which localisation matters more. The enlarged heart is anatomy and stays.
    """
    mean, std = 0.2398, 0.1526

    def __init__(self, split="train", num_samples=None, image_size=128, seed=0, train=False, hflip=0.0,
                 finding_contrast=1.0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {list(_SPLIT_IDS)}, got {split!r}")
        if image_size < 64:
            raise ValueError(f"image_size must be >= 64, got {image_size}")
        self.split, self.image_size, self.seed, self.train, self.hflip = split, image_size, seed, train, hflip
        self.finding_contrast = finding_contrast
        self.num_samples = _DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples

    def __len__(self):
        return self.num_samples

    def render(self, index):
        """The sample as numpy arrays: pixels uint8 H x W, masks bool T x H x W, boxes float32 N x 4
        (x1, y1, x2, y2 in pixels; one per finding, T order), box_labels int64 N, sentences list[str],
        labels float32 (14,), and findings: {name: drawn parameters (side 0 = patient's right, zone, size
        index, cm, noun)} for inspection. The random draws happen in a fixed order (which findings, anatomy,
        each finding, exposure, report): that order is part of the dataset."""
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        n = bisect.bisect(_N_FINDINGS_CDF, rng.random())  # 0, 1, 2, 3 findings with p 1/3, 1/3, 2/9, 1/9
        present = sorted(rng.permutation(len(SYNTH_FINDINGS))[:n].tolist())
        findings = {SYNTH_FINDINGS[t]: {} for t in present}
        film = draw_anatomy(rng, self.image_size, enlarged_heart="cardiomegaly" in findings)
        masks = np.zeros((len(SYNTH_FINDINGS), self.image_size, self.image_size), bool)
        faint = self.finding_contrast != 1.0  # fainter findings: same scene, masks and report (no random draw)
        if faint:
            normal_dense, normal_lucent = film.dense.copy(), film.lucent.copy()
        for name, finding in findings.items():
            finding["side"] = int(rng.integers(2))
            masks[SYNTH_FINDINGS.index(name)] = DRAW_FINDING[name](rng, film, finding)
        if faint:
            film.dense = normal_dense + self.finding_contrast * (film.dense - normal_dense)
            film.lucent = normal_lucent + self.finding_contrast * (film.lucent - normal_lucent)
        pixels = expose(rng, film, self.image_size)
        boxes, box_labels = _mask_boxes(masks, present)
        return dict(pixels=pixels, masks=masks, boxes=boxes, box_labels=box_labels,
                    sentences=self._report(rng, findings), labels=self._labels(findings), findings=findings)

    @staticmethod
    def _report(rng, findings):
        pick = lambda options: options[int(rng.random() * len(options))]  # noqa: E731
        positive, impression = [], []
        for name, f in findings.items():
            noun = f.get("noun", "")
            side = ("right", "left")[f.get("side", 0)]  # patient's right = image left (index 0)
            size = _SIZE_WORDS[name][f["size"]] if "size" in f else ""
            words = dict(side=side, Side=side.capitalize(), noun=noun, size=size, Size=size.capitalize(),
                         adverb=size + "ly", zone=pick(_ZONES[f["zone"]]) if "zone" in f else "", cm=f.get("cm", ""),
                         apical="apical " if name == "pneumothorax" and f["size"] == 0 else "",
                         a="an" if noun[:1] in "aeiou" else "a", A="An" if noun[:1] in "aeiou" else "A")
            positive.append(pick(_POSITIVE[name]).format(**words))
            impression.append(pick(_IMPRESSION[name]).format(**words))
        absent = [name for name in SYNTH_FINDINGS if name not in findings]
        negative = []
        if "effusion" in absent and "pneumothorax" in absent and rng.random() < 0.5:
            negative.append(pick(_NEGATIVE_PLEURA))
            absent = [a for a in absent if a not in ("effusion", "pneumothorax")]
        negative += [pick(_NEGATIVE[a]) for a in absent if rng.random() < 0.75]
        if not findings and not negative:
            negative.append(pick(_NEGATIVE[absent[0]]))
        fillers = [_FILLERS[i] for i in rng.permutation(len(_FILLERS))[:int(rng.integers(3))]]
        body = positive + negative + fillers
        body = [body[i] for i in rng.permutation(len(body))]
        impression = [impression[i] for i in rng.permutation(len(impression))] or [pick(_NORMAL_IMPRESSION)]
        return body + impression

    @staticmethod
    def _labels(findings):
        labels = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
        col = {name: i for i, name in enumerate(CHEXPERT_LABELS)}
        for finding, label in (("opacity", "Lung Opacity"), ("nodule", "Lung Lesion"), ("effusion", "Pleural Effusion"),
                               ("pneumothorax", "Pneumothorax"), ("cardiomegaly", "Cardiomegaly"),
                               ("cardiomegaly", "Enlarged Cardiomediastinum"), ("opacity", "Consolidation")):
            labels[col[label]] = float(finding in findings)
        if "opacity" in findings and "consolidation" not in findings["opacity"]["noun"]:
            labels[col["Consolidation"]] = np.nan  # "opacity" does not say whether it is consolidation
        labels[col["No Finding"]] = float(not findings)
        return labels

    def report(self, index):
        """The report's sentences (the generator draws them with the image, so this renders)."""
        return self.render(index)["sentences"]

    def __getitem__(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        r = self.render(index)
        pixels, masks, boxes, sentences = r["pixels"], r["masks"], r["boxes"], r["sentences"]
        if self.train and self.hflip > 0 and torch.rand(()).item() < self.hflip:
            pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
            boxes = np.stack([self.image_size - boxes[:, 2], boxes[:, 1], self.image_size - boxes[:, 0],
                              boxes[:, 3]], 1).reshape(-1, 4)
            sentences = [_swap_left_right(s) for s in sentences]
        return dict(image=to_image_tensor(pixels, self.mean, self.std), sentences=sentences,
                    text=" ".join(sentences), labels=torch.from_numpy(r["labels"]),
                    study_id=f"synthetic-{self.split}-{self.seed}-{index}",
                    masks=torch.from_numpy(np.ascontiguousarray(masks)), boxes=torch.from_numpy(boxes),
                    box_labels=torch.from_numpy(r["box_labels"]))


# ==== 3. MIMIC-CXR: report sections, the small-resolution cache (prepare-mimic), MimicCXR ===========================
# MIMIC-CXR-JPG 2.0.0 + MIMIC-CXR 2.0.0 reports, read as LoVT does (philip-mueller/lovt:
# src/data/datasets/mimic_cxr/mimic_cxr_dataset.py), with a small-resolution cache in front.
#
# `python data.py prepare-mimic --root ROOT --out CACHE [--reports DIR] [--image-size 256] [--workers N]` decodes every
# frontal (PA/AP) JPEG once and writes CACHE/
#     images.bin      uint8 np.memmap, N x S x S (nanoGPT style: zero decode cost when training)
#     manifest.csv    row,subject_id,study_id,dicom_id,split,view,height,width,x0,y0,x1,y1 (original size, content box)
#     studies.jsonl   one kept study per line: ids, split, memmap rows, sentences (findings then impression), the
#                     stripped findings and impression texts, 14 CheXpert labels (CHEXPERT_LABELS order, null = blank)
#     meta.json       image_size, counts, crc32 of images.bin, per-split pixel mean/std over the content boxes (LoVT's
#                     rule: mean of image means; variance = mean of image variances + variance of the means; [0, 1])
#     rejected.csv    path,reason for every image and report refused (never replaced by zeros): missing/empty/
#                     unreadable (incl. truncated)/constant image, missing/unreadable report, custom_rule_study,
#                     no_findings_or_impression, too_few_tokens (< 3), no_valid_image (the study lost all its images)
# Reports follow LoVT's mimic_cxr_dataset.py, with the suite's split_sentences instead of Stanza (a documented
# deviation).
# Images: decoded with libjpeg DCT scaling (`Image.draft`, 1/2, 1/4 or 1/8 scale, never below the target), longer side
# resized to S with Image.Resampling.BOX (area average, like cv2.INTER_AREA in MGCA), zero-padded centred to S x S:
# padded rather than cropped, so the memmap has a fixed shape and nothing is lost; BatchAugment crops on the device.
# Resumable: studies are processed in sorted order in chunks; after each chunk the memmap and text files are flushed
# and state.json is replaced atomically, so a rerun truncates any half-written tail and continues at the same row.
# ---- 3a. MIT-LCP section parser (MIT-LCP/mimic-cxr:txt/section_parser.py:section_text, reimplemented literally) ----
# A header is a newline, exactly one space, UPPER-CASE letters / space / ()/,- and a colon: "Findings:" is no header.
_HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)
_SECTION_ALIASES = {  # normalised name <- exact (lower-cased) header spellings, MIT-LCP's `frequent_sections`
    "impression": "impression|conclusion|findings and impression|findings/impression|findings/ impression|impresson|"
                  "imprression|imoression|impressoin|imprssion|impresion|imperssion|mpression|impession|ndication",
    "findings": "findings|finding|chest, two views|reference findings|findins|findindgs|findgings|findngs|findnings|"
                "finidngs",
    "comparison": "comparison|comparisons|reference exam|comparison exam|comparison film|comparision|comparsion|"
                  "comparrison|comparisions",
    "history": "history|clinical history|clinical information|patient history|pfi",
    "indication": "indication|reason for examination|reason for exam|clinical indication|idication",
    "examination": "examination|exam|type of examination",
    "recommendations": "recommendations|recommendation(s)|recommendation",
    "wet read": "wet read|wetread",
    "preamble": "preamble", "technique": "technique", "notification": "notification", "addendum": "addendum",
    "date": "date", "comment": "comment",
}
_SECTION_SYNONYMS = {alias: name for name, aliases in _SECTION_ALIASES.items() for alias in aliases.split("|")}
_MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")  # substring match, in this order
_FINDINGS_LIKE = re.compile(
    "(chest|portable|pa and lateral|lateral and pa|ap and lateral|lateral and ap|frontal and|two views|frontal view|"
    "pa view|ap view|one view|lateral view|bone window|frontal upright|frontal semi-upright|ribs|pa and lat)")
# Studies in MIT-LCP's `custom_mimic_cxr_rules` tables (hand-set sections or offsets): LoVT skips them.
_CUSTOM_RULE_STUDIES = frozenset(
    "50913680 59363654 59279892 59768032 57936451 50058765 53356173 53202765 50808053 51966317 50743547 56451190 "
    "59067458 59215320 55124749 54365831 59087630 58157373 56482935 58375018 54654948 55157853 51491012 50525523 "
    "57564132 59982525 53488209 54875119 50196495 56579911 52648681 59889364 53514462 59505494 53182247 51410602 "
    "56412866 54986978 59003148 57150433 56760320 59562049 52674888 55258338 59330497 52119491 58235663 50798377 "
    "54168089 53071062 56724958 54231141 53607029 52035334".split())
_TOKEN = re.compile(r"\w+|[^\w\s]")  # words and punctuation marks: our stand-in for Stanza's token count


def _normalize_section_name(name):
    name = name.lower().strip()
    if name in _SECTION_SYNONYMS:
        return _SECTION_SYNONYMS[name]
    for main in _MAIN_SECTIONS:
        if main in name:
            return main
    return "findings" if _FINDINGS_LIKE.search(name) else name  # title-like headers ("CHEST, PA LATERAL")


def parse_report_sections(text):
    """{normalised section name: body} by MIT-LCP's `section_text` rules, in report order. Bodies are not stripped;
    if a name repeats, the last occurrence wins (LoVT)."""
    m = _HEADER.search(text)
    if m is None:
        return {"full report": text}
    bodies, names = [text[:m.start(1)]], ["preamble"]
    while m:
        name, start = m.group(1), m.end()
        # The next header is searched from the end of this header's first line, never on that line.
        m = _HEADER.search(text, max(text.find("\n", start), start))
        bodies.append(text[start:m.start() if m else len(text)])
        names.append(name)
    names = [_normalize_section_name(n) for n in names]
    # Empty findings/impression are titles or duplicated headers: drop them.
    keep = [i for i, (n, b) in enumerate(zip(names, bodies)) if n not in ("impression", "findings") or b.strip()]
    bodies, names = [bodies[i] for i in keep], [names[i] for i in keep]
    if "impression" not in names and "findings" not in names and "\n \n" in bodies[-1]:
        first, *rest = bodies[-1].split("\n \n")
        bodies[-1:] = [first, "\n \n".join(rest)]
        names.append("last_paragraph")
    return dict(zip(names, bodies))  # a later duplicate overwrites the earlier one's body


def report_sentences(text):
    """LoVT's sentence list: findings sentences, then impression sentences (a missing section counts as empty)."""
    sections = parse_report_sections(text)
    return split_sentences(sections.get("findings", "")) + split_sentences(sections.get("impression", ""))


# ---- 3b. prepare-mimic: decode, validate and cache -----------------------------------------------------------------
def load_cxr(path, image_size, draft=True):
    """JPEG -> (S x S uint8 square, S = image_size, (height, width) of the original, content box (x0, y0, x1, y1)).

    draft=True decodes at a reduced DCT scale (data.load_grayscale). Raises OSError / ValueError on unreadable or
    truncated files: the conversion forces the full decode, and Pillow's default ImageFile.LOAD_TRUNCATED_IMAGES =
    False makes a truncated stream an error instead of grey rows."""
    with Image.open(path) as img:  # reads the header only: the original size for the manifest
        w0, h0 = img.size
    img = load_grayscale(path, min_size=image_size if draft else None)
    w, h = img.size
    scale = image_size / max(w, h)  # where square_resize places the content
    box_w, box_h = max(1, round(w * scale)), max(1, round(h * scale))
    x0, y0 = (image_size - box_w) // 2, (image_size - box_h) // 2
    return square_resize(img, image_size), (h0, w0), (x0, y0, x0 + box_w, y0 + box_h)


def _read_report(path, study_id):
    """(dict of sentences and the stripped findings / impression texts, None) for a valid report, or (None, reason)
    following LoVT's filters (its mimic_cxr_dataset.py). The raw sections let other methods build their own text
    (MGCA, LRCLR)."""
    if study_id in _CUSTOM_RULE_STUDIES:
        return None, "custom_rule_study"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return None, "missing_report" if isinstance(e, FileNotFoundError) else "unreadable_report"
    sections = parse_report_sections(text)
    if "findings" not in sections and "impression" not in sections:
        return None, "no_findings_or_impression"  # the unlabelled last paragraph is not used
    sentences = report_sentences(text)
    if len(_TOKEN.findall(" ".join(sentences))) < 3:
        return None, "too_few_tokens"
    return dict(sentences=sentences, findings=sections.get("findings", "").strip(),
                impression=sections.get("impression", "").strip()), None


def _prepare_study(study, image_size):
    """Worker: validate the report, then decode each frontal image -> dict of results (plain, picklable)."""
    report, reason = _read_report(study["report"], study["study_id"])
    images = []
    for dicom_id, view, path in study["images"] if reason is None else []:
        try:
            square, hw, box = load_cxr(path, image_size)
            x0, y0, x1, y1 = box
            content = square[y0:y1, x0:x1] / 255.0
            bad = "constant_image" if content.min() == content.max() else None
            images.append(dict(dicom_id=dicom_id, view=view, path=path, reason=bad, square=square, hw=hw, box=box,
                               mean=float(content.mean()), var=float(content.var())))
        except FileNotFoundError:
            images.append(dict(path=path, reason="missing_image"))
        except (OSError, ValueError, Image.DecompressionBombError):
            empty = os.path.exists(path) and os.path.getsize(path) == 0
            images.append(dict(path=path, reason="empty_image" if empty else "unreadable_image"))
    return dict(report=report, reason=reason, images=images)


def _prepare_chunk(studies, image_size):
    return [_prepare_study(s, image_size) for s in studies]


def _read_csv(root, name):
    for path in (root / name, root / f"{name}.gz"):
        if path.exists():
            return [row for _, row in _csv_rows(path)]
    raise FileNotFoundError(f"{name}[.gz] not found in {root}")


def _mimic_studies(root, reports):
    """Frontal images grouped by study, in sorted (subject, study, dicom) order -> (studies, n non-frontal)."""
    views = {r["dicom_id"]: r["ViewPosition"] for r in _read_csv(root, "mimic-cxr-2.0.0-metadata.csv")}
    labels = {r["study_id"]: [float(r[k]) if r[k] else None for k in CHEXPERT_LABELS]  # None = blank
              for r in _read_csv(root, "mimic-cxr-2.0.0-chexpert.csv")}
    studies, non_frontal = {}, 0
    for r in _read_csv(root, "mimic-cxr-2.0.0-split.csv"):
        view = views.get(r["dicom_id"]) or ""
        if view not in ("PA", "AP"):  # blank and every other view are excluded, as in LoVT and MGCA
            non_frontal += 1
            continue
        subject, study = r["subject_id"], r["study_id"]
        folder = f"files/p{subject[:2]}/p{subject}"
        s = studies.setdefault((subject, study), dict(
            subject_id=subject, study_id=study, split=r["split"], report=str(reports / folder / f"s{study}.txt"),
            labels=labels.get(study, [None] * len(CHEXPERT_LABELS)), images=[]))  # a missing label row = blank
        s["images"].append((r["dicom_id"], view, str(root / folder / f"s{study}" / f"{r['dicom_id']}.jpg")))
    for s in studies.values():
        s["images"].sort()
    return [studies[k] for k in sorted(studies)], non_frontal


def _save_state(path, state):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # atomic: a crash leaves the old state or the new one, never half of one


def prepare_mimic(root, out, reports=None, image_size=256, workers=1, chunk_size=64):
    """Build (or resume) the cache described at the top of this section; returns meta.json's dict."""
    root, out = Path(root), Path(out)
    reports = Path(reports) if reports else root
    reports = reports.parent if reports.name == "files" else reports  # accept the folder holding files/ or files/
    studies, non_frontal = _mimic_studies(root, reports)
    if not studies:
        raise SystemExit(f"no frontal images listed under {root}")
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out, image_size, n_images=sum(len(s["images"]) for s in studies))
    state = _open_cache(cache, studies)
    if state["next_study"] < len(studies):
        _fill_cache(cache, state, studies, workers, chunk_size)
    if not state["done"]:
        _finish_cache(cache, state, non_frontal)
    meta = json.loads((out / "meta.json").read_text())
    print(f"prepare-mimic: kept {meta['n_images']} images / {meta['n_studies']} studies; skipped "
          f"{meta['non_frontal_skipped']} non-frontal images; rejected "
          f"{', '.join(f'{k}={v}' for k, v in meta['rejected'].items()) or 'none'} (list: {cache.texts['rejected']})")
    return meta


class _Cache:
    """Where a prepare-mimic cache lives: the memmap (N x S x S, N = every listed frontal image, an upper bound cut
    at the end), the text files that are appended chunk by chunk, and state.json."""

    def __init__(self, out, image_size, n_images):
        self.out, self.image_size, self.n_images = out, image_size, n_images
        self.texts = {name: out / file for name, file in (("manifest", "manifest.csv"), ("studies", "studies.jsonl"),
                                                          ("rejected", "rejected.csv"))}
        self.state_path, self.bin_path = out / "state.json", out / "images.bin"

    def memmap(self, mode):
        return np.memmap(self.bin_path, np.uint8, mode, shape=(self.n_images, self.image_size, self.image_size))


def _open_cache(cache, studies):
    """A fresh cache with empty files, or the state of an interrupted run with whatever it wrote after its last
    saved chunk cut off. Refuses a folder that holds another data set or image size."""
    ids = [[s["study_id"], [dicom_id for dicom_id, _, _ in s["images"]]] for s in studies]
    fingerprint = zlib.crc32(json.dumps([cache.image_size, ids]).encode())  # what the fixed row order depends on
    if cache.state_path.exists():
        state = json.loads(cache.state_path.read_text())
        if state["fingerprint"] != fingerprint:
            raise SystemExit(f"{cache.out} holds a cache of other data or another --image-size; choose a new --out")
        for key, path in cache.texts.items():  # drop whatever a killed run appended after its last saved chunk
            os.truncate(path, state["offsets"][key])
        return state
    cache.texts["manifest"].write_text("row,subject_id,study_id,dicom_id,split,view,height,width,x0,y0,x1,y1\n")
    cache.texts["studies"].write_text("")
    cache.texts["rejected"].write_text("path,reason\n")
    cache.memmap("w+").flush()
    state = dict(fingerprint=fingerprint, image_size=cache.image_size, next_study=0, next_row=0, kept_studies=0,
                 crc32=0, rejected={}, stats={}, offsets={k: p.stat().st_size for k, p in cache.texts.items()},
                 done=False)
    _save_state(cache.state_path, state)
    return state


def _fill_cache(cache, state, studies, workers, chunk_size):
    """Decode the studies from state["next_study"] on, in chunks (in `workers` processes); after each chunk the
    memmap and text files are flushed and fsynced, then state.json is replaced: a kill loses at most a chunk."""
    start = state["next_study"]
    images = cache.memmap("r+")
    chunks = [studies[i:i + chunk_size] for i in range(start, len(studies), chunk_size)]
    work = partial(_prepare_chunk, image_size=cache.image_size)
    pool = Pool(workers) if workers > 1 else None
    done = sum(len(s["images"]) for s in studies[:start])
    bar = tqdm(total=cache.n_images, initial=done, unit="img", desc="prepare-mimic", smoothing=0.1)  # shows img/s
    files = {k: open(p, "a", newline="") for k, p in cache.texts.items()}
    try:
        for chunk, results in zip(chunks, pool.imap(work, chunks) if pool else map(work, chunks)):
            _write_chunk(chunk, results, images, files, state)
            images.flush()
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
            state["offsets"] = {k: f.tell() for k, f in files.items()}
            _save_state(cache.state_path, state)
            bar.update(sum(len(s["images"]) for s in chunk))
    finally:
        bar.close()
        for f in files.values():
            f.close()
        if pool:
            pool.terminate()


def _finish_cache(cache, state, non_frontal):
    """Cut the memmap to the rows written and write meta.json with the per-split pixel statistics."""
    os.truncate(cache.bin_path, state["next_row"] * cache.image_size * cache.image_size)
    stats = {}
    for split, (n, sum_mean, sum_var, sum_mean_sq) in sorted(state["stats"].items()):
        mean = sum_mean / n  # LoVT: mean of image means; variance = mean of variances + variance of means
        stats[split] = dict(n_images=n, mean=mean, std=math.sqrt(sum_var / n + max(sum_mean_sq / n - mean**2, 0)))
    meta = dict(image_size=cache.image_size, n_images=state["next_row"], n_studies=state["kept_studies"],
                non_frontal_skipped=non_frontal, rejected=dict(sorted(state["rejected"].items())),
                crc32=state["crc32"], stats=stats)
    (cache.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    state["done"] = True
    _save_state(cache.state_path, state)


def _write_chunk(chunk, results, images, files, state):
    """Main process, in study order: memmap rows, text lines, counts and running pixel statistics."""
    def reject(path, reason):
        csv.writer(files["rejected"], lineterminator="\n").writerow([path, reason])
        state["rejected"][reason] = state["rejected"].get(reason, 0) + 1
    for study, res in zip(chunk, results):
        state["next_study"] += 1
        if res["reason"]:
            reject(study["report"], res["reason"])
            continue
        rows = []
        for im in res["images"]:
            if im["reason"]:
                reject(im["path"], im["reason"])
                continue
            row = state["next_row"]
            images[row] = im["square"]
            state["crc32"] = zlib.crc32(im["square"].tobytes(), state["crc32"])
            (h, w), (x0, y0, x1, y1) = im["hw"], im["box"]
            files["manifest"].write(f"{row},{study['subject_id']},{study['study_id']},{im['dicom_id']},"
                                    f"{study['split']},{im['view']},{h},{w},{x0},{y0},{x1},{y1}\n")
            acc = state["stats"].setdefault(study["split"], [0, 0.0, 0.0, 0.0])  # n, sums of mean, var, mean^2
            for i, value in enumerate((1, im["mean"], im["var"], im["mean"] ** 2)):
                acc[i] += value
            rows.append(row)
            state["next_row"] += 1
        if not rows:
            reject(study["report"], "no_valid_image")
            continue
        record = dict(subject_id=study["subject_id"], study_id=study["study_id"], split=study["split"], rows=rows,
                      **res["report"], labels=study["labels"])
        files["studies"].write(json.dumps(record) + "\n")
        state["kept_studies"] += 1


def add_mimic_commands(subparsers):
    """Register `prepare-mimic` on data.py's argparse subparsers (dispatch: args.func(args))."""
    p = subparsers.add_parser("prepare-mimic", help="build the small-resolution MIMIC-CXR cache (resumable)")
    p.add_argument("--root", required=True, help="mimic-cxr-jpg/2.0.0: the split/metadata/chexpert CSVs and files/")
    p.add_argument("--out", required=True, help="cache folder (rerun with the same --out to resume)")
    p.add_argument("--reports", default=None, help="folder holding files/pXX/pSUBJECT/sSTUDY.txt (default: --root)")
    p.add_argument("--image-size", type=int, default=256, help="side S of the cached S x S squares")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.set_defaults(func=lambda a: prepare_mimic(a.root, a.out, a.reports, a.image_size, a.workers))


# ---- 3c. the dataset -----------------------------------------------------------------------------------------------
class MimicCXR(Dataset):
    """Image-report pairs from a prepare-mimic cache -> DESIGN sample dicts.

    one_image_per_study=True: one sample per study, a random frontal view each time it is loaded (LoVT);
    False: one sample per frontal image (MGCA). train=True returns the cached S x S square (BatchAugment crops it on
    the device); train=False resizes it to image_size. Normalised with the train split's statistics."""

    def __init__(self, cache_dir, split="train", image_size=224, train=True, one_image_per_study=True):
        self.cache_dir, self.image_size, self.train = Path(cache_dir), image_size, train
        meta = json.loads((self.cache_dir / "meta.json").read_text())
        if "image_size" not in meta:  # caches written before the key was renamed from "size"
            raise ValueError(f"{self.cache_dir / 'meta.json'} has no 'image_size': it was written by an older "
                             "prepare-mimic; rename its key 'size' to 'image_size' (the images are unchanged)")
        self.cache_size, self.n_images = meta["image_size"], meta["n_images"]
        self.mean, self.std = meta["stats"]["train"]["mean"], meta["stats"]["train"]["std"]
        with open(self.cache_dir / "studies.jsonl") as f:
            studies = [s for s in map(json.loads, f) if s["split"] == split]
        self.samples = ([(s, s["rows"]) for s in studies] if one_image_per_study
                        else [(s, [row]) for s in studies for row in s["rows"]])
        self._images = None  # the memmap, opened lazily in each DataLoader worker

    def __getstate__(self):  # pickling a memmap would copy all of it: workers reopen their own
        return {**self.__dict__, "_images": None}

    def __len__(self):
        return len(self.samples)

    def report(self, index):
        """The study's sentences, without reading the image."""
        return self.samples[index][0]["sentences"]

    def __getitem__(self, index):
        study, rows = self.samples[index]
        row = rows[torch.randint(len(rows), ()).item()]  # torch RNG: seeded per DataLoader worker
        if self._images is None:
            self._images = np.memmap(self.cache_dir / "images.bin", np.uint8, "r",
                                     shape=(self.n_images, self.cache_size, self.cache_size))
        pixels = np.array(self._images[row])  # S x S uint8, copied out of the read-only map
        if not self.train and self.image_size != self.cache_size:
            pixels = square_resize(Image.fromarray(pixels), self.image_size)
        labels = torch.tensor([math.nan if v is None else v for v in study["labels"]], dtype=torch.float32)
        return dict(image=to_image_tensor(pixels, self.mean, self.std), sentences=list(study["sentences"]),
                    text=" ".join(study["sentences"]), labels=labels, study_id=study["study_id"])


# ==== 4. Image-report pairs from a CSV file (IU X-ray, CheXpert Plus, own data); make_dataset =======================
class CsvPairs(Dataset):
    """Image-report pairs listed in a CSV: `image_col` holds image paths relative to the CSV's folder,
    `text_col` the report text (split with split_sentences), optional `split_col` (train/validate/test) and
    optional label columns named as in CHEXPERT_LABELS (blank = nan).

    Splits: the split column where there is one. Without it the rows are split 80/10/10 with split_seed (a fixed
    default, not the run's seed, so every method sees the same split), by a `patient` column, else a `study_id`
    column, else by row; a patient (study) never spans two splits, and the counts are printed once per process.
    split=None: every row.

    Every row of the CSV, of all splits (a bad test row must not surface after hours of training), is checked
    when the first dataset of the CSV is built, once per process: the image file exists and looks whole
    (image_file_problem), the report has a sentence, labels are numbers, split names are known. Bad rows raise
    ONE BadRecord listing them (file, row, problem), or with skip_bad=True are dropped and counted.

    Images: grayscale, zero-padded to a centred square, resized (train: to train_native_size(image_size) for
    BatchAugment; eval: image_size), normalized with mean/std. mean/std default to LoVT-style statistics of
    up to 64 evenly spaced training rows, so that validation and test use the training statistics.
    """

    def __init__(self, csv_path, split=None, image_size=224, train=True, image_col="image", text_col="report",
                 split_col="split", mean=None, std=None, num_samples=None, split_seed=0, skip_bad=False):
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be None (every row) or one of {SPLITS}, got {split!r}")
        self.csv_path, self.image_size, self.train = csv_path, image_size, train
        self.native_size = train_native_size(image_size) if train else image_size
        digest = hashlib.sha256(Path(csv_path).read_bytes()).hexdigest()  # an edited CSV is read again
        pairs = _checked_pairs(os.path.abspath(csv_path), digest, image_col, text_col, split_col, split_seed, skip_bad)
        self.items = [p for p in pairs if split is None or p["split"] == split][:num_samples]
        if mean is None or std is None:
            train_rows = [p for p in pairs if p["split"] == "train"]
            sample = train_rows[::max(1, len(train_rows) // 64)][:64] or self.items[:64]
            mean, std = _sample_pixel_stats(tuple((p["path"], p["where"]) for p in sample), image_size)
        self.mean, self.std = float(mean), float(std)

    @staticmethod
    def _read(path, where, image_size):
        try:
            return square_resize(load_grayscale(path, min_size=image_size), image_size)
        except (OSError, ValueError) as e:  # PIL raises OSError (UnidentifiedImageError) for bad files
            raise BadRecord(f"{where}: cannot read image {path}: {e}") from e

    def __len__(self):
        return len(self.items)

    def report(self, index):
        """The report's sentences, without reading the image."""
        return list(self.items[index]["sentences"])

    def __getitem__(self, index):
        it = self.items[index]
        pixels = self._read(it["path"], it["where"], self.native_size)
        return dict(image=to_image_tensor(pixels, self.mean, self.std), sentences=list(it["sentences"]),
                    text=" ".join(it["sentences"]), labels=torch.from_numpy(it["labels"].copy()),
                    study_id=str(it["study_id"]))


@lru_cache(maxsize=16)
def _checked_pairs(csv_path, digest, image_col, text_col, split_col, split_seed, skip_bad):
    """Every row of a pairs CSV read, split and checked, once per process for all of its datasets (lovt and
    joimternet build train, validate and test separately) -> tuple of pair dicts (path, where, sentences, labels,
    study_id, split). digest: the CSV's content hash, part of the cache key (a file's mtime can stay the same
    across two quick writes). A BadRecord is raised, not cached: the next construction checks again."""
    header, rows = _csv_table(csv_path)
    for col in (image_col, text_col):
        if col not in header:
            raise ValueError(f"{csv_path}: no column {col!r} (columns: {header}); name the image and report "
                             f"columns {image_col!r} and {text_col!r}")
    if split_col in header:
        splits = [row[split_col] for _, row in rows]
    else:
        group_col = next((c for c in ("patient", "study_id") if c in header), None)
        splits = _split_rows(rows, group_col, split_seed)
    columns = (image_col, text_col, [c for c in CHEXPERT_LABELS if c in header])
    bad = _BadRecords(csv_path, skip_bad)
    pairs = [bad(_check_pair, csv_path, line, row, columns, split) for (line, row), split in zip(rows, splits)]
    bad.finish()
    pairs = tuple(p for p in pairs if p is not None)
    if split_col not in header:
        counts = Counter(p["split"] for p in pairs)
        print(f"{csv_path}: no {split_col!r} column; split 80/10/10 by {group_col or 'row'} (seed {split_seed}): "
              + " / ".join(f"{counts[s]} {s}" for s in SPLITS) + " pairs", file=sys.stderr)
    return pairs


def _split_rows(rows, group_col, seed, ratios=(0.8, 0.1, 0.1)):
    """The split of each row: split_records' seeded split with whole groups (a blank group cell: the row alone).
    Every row takes part, bad ones too, so that skipping bad rows never moves a good one to another split."""
    records = [dict(id=str(i), patient=(row[group_col] or None) if group_col else None) for i, (_, row) in
               enumerate(rows)]
    split_of = {r["id"]: split for split, part in split_records(records, seed=seed, ratios=ratios).items()
                for r in part}
    return [split_of[str(i)] for i in range(len(rows))]


def _check_pair(csv_path, line, row, columns, split):
    """One CSV row -> its pair dict, or a BadRecord naming the CSV row and its (first) problem."""
    image_col, text_col, label_cols = columns
    where = f"{csv_path} row {line}"
    path = _row_image(csv_path, where, row[image_col])
    sentences = split_sentences(row[text_col])
    if not sentences:
        raise BadRecord(f"{where}: empty report in column {text_col!r}")
    labels = _row_labels(where, row, label_cols)
    if split.lower() not in _SPLIT_NAMES:
        raise BadRecord(f"{where}: split {split!r} is not one of train / validate / test")
    return dict(path=path, where=where, sentences=tuple(sentences), labels=labels,
                study_id=row.get("study_id") or row[image_col], split=_SPLIT_NAMES[split.lower()])


def _row_image(csv_path, where, cell):
    """A CSV row's image cell (a path relative to the CSV's folder) -> the path of a whole-looking image file, or a
    BadRecord."""
    path = os.path.join(os.path.dirname(csv_path), cell)
    if not cell or not os.path.isfile(path):
        raise BadRecord(f"{where}: image file not found: {path}")
    problem = image_file_problem(path)
    if problem:
        raise BadRecord(f"{where}: {problem}")
    return path


def _row_labels(where, row, label_cols):
    """A CSV row's CheXpert label cells -> float32 (14,) in CHEXPERT_LABELS order (blank = not mentioned: nan), or a
    BadRecord naming the cell that is not a number."""
    labels = np.full(len(CHEXPERT_LABELS), np.nan, np.float32)
    for c in label_cols:
        if row[c]:
            try:
                labels[CHEXPERT_LABELS.index(c)] = float(row[c])
            except ValueError:
                raise BadRecord(f"{where}: label {c!r} is not a number: {row[c]!r}") from None
    return labels


def image_file_problem(path):
    """Why an image file cannot be used, or None if it looks whole; cheap (no pixel decoding). Pillow's
    Image.open reads the header and verify() walks a PNG's chunks checking their CRCs up to IEND, which catches a
    truncated PNG; for a JPEG verify() checks nothing, so a JPEG must also end with the end-of-image marker FF D9
    (a truncated one does not; trailing zero padding is tolerated)."""
    try:
        with Image.open(path) as im:
            is_jpeg = im.format == "JPEG"
            im.verify()
    except UnidentifiedImageError:
        return f"not an image file Pillow can read: {path}"
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ... on damaged files
        return f"truncated or damaged image {path}: {e}"
    if is_jpeg:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            if not f.read().rstrip(b"\0").endswith(b"\xff\xd9"):
                return f"truncated JPEG {path}: no end-of-image marker (FF D9) at the end of the file"
    return None


@lru_cache(maxsize=16)
def _sample_pixel_stats(sample, image_size):
    """pixel_stats of the sampled training images ((path, where) pairs) at image_size, once per process."""
    return pixel_stats([CsvPairs._read(path, where, image_size) for path, where in sample])


class LabelledImages(Dataset):
    """Images with CheXpert labels and no reports, listed in a CSV: a zero-shot set other than the training data
    (--zero-shot-csv), e.g. the CheXpert validation or test set. Columns: `image` (or CheXpert's own `Path`), a path
    relative to the CSV's folder, and label columns named as in CHEXPERT_LABELS, read as CsvPairs reads them (1
    positive, 0 negative, -1 uncertain, blank nan; only 1 and 0 are scored). Rows that CheXpert's `Frontal/Lateral`
    column marks lateral are left out: every method trains on frontal views.

    Built when a run starts, so that a bad file stops it before training: every row is checked as CsvPairs checks
    its rows (one BadRecord lists the bad rows with file and row; skip_bad drops them), and some finding must have
    positive and negative images. Images: the evaluation view at the training run's image_size, normalised with the
    training mean/std (the input the model was trained on, not this set's statistics).
    Samples: image 1 x S x S, labels (14,), study_id (the image cell)."""

    def __init__(self, csv_path, image_size, mean, std, skip_bad=False):
        self.csv_path, self.image_size, self.mean, self.std = csv_path, image_size, float(mean), float(std)
        try:
            header, rows = _csv_table(csv_path)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise BadRecord(f"{csv_path}: cannot be read as a CSV file ({e})") from None
        image_col = next((c for c in ("image", "Path") if c in header), None)
        label_cols = [c for c in CHEXPERT_LABELS if c in header]
        if image_col is None or not label_cols:
            raise BadRecord(f"{csv_path}: needs an image column ('image' or 'Path') and label columns named as the "
                            f"CheXpert findings ({', '.join(CHEXPERT_LABELS[1:4])}, ...); its columns: {header}")
        bad = _BadRecords(csv_path, skip_bad)
        items = [bad(_check_labelled_image, os.path.abspath(csv_path), line, row, image_col, label_cols)
                 for line, row in rows if row.get("Frontal/Lateral") != "Lateral"]
        bad.finish()
        self.items = [it for it in items if it is not None]
        findings = np.array([it["labels"] for it in self.items]).reshape(-1, len(CHEXPERT_LABELS))[:, 1:]
        if not ((findings == 1).any(0) & (findings == 0).any(0)).any():  # "No Finding" is not scored
            raise BadRecord(f"{csv_path}: no finding has both positive (1) and negative (0) images among its "
                            f"{len(self.items)} frontal images: a zero-shot AUC needs both")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        it = self.items[index]
        pixels = CsvPairs._read(it["path"], it["where"], self.image_size)
        return dict(image=to_image_tensor(pixels, self.mean, self.std), labels=torch.from_numpy(it["labels"].copy()),
                    study_id=it["study_id"])


def _check_labelled_image(csv_path, line, row, image_col, label_cols):
    """One row of a LabelledImages CSV -> its item dict, or a BadRecord naming the CSV row and its problem."""
    where = f"{csv_path} row {line}"
    return dict(path=_row_image(csv_path, where, row[image_col]), where=where,
                labels=_row_labels(where, row, label_cols), study_id=row[image_col])


def dataset_reports(ds, indices=None):
    """Every report of a dataset (or of nested Subsets of one) as its list of sentences, in order. Uses the
    datasets' report(index), so MIMIC and CSV images are never decoded (synthetic reports are drawn with their
    image, so those render)."""
    indices = range(len(ds)) if indices is None else indices
    if isinstance(ds, torch.utils.data.Subset):
        return dataset_reports(ds.dataset, [ds.indices[i] for i in indices])
    return [list(ds.report(i)) for i in indices]


def report_texts(ds):
    """Every report of a dataset as one string each, in order: what a tokenizer's vocabulary is built from."""
    return [" ".join(sentences) for sentences in dataset_reports(ds)]


def make_dataset(name, root=None, split="train", image_size=224, train=True, seed=0, num_samples=None,
                 skip_bad=False):
    """The one entry point the methods call. name: "synthetic" | "mimic" (root = the prepare-mimic cache
    folder) | "csv" (root = the CSV file). seed: the synthetic generator's (a CSV's split does not follow it).
    num_samples: how many samples (synthetic), else the first num_samples ones. skip_bad (csv): drop the rows
    that fail CsvPairs' check and count them, instead of raising one BadRecord that lists them."""
    if name in SYNTHETIC_CONTRAST:
        return SyntheticCXR(split=split, num_samples=num_samples, image_size=image_size, seed=seed, train=train,
                            finding_contrast=SYNTHETIC_CONTRAST[name])
    if name == "csv":
        return CsvPairs(root, split=split, image_size=image_size, train=train, num_samples=num_samples,
                        skip_bad=skip_bad)
    if name == "mimic":
        ds = MimicCXR(root, split=split, image_size=image_size, train=train)
        if num_samples is not None and num_samples < len(ds):
            subset = torch.utils.data.Subset(ds, range(num_samples))
            subset.mean, subset.std = ds.mean, ds.std
            return subset
        return ds
    raise ValueError(f"unknown dataset {name!r}: use 'synthetic', 'synthetic-faint', 'mimic' or 'csv'")


def check_data_root(name, root):
    """Stop with a clear message when a dataset that lives on disk (mimic, csv) is named without its root."""
    if name not in SYNTHETIC_CONTRAST and not root:
        raise SystemExit(f"--data {name} needs --data-root (mimic: the `python data.py prepare-mimic` cache)")


# ==== 5. Augmentation and batching: BatchAugment on the training device, collate, tokenizer =========================
class BatchAugment(torch.nn.Module):
    """LoVT's training augmentation (the defaults of philip-mueller/lovt:src/models/image/scan_transforms.py:
    ScanAugmentationConfig) for a whole batch on its device, per-sample parameters drawn from the same
    distributions as torchvision's transforms (sample_params), then applied (apply):

    1. RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3)): torchvision's 10-try rejection
       sampling with integer crop boxes and its fallback, composed with
    2. RandomAffine(degrees=rotation, translate=(translate, translate), scale=scale, fill=0 = black), with
       translations rounded to whole output pixels. Both are affine maps of the output grid, so they are
       composed into ONE sampling grid and ONE bilinear grid_sample: a single interpolation instead of two,
       and no intermediate image. Outside the crop box the output is black, as RandomAffine's fill makes it.
       (Tested against torchvision's resized_crop + affine: equal up to the saved interpolation and the
       blending at fill edges. torchvision's RandomAffine defaults to nearest; this is bilinear throughout.)
    3. ColorJitter(brightness, contrast) on [0, 1] pixels, in a random order per sample as torchvision does;
       contrast blends with the image's mean grey; results are clamped to [0, 1].
    4. GaussianBlur(kernel = int(0.1 * image_size) made odd, sigma ~ U(blur_sigma)), reflect padding,
       as a separable depthwise convolution with one kernel per sample (groups = batch size).
    Horizontal flips are not part of this chain: reports say left/right (see SyntheticCXR's hflip).

    Input and output are normalized with (mean, std); the chain works on [0, 1] pixels in between. The crop
    acts on the suite's square training view (train_native_size) instead of LoVT's full non-square film (a
    documented deviation). Bilinear sampling without antialiasing suffices: crops are at most 8/7 of the output
    size. forward(images, generator=None): B x 1 x h x w -> B x 1 x image_size x image_size; parameters are
    drawn on the CPU from `generator` (default: torch's global RNG).
    """

    def __init__(self, image_size, mean, std, crop_scale=(0.6, 1.0), rotation=20.0, translate=0.1,
                 scale=(0.95, 1.05), brightness=(0.6, 1.4), contrast=(0.6, 1.4), blur_sigma=(0.1, 3.0),
                 ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.image_size, self.mean, self.std = image_size, float(mean), float(std)
        self.crop_scale, self.ratio, self.rotation = crop_scale, ratio, rotation
        self.translate, self.scale = translate, scale
        self.brightness, self.contrast, self.blur_sigma = brightness, contrast, blur_sigma
        self.kernel_size = int(0.1 * image_size) // 2 * 2 + 1  # 22 -> 23 for 224, as LoVT

    def sample_params(self, b, h, w, generator=None):
        """Per-sample parameters on the CPU, from torchvision's distributions: crop box (top, left, height,
        width: RandomResizedCrop's 10-try rejection sampling with integer boxes and its fallback), angle
        (degrees), tx, ty (whole output pixels), zoom, brightness, contrast, bright_first (ColorJitter's
        random order), sigma."""
        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(shape or (b,), generator=generator, dtype=torch.float64)
        area = uniform(*self.crop_scale, b, 10) * (h * w)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), b, 10))
        cw, ch = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
        ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
        first = ok.long().argmax(1, keepdim=True)  # the first of the 10 tries that fits
        found = ok.any(1)
        # Fallback when no try fits: the largest centred crop whose aspect ratio is within `ratio`.
        in_ratio = w / h
        fw, fh = (w, round(w / self.ratio[0])) if in_ratio < self.ratio[0] else \
                 (round(h * self.ratio[1]), h) if in_ratio > self.ratio[1] else (w, h)
        cw, ch = torch.where(found, cw.gather(1, first)[:, 0], fw), torch.where(found, ch.gather(1, first)[:, 0], fh)
        top = torch.where(found, (uniform(0, 1) * (h - ch + 1)).long(), (h - ch) // 2)
        left = torch.where(found, (uniform(0, 1) * (w - cw + 1)).long(), (w - cw) // 2)
        max_t = self.translate * self.image_size
        return dict(top=top, left=left, height=ch, width=cw, angle=uniform(-self.rotation, self.rotation),
                    tx=uniform(-max_t, max_t).round(), ty=uniform(-max_t, max_t).round(), zoom=uniform(*self.scale),
                    brightness=uniform(*self.brightness), contrast=uniform(*self.contrast),
                    bright_first=uniform(0, 1) < 0.5, sigma=uniform(*self.blur_sigma))

    def forward(self, images, generator=None):
        b, _, h, w = images.shape
        return self.apply(images, self.sample_params(b, h, w, generator))

    def apply(self, images, params):
        b, _, h, w = images.shape
        s, dev = self.image_size, images.device
        p = {k: v.to(dev, torch.float32) for k, v in params.items()}
        top, left, ch, cw = p["top"], p["left"], p["height"], p["width"]

        # Output pixel p (normalized, align_corners=False) -> crop frame q = R (p - t) / zoom (the inverse of
        # torchvision's affine, same angle sign) -> source point centre + half * q (crop box in normalized units).
        # Each grid coordinate is a row term plus a column term: two broadcast adds, no B x s x s matmul.
        angle = p["angle"] * (math.pi / 180)
        cos, sin = torch.cos(angle) / p["zoom"], torch.sin(angle) / p["zoom"]
        half_x, half_y = cw / w, ch / h
        centre_x, centre_y = (2 * left + cw) / w - 1, (2 * top + ch) / h - 1
        pos = (torch.arange(s, device=dev, dtype=torch.float32) + 0.5) * (2 / s) - 1  # pixel centres
        px, py = pos[None] - p["tx"][:, None] * (2 / s), pos[None] - p["ty"][:, None] * (2 / s)  # B x s each
        grid = torch.empty(b, 2, s, s, device=dev)  # planes x, y; permuted below (grid_sample takes views)
        torch.add((half_x * cos)[:, None, None] * px[:, None, :],
                  ((half_x * sin)[:, None] * py + centre_x[:, None])[:, :, None], out=grid[:, 0])
        torch.add((-half_y * sin)[:, None, None] * px[:, None, :],
                  ((half_y * cos)[:, None] * py + centre_y[:, None])[:, :, None], out=grid[:, 1])
        grid = grid.permute(0, 2, 3, 1)  # B x s x s x 2

        # Un-normalize to [0, 1] pixels and black out everything outside the crop box, so that sampling
        # outside it gives RandomAffine's black fill (up to a half-pixel bilinear edge). The box mask is
        # separable: rows times columns.
        rows, cols = torch.arange(h, device=dev)[None], torch.arange(w, device=dev)[None]
        row_in = ((rows >= top[:, None]) & (rows < (top + ch)[:, None])).to(images.dtype)   # B x h
        col_in = ((cols >= left[:, None]) & (cols < (left + cw)[:, None])).to(images.dtype)  # B x w
        x = (images * self.std + self.mean).mul_(row_in[:, None, :, None]).mul_(col_in[:, None, None, :])
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

        # ColorJitter: two affine maps with clamping, y = clamp(a1 x + b1); out = clamp(a2 y + b2), where
        # brightness is (factor, 0) and contrast is (c, (1 - c) * mean grey of its input); order per sample.
        bright, contrast, bright_first = p["brightness"], p["contrast"], p["bright_first"].bool()
        view = (b, 1, 1, 1)
        a1 = torch.where(bright_first, bright, contrast).view(view)
        b1 = torch.where(bright_first, 0.0, 1 - contrast).view(view) * x.mean((1, 2, 3), keepdim=True)
        x = torch.addcmul(b1, a1, x).clamp_(0, 1)
        a2 = torch.where(bright_first, contrast, bright).view(view)
        b2 = torch.where(bright_first, 1 - contrast, 0.0).view(view) * x.mean((1, 2, 3), keepdim=True)
        x = torch.addcmul(b2, a2, x).clamp_(0, 1)

        # GaussianBlur, separable, one kernel per sample; the second pass also re-normalizes
        # ((blur(x) - mean) / std) through its weights and bias.
        sigma = p["sigma"]
        r = self.kernel_size // 2
        offsets = torch.arange(-r, r + 1, device=dev, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(1, keepdim=True)  # B x k
        x = F.pad(x.view(1, b, s, s), (r, r, r, r), mode="reflect")
        x = F.conv2d(x, kernel.view(b, 1, 1, -1), groups=b)
        bias = torch.full((b,), -self.mean / self.std, device=dev, dtype=x.dtype)
        return F.conv2d(x, kernel.view(b, 1, -1, 1) / self.std, bias, groups=b).view(b, 1, s, s)


def crop_augment(image_size, mean, std, side=7 / 8):
    """MGCA's and GLoRIA's training augmentation, a random crop, as a BatchAugment: a random square of `side` of the
    training view's side, resized to image_size (exactly a random 224 crop of the 256-px view; no flip, rotation,
    jitter or blur)."""
    return BatchAugment(image_size, mean, std, crop_scale=(side ** 2, side ** 2), ratio=(1.0, 1.0), rotation=0.0,
                        translate=0.0, scale=(1.0, 1.0), brightness=(1.0, 1.0), contrast=(1.0, 1.0),
                        blur_sigma=(1e-3, 1e-3))  # sigma -> 0: the blur kernel is a unit impulse


def train_view(images, image_size, augment=None):
    """The one rule by which every method brings the loader's training views (B x 1 x S x S: the synthetic image,
    the CSV square at train_native_size, the MIMIC cache's square) to image_size: the method's augmentation (a
    BatchAugment, whose crop ends at image_size), or without one the whole view resized to image_size (bilinear,
    antialiased): the same view evaluation sees."""
    if augment is not None:
        return augment(images)
    if images.shape[-1] == image_size and images.shape[-2] == image_size:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=True)


# ---- tokenization and collation ------------------------------------------------------------------------------------
def collate(samples, tokenizer, max_length=512, sentence_transform=None, clean=False):
    """Batch sample dicts and tokenize the reports in LoVT's "joint" mode
    (philip-mueller/lovt:src/models/text/report_encoder.py:ReportJointSentenceBatchCollator).

    Each sentence is tokenized without special tokens; sentences are concatenated while the total stays
    <= max_length - 2; the first sentence that does not fit and all later ones are dropped, except that a
    too-long first sentence is truncated and kept alone. Sentences that tokenize to nothing are skipped.
    The ids are wrapped in [CLS] ... [SEP] and padded to the longest report in the batch.
    sentence_transform(list[str]) -> list[str] is applied first (e.g. LoVT's random sentence swaps).
    clean: GLoRIA's and MGCA's text instead (clean_report, then the tokens cut at max_length mid-sentence, as their
    tokenizer's truncation does).
    Returns images B x 1 x H x W, input_ids / attention_mask / sentence_index B x L (sentence of each token,
    -1 for [CLS], [SEP] and padding), sentence_mask B x S, labels B x 14, study_ids, texts (the kept
    sentences joined), sentences (the kept ones), and masks / boxes / box_labels lists when present.
    """
    sentences = [list(s["sentences"]) for s in samples]
    if sentence_transform is not None:
        sentences = [list(sentence_transform(s)) for s in sentences]
    if clean:
        sentences = [clean_report(s) for s in sentences]
    flat = [t for s in sentences for t in s]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    budget, offset = max_length - 2, 0
    rows, kept = [], []
    for sents in sentences:
        tokens, owner, keep = [], [], []
        for sent, sent_ids in zip(sents, ids[offset:offset + len(sents)]):
            if not sent_ids:
                continue
            if len(tokens) + len(sent_ids) > budget:
                if keep and not clean:
                    break
                sent_ids = sent_ids[:budget - len(tokens)]  # a too-long first sentence, or clean: cut where it ends
                if not sent_ids:
                    break
            owner += [len(keep)] * len(sent_ids)
            tokens += sent_ids
            keep.append(sent)
        offset += len(sents)
        rows.append(([tokenizer.cls_token_id] + tokens + [tokenizer.sep_token_id], [-1] + owner + [-1]))
        kept.append(keep)

    b, length, n_sent = len(samples), max(len(r[0]) for r in rows), max(len(k) for k in kept)
    input_ids = torch.full((b, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    sentence_index = torch.full((b, length), -1, dtype=torch.long)
    sentence_mask = torch.zeros(b, n_sent, dtype=torch.bool)
    for i, ((tokens, owner), keep) in enumerate(zip(rows, kept)):
        input_ids[i, :len(tokens)] = torch.tensor(tokens)
        attention_mask[i, :len(tokens)] = 1
        sentence_index[i, :len(owner)] = torch.tensor(owner)
        sentence_mask[i, :len(keep)] = True
    batch = dict(images=torch.stack([s["image"] for s in samples]), input_ids=input_ids,
                 attention_mask=attention_mask, sentence_index=sentence_index, sentence_mask=sentence_mask,
                 labels=torch.stack([torch.as_tensor(s["labels"], dtype=torch.float32) for s in samples]),
                 study_ids=[s["study_id"] for s in samples], texts=[" ".join(k) for k in kept], sentences=kept)
    for key in ("masks", "boxes", "box_labels"):
        if key in samples[0]:
            batch[key] = [s[key] for s in samples]
    return batch


_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def prompt_batch(texts, tokenizer):
    """One-sentence reports (the zero-shot prompts "x" / "no x") -> a text batch as collate makes it."""
    samples = [dict(image=torch.zeros(1, 1, 1), sentences=[t], text=t, labels=torch.zeros(14), study_id=t)
               for t in texts]
    return collate(samples, tokenizer)


def _bert_tokenizer(vocab):
    """A BertTokenizerFast for a word list, via a vocab.txt file (works with transformers 4 and 5)."""
    from transformers import BertTokenizerFast
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.txt"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(vocab) + "\n")
        return BertTokenizerFast.from_pretrained(d, do_lower_case=True, model_max_length=512)


def build_tokenizer(texts, min_freq=1, extra_texts=()):
    """Offline word-level tokenizer from training reports: vocab.txt = [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
    [MASK]=4, then every word seen >= min_freq times, most frequent first (ties alphabetical), then the words of
    `extra_texts` (the zero-shot prompts) that the reports lack, in order of appearance. Words are what BERT's basic
    tokenizer yields (lower-cased, accents stripped, each punctuation mark a token), so the WordPiece model never
    splits a known word; unknown words become [UNK]. Save it with the run through tokenizer.save_pretrained(dir);
    AutoTokenizer.from_pretrained(dir) loads it back offline."""
    bootstrap = _bert_tokenizer(_SPECIAL_TOKENS).backend_tokenizer  # its normalizer + pre-tokenizer

    def words_of(text):
        return [word for word, _ in bootstrap.pre_tokenizer.pre_tokenize_str(bootstrap.normalizer.normalize_str(text))]
    counts = Counter(word for text in texts for word in words_of(text))
    words = sorted((w for w, c in counts.items() if c >= min_freq and w not in _SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    known = set(words) | set(_SPECIAL_TOKENS)
    extra = [w for w in dict.fromkeys(w for text in extra_texts for w in words_of(text)) if w not in known]
    return _bert_tokenizer(list(_SPECIAL_TOKENS) + words + extra)


def report_tokenizer(text_model, train_set):
    """The tokenizer a run's text encoder reads: for the suite's random-init encoders ("tiny", "bert-base") a
    word-level vocabulary of the training reports and of the zero-shot prompts the run will score
    (build_tokenizer: a prompt word real reports lack, "cardiomegaly" in a small CSV, would otherwise be [UNK]),
    else the pretrained model's own tokenizer (a Hub name or a local save_pretrained folder), with a clear message
    when it cannot be loaded offline."""
    if text_model in ("tiny", "bert-base"):
        _, phrases = zero_shot_findings(is_synthetic(train_set))
        return build_tokenizer(report_texts(train_set), extra_texts=phrases + [f"no {p}" for p in phrases])
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(text_model)
    except OSError as e:
        raise SystemExit(f"Could not load the tokenizer of {text_model} ({e}). Without internet pass a local "
                         f"save_pretrained folder, or --text-model tiny.")


def is_synthetic(ds):
    """Whether a dataset (or a Subset of one) is SyntheticCXR, whose evaluation scores the synthetic findings."""
    while isinstance(ds, torch.utils.data.Subset):
        ds = ds.dataset
    return isinstance(ds, SyntheticCXR)


def zero_shot_findings(synthetic):
    """The findings a zero-shot evaluation scores and their positive prompts (the negative prompt is "no " + it,
    CheXzero's pair): the synthetic set's five in the reports' wording, or the CheXpert findings without "No
    Finding" (which the pair would invert). -> (names, phrases)."""
    names = list(SYNTH_FINDINGS) if synthetic else [n.lower() for n in CHEXPERT_LABELS[1:]]
    return names, [SYNTH_PROMPTS.get(n, n) for n in names]


def zero_shot_targets(batch):
    """The zero-shot targets of a batch, in zero_shot_findings' order: a synthetic finding is present where its mask
    is not empty; else the CheXpert labels without No Finding. -> B x C float."""
    if "masks" in batch:
        return torch.stack([m.flatten(1).any(1) for m in batch["masks"]]).float()
    return batch["labels"][:, 1:]


# ==== 6. Downstream datasets (segmentation / detection) =============================================================
# Readers for RSNA, SIIM, COVID rural, Object-CXR, NIH, a plain folder and the synthetic set, each after LoVT's
# philip-mueller/lovt:src/data/datasets/<dataset>/; the protocol is its src/models/downstream/downstream_evaluation.py.
#
#   read_records(name, root, task="seg"|"det", skip_bad=False, num_samples=None) -> (records, classes)
#   load_record(rec, image_size) -> dict(image uint8 S x S, mask bool C x S x S, boxes float32 N x 4, box_labels)
#   split_records(records, split_csv=None, seed=0, ratios=(0.6, 0.2, 0.2)) -> {"train","validate","test"}
#   take_fraction(records, fraction, seed=0) -> records   (1 % / 10 % / 100 % training subsets)
#   rle_decode(rle, h, w) / rle_encode(mask)            (SIIM relative, column-major RLE)
#
# A record is a plain dict, cheap to keep in memory for every image of a dataset; every reader builds it with
# _record, so every record has every key:
#   id        str, the image id (file stem; what LoVT's split CSVs list in their `ID` column)
#   patient   str or None, what the seeded split keeps together
#   path      image file (None for synthetic)
#   split     where the dataset fixes it (synthetic; Object-CXR dev = test), else None
#   height, width  original image size (from the file header, filled in by _check_record)
#   boxes     float32 N x 4, x1 y1 x2 y2 in original pixels;  box_labels int64 N (index into classes)
#   num_classes  len(classes), filled in by read_records
#   and how to build the mask: the one of these that is not None
#     rle     list of (where, rle string) OR-ed into channel 0 (SIIM)
#     mask_path  a single-channel image, nonzero = foreground, same size as the image (COVID rural, folder)
#     shapes  list of (type, coords) drawn into channel 0 (Object-CXR: 0 rectangle, 1 ellipse, 2 polygon)
#     synthetic  (split, index, n): rendered by SyntheticCXR(split, num_samples=n)
#     none of them: the boxes are filled, one channel per class (RSNA, NIH, boxes CSV)
#
# Every record then goes through the one check, _check_record (image header, mask size, RLE, boxes), and every
# problem is collected by _BadRecords: all of them are reported at once, or skipped and counted (skip_bad).
# Image preprocessing is LoVT's: zero-pad to a centred square, resize to S (masks nearest), boxes moved the
# same way; no augmentation. Normalization is left to the caller (dataset-level mean/std).
DOWNSTREAM_DATASETS = ("synthetic", "synthetic-faint", "rsna", "siim", "covid-rural", "object-cxr", "nih", "folder")
NIH_BOX_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia",
                   "Pneumothorax")  # LoVT TARGET_MAPPING order
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".dcm")  # when a stem exists twice, the earlier extension wins
_SYNTHETIC_RECORD_SIZE = 128  # synthetic records keep their boxes at SyntheticCXR's default size


# ---- RLE (SIIM train-rle.csv: relative starts, column-major pixel order) -------------------------------------------

def rle_decode(rle, h, w):
    """'start length start length ...' -> bool h x w. Each start counts from the end of the previous run;
    pixels are numbered down the columns (index = col*h + row). '-1' or '' = empty mask."""
    flat = np.zeros(h * w, dtype=bool)
    nums = rle.split()
    if not nums or nums == ["-1"]:
        return flat.reshape(w, h).T
    if len(nums) % 2:
        raise BadRecord(f"RLE has an odd number of values ({len(nums)})")
    pos = 0
    for start, length in zip(map(int, nums[0::2]), map(int, nums[1::2])):
        pos += start
        if start < 0 or length < 0 or pos + length > h * w:
            raise BadRecord(f"RLE runs past the {h}x{w} image (run at {pos}, length {length})")
        flat[pos:pos + length] = True
        pos += length
    return flat.reshape(w, h).T  # column-major: reshape to W x H then transpose


def rle_encode(mask):
    """bool h x w -> relative column-major RLE string ('-1' for an empty mask); inverse of rle_decode."""
    flat = np.concatenate([[0], mask.T.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))  # run starts and ends, alternating
    if len(edges) == 0:
        return "-1"
    starts, ends = edges[0::2], edges[1::2]
    gaps = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{g} {l}" for g, l in zip(gaps, ends - starts))


# ---- reading files -------------------------------------------------------------------------------------------------

def _index_images(folder):
    """{file stem: path} for every image under folder (recursive; SIIM hides files two levels down)."""
    found = []  # (stem, extension rank, path)
    for dirpath, _, files in os.walk(folder):
        for f in files:
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTS:
                found.append((stem, IMAGE_EXTS.index(ext.lower()), os.path.join(dirpath, f)))
    best = {stem: path for stem, _, path in sorted(found, reverse=True)}  # the best rank is written last
    return dict(sorted(best.items()))


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImportError("reading DICOM files needs pydicom: `pip install pydicom` "
                          "(or convert the images to PNG with the same file stems)") from None
    return pydicom


def image_shape(path):
    """(height, width) from the file header only."""
    try:
        if path.lower().endswith(".dcm"):
            ds = _pydicom().dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as im:
            return im.height, im.width
    except ImportError:
        raise
    except Exception as e:
        raise BadRecord(f"{path}: unreadable image ({e})") from None


def read_image(path):
    """PNG/JPG (grey, RGB(A), 16 bit: data.load_grayscale) or DICOM (8/16 bit, MONOCHROME1/2) -> uint8 H x W."""
    try:
        if not path.lower().endswith(".dcm"):
            return np.asarray(load_grayscale(path))  # RGB(A) scans are grey: luminance == channel mean
        ds = _pydicom().dcmread(path)
        x = ds.pixel_array.astype(np.float32)
        x = x.mean(-1) if x.ndim == 3 else x
        if x.max() > 255:  # more than 8 bits: scale by 255 / max (MGCA rescales every DICOM so, 8-bit ones too)
            x = x * (255.0 / float(x.max()))
        if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
            x = 255.0 - x
        return x.round().clip(0, 255).astype(np.uint8)
    except ImportError:
        raise
    except Exception as e:
        raise BadRecord(f"{path}: unreadable image ({e})") from None


def _floats(values, where):
    try:
        return [float(v) for v in values]
    except ValueError:
        raise BadRecord(f"{where}: not a number in {values}") from None


def _xywh(where, x, y, w, h):
    x, y, w, h = _floats([x, y, w, h], where)
    if w <= 0 or h <= 0:
        raise BadRecord(f"{where}: box with width/height <= 0")
    return [x, y, x + w, y + h]


def _record(id, path, patient=None, split=None, boxes=(), box_labels=(), height=None, width=None, rle=None,
            mask_path=None, shapes=None, synthetic=None):
    """The one record schema (see the top of this section); every reader builds its records here."""
    return dict(id=id, patient=patient, path=path, split=split, height=height, width=width,
                boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                box_labels=np.asarray(box_labels, dtype=np.int64).reshape(-1), num_classes=None,
                rle=rle, mask_path=mask_path, shapes=shapes, synthetic=synthetic)


# ---- one reader per dataset: each returns records (without image sizes) and class names ----------------------------

def _read_synthetic(num_samples, finding_contrast=1.0):
    """SyntheticCXR's own train/validate/test parts (60/20/20 of num_samples, default 500); record boxes at its
    128 px default, load_record renders at the requested size (the scene is drawn in resolution-free coordinates)."""
    num_samples = num_samples or 500
    counts = dict(train=round(0.6 * num_samples), validate=round(0.2 * num_samples))
    counts["test"] = max(num_samples - counts["train"] - counts["validate"], 1)
    records = []
    for split, n in counts.items():
        for i in range(n):
            r = _synthetic(split, n, _SYNTHETIC_RECORD_SIZE, finding_contrast).render(i)  # ~3 ms; again in load_record
            records.append(_record(f"synthetic-{split}-{i:05d}", None, split=split, boxes=r["boxes"],
                                   box_labels=r["box_labels"], height=_SYNTHETIC_RECORD_SIZE,
                                   width=_SYNTHETIC_RECORD_SIZE, synthetic=(split, i, n, finding_contrast)))
    return records, list(SYNTH_FINDINGS)


@lru_cache(maxsize=8)
def _synthetic(split, n, image_size, finding_contrast=1.0):
    return SyntheticCXR(split=split, num_samples=n, image_size=image_size, seed=0, finding_contrast=finding_contrast)


def _read_rsna(root, task, bad):
    csv_path = os.path.join(root, "stage_2_train_labels.csv")
    images_dir = os.path.join(root, "stage_2_train_images")
    images = _index_images(images_dir if os.path.isdir(images_dir) else root)
    by_patient = {}  # several rows per patient: one per box; Target 0 rows carry no box
    for line, row in _csv_rows(csv_path):
        where = f"{csv_path} line {line}"
        pid = row["patientId"]
        entry = by_patient.setdefault(pid, [])
        if row["Target"] == "1":
            box = bad(_xywh, where, row["x"], row["y"], row["width"], row["height"])
            if box is None:
                by_patient[pid] = None  # a patient with one bad box is dropped whole
            elif entry is not None:
                entry.append(box)
    return [_record(pid, images.get(pid), patient=pid, boxes=boxes, box_labels=[0] * len(boxes))
            for pid, boxes in by_patient.items() if boxes is not None], ["opacity"]


def _read_siim(root, task, bad):
    if task == "det":
        raise ValueError("siim has masks only (no boxes): use it with eval_seg.py")
    csv_path = os.path.join(root, "train-rle.csv")  # stage 1; stage 2's absolute RLE is not read
    images_dir = os.path.join(root, "dicom-images-train")
    images = _index_images(images_dir if os.path.isdir(images_dir) else root)
    rles = {}  # the header is "ImageId, EncodedPixels": _csv_table strips the spaces from names and values
    for line, row in _csv_rows(csv_path):
        rles.setdefault(row["ImageId"], []).append((f"{csv_path} line {line}", row["EncodedPixels"]))
    return [_record(i, images.get(i), rle=r) for i, r in rles.items()], ["pneumothorax"]


def _read_covid_rural(root, task, bad):
    if task == "det":
        raise ValueError("covid-rural has masks only (no boxes): use it with eval_seg.py")
    if os.path.isdir(os.path.join(root, "covid_rural_annot")):
        root = os.path.join(root, "covid_rural_annot")
    masks = _index_images(os.path.join(root, "pngs_masks"))
    records = []
    for stem, path in _index_images(os.path.join(root, "jpgs")).items():
        if stem not in masks:  # not every scan has a mask; LoVT skips those too
            bad.add(f"{path}: no mask in pngs_masks/")
            continue
        records.append(_record(stem, path, patient=stem.split("_")[0], mask_path=masks[stem]))
    return records, ["opacity"]


def _object_cxr_shapes(annotation, where):
    """'0 x1 y1 x2 y2;1 x1 y1 x2 y2;2 x1 y1 ... xn yn' -> (shapes, xyxy boxes)."""
    shapes, boxes = [], []
    for obj in filter(None, (o.strip() for o in annotation.split(";"))):
        kind, *coords = obj.split()
        xy = np.asarray(_floats(coords, where), dtype=np.float32).reshape(-1, 2) if len(coords) % 2 == 0 else None
        if kind not in ("0", "1", "2") or xy is None or (kind != "2" and len(xy) != 2) or len(xy) < 2:
            raise BadRecord(f"{where}: cannot parse object {obj!r}")
        x1, y1 = xy.min(0)
        x2, y2 = xy.max(0)
        if x2 <= x1 or y2 <= y1:
            raise BadRecord(f"{where}: empty object {obj!r}")
        shapes.append((int(kind), xy.reshape(-1).tolist()))
        boxes.append([x1, y1, x2, y2])  # polygons: their bounding box (LoVT); no w/h swap
    return shapes, boxes


def _read_object_cxr(root, task, bad):
    if os.path.isdir(os.path.join(root, "input")):  # LoVT keeps the data under object-CXR/input/
        root = os.path.join(root, "input")
    records = []
    for part, split in (("train", None), ("dev", "test")):  # dev.csv is the test set (LoVT and MGCA)
        images = _index_images(os.path.join(root, part))
        csv_path = os.path.join(root, f"{part}.csv")
        for line, row in _csv_rows(csv_path):
            name = row.get("image_name") or row["image_path"]
            stem = os.path.splitext(os.path.basename(name))[0]
            parsed = bad(_object_cxr_shapes, row.get("annotation", ""), f"{csv_path} line {line}")
            if parsed is not None:
                shapes, boxes = parsed
                records.append(_record(stem, images.get(stem), split=split, boxes=boxes, box_labels=[0] * len(boxes),
                                       shapes=shapes))
    return records, ["foreign object"]


def _read_nih(root, task, bad, n_negatives=100, seed=0):
    csv_path = os.path.join(root, "BBox_List_2017.csv")
    images = _index_images(root)
    boxes = {}
    with open(csv_path, newline="") as f:
        rows = csv.reader(f)
        next(rows)  # malformed header "Image Index,Finding Label,Bbox [x,y,w,h],,,": read by position
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            where = f"{csv_path} line {line}"
            name, label, *xywh = row[:6]
            if label not in NIH_BOX_CLASSES:
                bad.add(f"{where}: unknown finding {label!r}")
                continue
            box = bad(_xywh, where, *xywh)
            if box is not None:
                boxes.setdefault(name, []).append((box, NIH_BOX_CLASSES.index(label)))
    names = list(boxes) + _nih_negatives(root, exclude=boxes, n=n_negatives, seed=seed)
    return [_record(os.path.splitext(n)[0], images.get(os.path.splitext(n)[0]), patient=n.split("_")[0],
                    boxes=[b for b, _ in boxes.get(n, [])], box_labels=[c for _, c in boxes.get(n, [])])
            for n in names], list(NIH_BOX_CLASSES)


def _nih_negatives(root, exclude, n, seed):
    """LoVT adds n "No Finding" images of the official test list as negatives, when those files are there."""
    entry, test_list = os.path.join(root, "Data_Entry_2017_v2020.csv"), os.path.join(root, "test_list.txt")
    if not os.path.exists(entry):
        entry = os.path.join(root, "Data_Entry_2017.csv")
    if not (n and os.path.exists(entry) and os.path.exists(test_list)):
        return []
    test = set(open(test_list).read().split())
    free = sorted(name for name, finding in ((r["Image Index"], r["Finding Labels"]) for _, r in _csv_rows(entry))
                  if finding == "No Finding" and name in test and name not in exclude)
    return random.Random(seed).sample(free, min(n, len(free)))


def _read_folder(root, task, bad):
    """root/images/* with root/masks/<same stem>.png (seg), or a boxes CSV `image,x,y,w,h,label`
    (root/boxes.csv or the CSV path itself; rows with an empty x are images without boxes)."""
    csv_path = root if root.endswith(".csv") else os.path.join(root, "boxes.csv")
    base = os.path.dirname(csv_path) if root.endswith(".csv") else root
    images_dir = os.path.join(base, "images")
    images = _index_images(images_dir if os.path.isdir(images_dir) else base)
    masks_dir = os.path.join(base, "masks")
    if os.path.isdir(masks_dir) and (task == "seg" or not os.path.exists(csv_path)):
        if task == "det":
            raise ValueError(f"{base}: masks/ only, detection needs a boxes CSV (image,x,y,w,h,label)")
        masks = _index_images(masks_dir)
        for stem, path in images.items():
            if stem not in masks:
                bad.add(f"{path}: no mask with the same stem in {masks_dir}")
        return [_record(stem, path, mask_path=masks[stem]) for stem, path in images.items() if stem in masks], ["mask"]
    rows = _csv_rows(csv_path)
    classes = sorted({r["label"] for _, r in rows if r.get("x")})
    per_image = {}
    for line, row in rows:
        stem = os.path.splitext(os.path.basename(row["image"]))[0]
        entry = per_image.setdefault(stem, ([], []))
        if row.get("x"):
            box = bad(_xywh, f"{csv_path} line {line}", row["x"], row["y"], row["w"], row["h"])
            if box is not None:
                entry[0].append(box)
                entry[1].append(classes.index(row["label"]))
    return [_record(stem, images.get(stem), boxes=b, box_labels=l) for stem, (b, l) in per_image.items()], classes


_READERS = {"rsna": _read_rsna, "siim": _read_siim, "covid-rural": _read_covid_rural, "object-cxr": _read_object_cxr,
            "nih": _read_nih, "folder": _read_folder}


def read_records(name, root, task="seg", skip_bad=False, num_samples=None):
    """Read a downstream dataset -> (records, class names). Every record is checked against its image header
    (missing / unreadable image, mask of another size, RLE past the image, box outside the image beyond 1 px):
    all problems are reported at once in one BadRecord (the first 20, each naming its file and row, and the
    count), or with skip_bad=True the bad records are skipped and their count is printed. num_samples: number
    of synthetic images (60/20/20 over SyntheticCXR's train/validate/test parts); root: the dataset folder
    (unused for synthetic)."""
    if name not in DOWNSTREAM_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {DOWNSTREAM_DATASETS}")
    if task not in ("seg", "det"):
        raise ValueError(f"task must be 'seg' or 'det', not {task!r}")
    bad = _BadRecords(root or name, skip_bad)
    if name in SYNTHETIC_CONTRAST:
        records, classes = _read_synthetic(num_samples, SYNTHETIC_CONTRAST[name])
    elif not root or not os.path.exists(root):
        raise FileNotFoundError(f"{name}: data root {root!r} does not exist")
    else:
        records, classes = _READERS[name](root, task, bad)
    checked = [r for r in (bad(_check_record, rec) for rec in records) if r is not None]
    bad.finish()
    if not checked:
        raise ValueError(f"{name}: no usable records under {root}")
    for rec in checked:
        rec["num_classes"] = len(classes)
    return checked, classes


def _check_record(rec):
    """Fill in height/width from the image header and validate everything that depends on them."""
    if rec["synthetic"]:
        return rec  # rendered on demand: nothing on disk to check
    if rec["path"] is None or not os.path.exists(rec["path"]):
        raise BadRecord(f"image {rec['id']!r}: missing image file (looked for {'/'.join(IMAGE_EXTS)})")
    h, w = image_shape(rec["path"])
    for where, rle in rec["rle"] or ():
        try:
            rle_decode(rle, h, w)
        except (BadRecord, ValueError) as e:
            raise BadRecord(f"{where} ({rec['path']}): {e}") from None
    if rec["mask_path"]:
        mh, mw = image_shape(rec["mask_path"])
        if (mh, mw) != (h, w):
            raise BadRecord(f"{rec['mask_path']}: mask is {mh}x{mw}, image {rec['path']} is {h}x{w}")
    b = rec["boxes"]
    if len(b) and (b[:, :2].min() < -1 or b[:, 2].max() > w + 1 or b[:, 3].max() > h + 1):
        raise BadRecord(f"{rec['path']}: box outside the {w}x{h} image: {b.tolist()}")
    rec["boxes"] = np.stack([b[:, 0].clip(0, w), b[:, 1].clip(0, h), b[:, 2].clip(0, w), b[:, 3].clip(0, h)], 1)
    rec["height"], rec["width"] = h, w
    return rec


# ---- one record -> arrays at the evaluation size -------------------------------------------------------------------

def _fill_boxes(boxes, labels, num_classes, h, w):
    """Box masks as LoVT builds them: mask[round(y1):round(y2), round(x1):round(x2)] = 1, one channel per class."""
    mask = np.zeros((num_classes, h, w), dtype=bool)
    for (x1, y1, x2, y2), c in zip(boxes.tolist(), labels.tolist()):
        mask[c, round(y1):round(y2), round(x1):round(x2)] = True
    return mask


def _draw_shapes(shapes, h, w):
    """Object-CXR objects filled with PIL: rectangle, ellipse (inside its box), polygon."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for kind, c in shapes:
        if kind == 0:
            draw.rectangle(c, fill=1)
        elif kind == 1:
            draw.ellipse(c, fill=1)
        else:
            draw.polygon(c, fill=1)
    return np.asarray(canvas, dtype=bool)[None]


def _read_mask(rec, h, w):
    """The record's mask at the original resolution: bool C x h x w."""
    if rec["rle"] is not None:
        mask = np.zeros((h, w), dtype=bool)
        for where, rle in rec["rle"]:  # several rows per image are OR-combined
            try:
                mask |= rle_decode(rle, h, w)
            except ValueError as e:
                raise BadRecord(f"{where} ({rec['path']}): {e}") from None
        return mask[None]
    if rec["mask_path"]:
        with Image.open(rec["mask_path"]) as im:
            mask = np.asarray(im.convert("L")) > 0  # COVID rural masks are 0/1, others 0/255
        if mask.shape != (h, w):
            raise BadRecord(f"{rec['mask_path']}: mask is {mask.shape[0]}x{mask.shape[1]}, image is {h}x{w}")
        return mask[None]
    if rec["shapes"] is not None:
        return _draw_shapes(rec["shapes"], h, w)
    return _fill_boxes(rec["boxes"], rec["box_labels"], rec["num_classes"], h, w)


def pad_resize(image, mask, boxes, image_size):
    """Zero-pad to a centred square, resize to S x S, S = image_size (image bilinear, mask nearest), move the
    boxes."""
    h, w = image.shape
    side, out = max(h, w), (image_size, image_size)
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((top, side - h - top), (left, side - w - left))
    image = np.asarray(Image.fromarray(np.pad(image, pad)).resize(out, Image.BILINEAR))
    mask = np.stack([np.asarray(Image.fromarray(np.pad(m, pad)).resize(out, Image.NEAREST))
                     for m in mask]) if len(mask) else np.zeros((0, *out), dtype=bool)
    boxes = (boxes + np.array([left, top, left, top], dtype=np.float32)) * (image_size / side)
    return image, mask, boxes.astype(np.float32)


def load_record(rec, image_size):
    """-> dict(image=uint8 S x S, mask=bool C x S x S, boxes=float32 N x 4 (in the S x S frame), box_labels=int64
    N), S = image_size. Raises BadRecord naming the file when the image or mask cannot be used."""
    if rec["synthetic"]:
        split, index, n, finding_contrast = rec["synthetic"]
        r = _synthetic(split, n, image_size, finding_contrast).render(index)  # already S x S
        return dict(image=r["pixels"], mask=r["masks"], boxes=r["boxes"], box_labels=r["box_labels"])
    image = read_image(rec["path"])
    h, w = image.shape
    if (h, w) != (rec["height"], rec["width"]):
        raise BadRecord(f"{rec['path']}: image is {h}x{w}, its header said {rec['height']}x{rec['width']}")
    image, mask, boxes = pad_resize(image, _read_mask(rec, h, w), rec["boxes"], image_size)
    return dict(image=image, mask=mask, boxes=boxes, box_labels=rec["box_labels"])


# ---- splits and label fractions ------------------------------------------------------------------------------------

def _read_split_csv(split_csv):
    """{id: split}, in file order. Accepts LoVT's shipped split folder (train.csv, validation.csv, test.csv,
    each with an `ID` column; any one of those files names the folder) or one CSV with an id column
    (`ID`, `id` or `image`) and a `split` column (train / validation|validate|val / test)."""
    folder = split_csv if os.path.isdir(split_csv) else os.path.dirname(split_csv)
    lovt = [os.path.join(folder, f"{s}.csv") for s in ("train", "validation", "test")]
    if (os.path.isdir(split_csv) or os.path.basename(split_csv) in ("train.csv", "validation.csv", "test.csv")) \
            and all(map(os.path.exists, lovt)):
        return {row["ID"]: split for path, split in zip(lovt, SPLITS) for _, row in _csv_rows(path)}
    out = {}
    for line, row in _csv_rows(split_csv):
        key = next((k for k in ("ID", "id", "image") if k in row), None)
        if key is None or "split" not in row or row["split"].lower() not in _SPLIT_NAMES:
            raise ValueError(f"{split_csv} line {line}: need an ID/id/image column and a split column "
                             "(train/validation/test), or LoVT's train.csv/validation.csv/test.csv folder")
        out[row[key]] = _SPLIT_NAMES[row["split"].lower()]
    return out


def split_records(records, split_csv=None, seed=0, ratios=(0.6, 0.2, 0.2)):
    """-> {"train": [...], "validate": [...], "test": [...]}.
    split_csv: the listed ids (file stems; a listed 'x.png' also matches 'x') in the file's order; records not
    listed are dropped and both mismatch counts are printed. Otherwise records that carry a fixed `split` keep
    it, and the rest are shuffled with `seed` in groups BY PATIENT (by image where patient is None) and cut by
    `ratios` over the splits left free (Object-CXR: dev = test, train.csv -> train/validate 75/25 with the
    default ratios; LoVT used 80/20, pass its split files to match)."""
    out = {s: [] for s in SPLITS}
    if split_csv:
        wanted = {os.path.splitext(k)[0] if k.lower().endswith(IMAGE_EXTS) else k: v
                  for k, v in _read_split_csv(split_csv).items()}
        by_id = {r["id"]: r for r in records}
        for i, split in wanted.items():
            if i in by_id:
                out[split].append(by_id[i])
        missing = sum(i not in by_id for i in wanted)
        unlisted = sum(r["id"] not in wanted for r in records)
        if missing or unlisted:
            print(f"split_records: {missing} ids of {split_csv} have no record, {unlisted} records are not listed",
                  file=sys.stderr)
        return out
    free = []
    for r in records:
        (out[r["split"]] if r.get("split") else free).append(r)
    groups = {}
    for r in free:
        groups.setdefault(r["patient"] if r["patient"] is not None else "id:" + r["id"], []).append(r)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    open_splits = [s for s in SPLITS if not out[s]] if free else []
    weights = np.array([ratios[SPLITS.index(s)] for s in open_splits], dtype=float)
    bounds = np.cumsum(weights / weights.sum()) * len(free) if open_splits else []
    done = 0
    for k in keys:  # a patient goes to the split whose share is not yet full
        split = open_splits[min(int(np.searchsorted(bounds, done, side="right")), len(open_splits) - 1)]
        out[split].extend(groups[k])
        done += len(groups[k])
    return out


def take_fraction(records, fraction, seed=0):
    """The first int(fraction * n) records of a seeded shuffle (seed=None: of the given order, which is
    LoVT's convention with its split files: RSNA 1 % = the first 160 rows of train.csv). Order is kept."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = int(fraction * len(records) + 1e-9)
    if n == 0:
        raise ValueError(f"fraction {fraction} of {len(records)} training records leaves none")
    if fraction == 1 or seed is None:
        return list(records[:n])
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


# ==== 7. CLI: demo, prepare-mimic ===================================================================================
_OUTLINE_COLORS = ((255, 80, 80), (255, 220, 0), (80, 160, 255), (0, 230, 120), (230, 80, 255))


def demo(out, n=8, image_size=256, seed=0):
    """Print n synthetic reports and write out/synthetic_demo.png: the images with mask outlines coloured
    per finding type (legend in the printout)."""
    os.makedirs(out, exist_ok=True)
    ds = SyntheticCXR("train", num_samples=n, image_size=image_size, seed=seed)
    tiles = []
    for i in range(n):
        r = ds.render(i)
        rgb = np.repeat(r["pixels"][:, :, None], 3, 2)
        for t, color in enumerate(_OUTLINE_COLORS):
            m = r["masks"][t]
            inner = m.copy()
            inner[1:-1, 1:-1] = m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] & m[1:-1, 1:-1]
            rgb[m & ~inner] = color
        tiles.append(rgb)
        print(f"--- image {i}: {[SYNTH_FINDINGS[t] for t in r['box_labels']] or 'normal'}")
        print("  " + " ".join(r["sentences"]))
    cols = min(4, n)
    tiles += [np.zeros_like(tiles[0])] * (-n % cols)  # fill the last row
    grid = np.concatenate([np.concatenate(tiles[k:k + cols], 1) for k in range(0, len(tiles), cols)], 0)
    path = os.path.join(out, "synthetic_demo.png")
    Image.fromarray(grid).save(path)
    print("outline colours:", dict(zip(SYNTH_FINDINGS, _OUTLINE_COLORS)))
    print("wrote", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="print synthetic reports, write a PNG grid with mask outlines")
    p.add_argument("--out", default="runs/data_demo")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: demo(a.out, a.n, a.image_size, a.seed))
    add_mimic_commands(sub)  # registers prepare-mimic (sets `func`)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

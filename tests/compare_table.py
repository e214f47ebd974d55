"""The five methods side by side: build the comparison tables from a results folder.

    python tests/compare_table.py RESULTS [--out RESULTS/table.md]

RESULTS is what tests/compare.sh writes:

    RESULTS/seed<k>/<run>/eval.json     the method's held-out metrics, one layout for every method (common.
                                        save_results): "trained": {"retrieval", "zero_shot", "checks"}
    RESULTS/seed<k>/<run>/args.json     the run's arguments (LRCLR's "init": the base it fine-tuned)
    RESULTS/seed<k>/<run>/metrics.csv   its last perf/cpu_s: the CPU seconds of the training loop (without the
                                        start-up and the evaluation; LRCLR: plus its --init's)
    RESULTS/seed<k>/<run>/seg.json      eval_seg.py's rows for its export (row "encoder" = <run>), det.json eval_det's
                                        (none for the ablation runs)
    RESULTS/random/seg.json, det.json   the random-init encoders, over the harness's own seeds
    RESULTS/seed<k>/untrained-<method>/, positive-<method>/   CONTROLS=1: the method's architecture untrained and
                                        trained on the findings' masks (tests/positive_control.py), seg.json only

Every cell is the mean over pre-training seeds (for a random encoder: over harness seeds) ± the half-width of the
95 % Student-t interval (t_{0.975, n-1} s / sqrt(n): with 3 seeds the normal 1.96 would understate it by a factor
2.2); a cell without data is "–". The methods' own retrieval scores are comparable because every method evaluates
the same 300 test pairs as one gallery; the zero-shot AUC is the mean of each method's own scoring (RECLF: its
"both" similarity, LRCLR: its global + local one), which its eval.json puts under "trained".
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np

# t_{0.975, df} for df = 1 .. 10; more seeds than that use the normal quantile's neighbourhood (2.2 at df 10)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]

COLUMNS = [  # (header, where the value comes from, key)
    ("i2t R@1", "eval", "i2t_R@1"), ("i2t R@5", "eval", "i2t_R@5"), ("i2t R@10", "eval", "i2t_R@10"),
    ("t2i R@1", "eval", "t2i_R@1"), ("t2i R@5", "eval", "t2i_R@5"), ("t2i R@10", "eval", "t2i_R@10"),
    ("zero-shot AUC", "eval", "auc_mean"), ("seg Dice", "seg", "dice"), ("det mAP", "det", "map"),
    ("i2t P@1", "eval", "i2t_P@1"), ("i2t P@5", "eval", "i2t_P@5"), ("i2t P@10", "eval", "i2t_P@10"),  # RECLF's
]
CLASSES = ["opacity", "nodule", "effusion", "pneumothorax", "cardiomegaly"]  # data.SYNTH_FINDINGS
COLUMNS += [(c, "seg", f"dice/{c}") for c in CLASSES]  # per-class Dice of the segmentation head
MAIN_COLUMNS = [h for h, _, _ in COLUMNS if "P@" not in h and h not in CLASSES]
# the ablations are judged by eval_seg only; RECLF's ladder reads Precision@K on the single-finding test pairs
CLAIM_COLUMNS = ["i2t R@1", "i2t R@10", "t2i R@10", "zero-shot AUC", "i2t P@1", "i2t P@5", "i2t P@10", "seg Dice"]


def interval(values) -> tuple[float, float]:
    """(mean, 95 % Student-t half-width) of the finite values; (nan, nan) without any, half-width nan for one."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return math.nan, math.nan
    if len(v) == 1:
        return float(v[0]), math.nan
    t = T975[len(v) - 2] if len(v) - 1 <= len(T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def _json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _training_cpu_seconds(run: str):
    """perf/cpu_s of the last metrics.csv row: the CPU seconds of the training loop (common.Logger)."""
    path = os.path.join(run, "metrics.csv")
    if not os.path.exists(path):
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/cpu_s")]
    return float(rows[-1]["perf/cpu_s"]) if rows else None


def method_metrics(run: str) -> dict:
    """The trained model's held-out metrics of a run folder: its retrieval (i2t_R@k, t2i_R@k), checks (RECLF's
    i2t_P@k) and mean zero-shot AUC (auc_mean)."""
    trained = (_json(os.path.join(run, "eval.json")) or {}).get("trained", {})
    out = {**trained.get("retrieval", {}), **trained.get("checks", {})}
    if "mean" in trained.get("zero_shot", {}):
        out["auc_mean"] = trained["zero_shot"]["mean"][0]
    return out


def cpu_seconds(run: str):
    """The CPU seconds of the run's training loop plus those of the run it started from (LRCLR's base), None if
    not recorded."""
    own = _training_cpu_seconds(run)
    init = (_json(os.path.join(run, "args.json")) or {}).get("init")
    if own is not None and init:
        base = _training_cpu_seconds(init)
        own = None if base is None else own + base
    return own


def _rows(*paths):
    return [row for p in paths for row in (_json(p) or [])]


def _harness(rows, encoder, key, **match):
    """The per-seed values of `key` in the harness row of `encoder` (seg: the given head, frozen), [] if none."""
    for row in rows:
        if row.get("encoder") == encoder and all(row.get(k) == v for k, v in match.items()) and key in row:
            cell = row[key]
            return list(cell["values"]) if isinstance(cell, dict) else [cell]
    return []


def collect(root: str, head: str = "hypercolumn") -> dict:
    """{encoder: {column header: [one value per seed], "seconds": [...], "seeds": n}} from a results folder; seg
    columns from eval_seg's rows of `head` (compare.sh's SEG_HEAD), frozen."""
    table = {}

    def cell(encoder):
        return table.setdefault(encoder, {**{h: [] for h, _, _ in COLUMNS}, "seconds": [], "seeds": 0})

    random = os.path.join(root, "random")
    seg, det = _rows(os.path.join(random, "seg.json")), _rows(os.path.join(random, "det.json"))
    for encoder in dict.fromkeys(r["encoder"] for r in seg + det):
        cells = cell(encoder)
        cells["seg Dice"] = _harness(seg, encoder, "dice", head=head, mode="frozen")
        for c in CLASSES:
            cells[c] = _harness(seg, encoder, f"dice/{c}", head=head, mode="frozen")
        cells["det mAP"] = _harness(det, encoder, "map", mode="frozen")
        cells["seeds"] = max(len(cells["seg Dice"]), len(cells["det mAP"]))
    for seed in sorted(d for d in os.listdir(root) if d.startswith("seed")):
        folder = os.path.join(root, seed)
        # a run counts once its eval.json is written (a run still training, or killed, is not a seed yet); a control
        # once it is judged
        done = lambda d: any(os.path.isfile(os.path.join(folder, d, f)) for f in ("eval.json", "seg.json"))  # noqa
        for run in sorted(d for d in os.listdir(folder) if done(d)):
            metrics, cells = method_metrics(os.path.join(folder, run)), cell(run)
            seg, det = (_rows(os.path.join(folder, run, f"{task}.json")) for task in ("seg", "det"))
            for header, source, key in COLUMNS:
                if source == "eval":
                    value = metrics.get(key)
                else:
                    values = _harness(seg, run, key, head=head, mode="frozen") if source == "seg" else \
                        _harness(det, run, "map", mode="frozen")
                    value = float(np.mean(values)) if values else None
                cells[header].append(None if value is None else float(value))
            cells["seconds"].append(cpu_seconds(os.path.join(folder, run)))
            cells["seeds"] += 1
    return table


def _cell(values, percent=False) -> str:
    mean, half = interval(values)
    if math.isnan(mean):
        return "–"
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {scale * half:.{digits}f}")


MAIN = ("random-resnet18", "random-vit_tiny", "lovt", "joimternet", "lrclr-base", "lrclr", "reclf", "place")


def markdown(table: dict, encoders, columns=MAIN_COLUMNS) -> str:
    """One Markdown table, a row per encoder; retrieval, precision and AUC as fractions, Dice and mAP in %."""
    headers = ["encoder", "seeds", "pre-training CPU s"] + list(columns)
    source = {h: s for h, s, _ in COLUMNS}
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for encoder in encoders:
        cells = table[encoder]
        seconds = interval(cells["seconds"])[0]
        row = [encoder, str(cells["seeds"]), "–" if math.isnan(seconds) else f"{seconds:.0f}"]
        row += [_cell(cells[h], percent=source[h] != "eval") for h in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _is_control(encoder):
    return encoder.startswith(("untrained-", "positive-"))


def calibration(table: dict) -> list:
    """Per architecture with both controls: per class, the positive control's lead over the untrained one against
    three times the larger seed standard deviation of the two -> lines "<method>: <class> lead ± ... PASS|FAIL"."""
    lines = []
    for positive in [e for e in table if e.startswith("positive-")]:
        untrained = "untrained-" + positive.split("-", 1)[1]
        if untrained not in table:
            continue
        verdicts = []
        for c in ["seg Dice"] + CLASSES:
            pos, neg = ([v for v in table[e][c] if v is not None] for e in (positive, untrained))
            if len(pos) < 2 or len(neg) < 2:
                continue
            lead, spread = 100 * (np.mean(pos) - np.mean(neg)), 100 * max(np.std(pos, ddof=1), np.std(neg, ddof=1))
            verdicts.append(f"{c} {lead:+.1f} (3 sd {3 * spread:.1f}) {'PASS' if lead > 3 * spread else 'FAIL'}")
        lines.append(f"{positive.split('-', 1)[1]}'s architecture, positive - untrained Dice: " + "; ".join(verdicts))
    return lines


# the architecture whose controls judge a run (by the run's method, the name's first part)
ARCHITECTURE = dict(lovt="lovt", lrclr="lovt", reclf="lovt", joimternet="joimternet", place="place")
# each paper's claim as (the run with the part, the run without it, the metric the paper reports it on)
CLAIMS = [("lovt", "lovt-no-local", "seg Dice"), ("lovt", "lovt-no-smoothing", "seg Dice"),
          ("lovt", "lovt-uniform-weights", "seg Dice"), ("joimternet", "joimternet-no-local", "i2t R@10"),
          ("joimternet", "joimternet-no-local", "t2i R@10"), ("lrclr", "lrclr-base", "zero-shot AUC"),
          ("reclf-srm", "reclf-gloria", "zero-shot AUC"), ("reclf-irm", "reclf-gloria", "zero-shot AUC"),
          ("reclf", "reclf-gloria", "zero-shot AUC"), ("reclf", "reclf-gloria", "i2t P@1"),
          ("place", "place-ita-tca", "seg Dice"), ("place", "place-no-cce", "seg Dice"),
          ("place", "place-no-pcma", "seg Dice")]


def paired(table: dict, better: str, worse: str, metric: str):
    """The claim `better` > `worse` on `metric`, paired by seed -> a Markdown row: per seed "better / worse", the
    mean gain ± its 95 % Student-t half-width, and the verdict: "holds" (the interval excludes 0 on the claimed
    side), "every seed" (same sign on all seeds, interval wider), "not shown"; None without two paired seeds."""
    pairs = [(b, w) for b, w in zip(table[better][metric], table[worse][metric]) if b is not None and w is not None]
    if len(pairs) < 2:
        return None
    scale, digits = (100, 1) if metric == "seg Dice" or metric in CLASSES else (1, 3)
    gains = [scale * (b - w) for b, w in pairs]
    mean, half = interval(gains)
    verdict = "holds" if mean - half > 0 else "every seed" if min(gains) > 0 else "not shown"
    seeds = ", ".join(f"{scale * b:.{digits}f} / {scale * w:.{digits}f}" for b, w in pairs)
    return f"| {better} > {worse} | {metric} | {seeds} | {mean:+.{digits}f} ± {half:.{digits}f} | {verdict} |"


def paired_tables(table: dict) -> str:
    """Every method against its architecture's untrained control (seg Dice and the per-class Dice), then each
    claim; rows only where both runs are there."""
    header = "| claim | metric | per seed (first / second) | gain, mean ± 95 % | verdict |\n|---|---|---|---|---|\n"
    control = {run: "untrained-" + ARCHITECTURE[run.split("-")[0]] for run in MAIN
               if run in table and run.split("-")[0] in ARCHITECTURE}
    own = [paired(table, run, untrained, metric) for run, untrained in control.items() if untrained in table
           for metric in ["seg Dice"] + CLASSES]
    claims = [paired(table, *claim) for claim in CLAIMS if claim[0] in table and claim[1] in table]
    text = ""
    if any(own):
        text += "\n\nEach method against its own untrained architecture (Dice, %):\n\n" + header
        text += "\n".join(r for r in own if r)
    if any(claims):
        text += "\n\nThe papers' claims, paired by seed:\n\n" + header + "\n".join(r for r in claims if r)
    return text


def tables(table: dict) -> str:
    """The side-by-side table (MAIN's encoders that are there), then, if any ablation runs are there, the claims
    table: each method's full run followed by its ablations (runs named <method>-<ablation>); then, if controls are
    there, every encoder's per-class Dice with the controls first and the protocol's calibration; then the paired
    tables: each run against its untrained architecture, each claim."""
    main = [e for e in MAIN if e in table]
    text = markdown(table, main)
    ablations = [e for e in table if e not in MAIN and not _is_control(e)]
    if ablations:
        methods = list(dict.fromkeys(e.split("-")[0] for e in ablations))
        rows = [e for m in methods
                for e in ([m] if m in table else []) + [a for a in ablations if a.split("-")[0] == m]]
        text += "\n\nClaims (ablations; same seeds and budget):\n\n" + markdown(table, rows, CLAIM_COLUMNS)
    controls = [e for e in table if _is_control(e)]
    if controls:
        rows = sorted(controls, key=lambda e: (e.split("-", 1)[1], e)) + [e for e in table if not _is_control(e)]
        text += ("\n\nControls and per-class Dice (%):\n\n" + markdown(table, rows, ["seg Dice"] + CLASSES)
                 + "\n\n" + "\n".join(calibration(table)))
    return text + paired_tables(table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the results folder tests/compare.sh wrote")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument("--head", default="hypercolumn", help="the eval_seg head whose Dice to show (SEG_HEAD)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        sys.exit(f"{args.results}: no such results folder (tests/compare.sh writes it)")
    text = tables(collect(args.results, args.head))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()

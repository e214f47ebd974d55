"""The five methods side by side: build the comparison table from a results folder.

    python tests/compare_table.py RESULTS [--out RESULTS/table.md]

RESULTS holds one folder per encoder and one per pre-training seed, as tests/compare.sh writes them:

    RESULTS/<encoder>/seed<k>/eval.json   the method's held-out table ({"untrained": {...}, "trained": {...}});
                                          absent for the random-init encoder, which has no text side
    RESULTS/<encoder>/seed<k>/seconds     wall seconds of the pre-training
    RESULTS/<encoder>/seed<k>/seg.json    eval_seg.py --out .../seg (rows; the frozen linear head is used)
    RESULTS/<encoder>/seed<k>/det.json    eval_det.py --out .../det (rows; the frozen detector is used)

Every cell is the mean over seeds ± the half-width of the 95 % Student-t interval (t_{0.975, n-1} s / sqrt(n):
with 3 seeds the normal 1.96 would understate it by a factor 2.2); a cell without data is "–".
"""
import argparse
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
]


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


def _eval_row(rows, **match):
    """The harness row matching every key (e.g. head=linear, mode=frozen), or None."""
    for row in rows or []:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _harness_value(row, key):
    """One number from an eval_seg / eval_det row: the mean over its own seeds (the harness writes
    {"values": [...], "mean": m, "ci95": h} for every per-seed metric)."""
    if row is None or key not in row:
        return None
    cell = row[key]
    return float(cell["mean"]) if isinstance(cell, dict) else float(cell)


def collect(root: str) -> dict:
    """{encoder: {column header: [one value per seed], "seconds": [...], "seeds": n}} from a results folder."""
    table = {}
    for encoder in sorted(os.listdir(root)):
        folder = os.path.join(root, encoder)
        seeds = sorted(s for s in os.listdir(folder) if s.startswith("seed")) if os.path.isdir(folder) else []
        if not seeds:
            continue
        cells = {header: [] for header, _, _ in COLUMNS}
        cells["seconds"] = []
        for seed in seeds:
            run = os.path.join(folder, seed)
            trained = (_json(os.path.join(run, "eval.json")) or {}).get("trained", {})
            seg = _eval_row(_json(os.path.join(run, "seg.json")), head="linear", mode="frozen")
            det = _eval_row(_json(os.path.join(run, "det.json")), mode="frozen")
            for header, source, key in COLUMNS:
                value = trained.get(key) if source == "eval" else _harness_value(seg if source == "seg" else det, key)
                cells[header].append(None if value is None else float(value))
            seconds = os.path.join(run, "seconds")
            if os.path.exists(seconds):
                with open(seconds) as f:
                    cells["seconds"].append(float(f.read().strip()))
        cells["seeds"] = len(seeds)
        table[encoder] = cells
    return table


def _cell(values, percent=False) -> str:
    mean, half = interval(values)
    if math.isnan(mean):
        return "–"
    scale = 100 if percent else 1
    digits = 1 if percent else 3
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {scale * half:.{digits}f}")


def markdown(table: dict) -> str:
    """One Markdown table: a row per encoder; retrieval and AUC as fractions, Dice and mAP in %."""
    headers = ["encoder", "seeds", "pre-training s"] + [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for encoder, cells in table.items():
        seconds = interval(cells["seconds"])[0]
        row = [encoder, str(cells["seeds"]), "–" if math.isnan(seconds) else f"{seconds:.0f}"]
        row += [_cell(cells[h], percent=source != "eval") for h, source, _ in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the results folder tests/compare.sh wrote")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        sys.exit(f"{args.results}: no such results folder (tests/compare.sh writes it)")
    text = markdown(collect(args.results))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()

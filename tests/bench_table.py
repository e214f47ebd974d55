"""The benchmark table of tests/gpu_bench.sh: one row per method configuration, with its overhead ratio.

    python tests/bench_table.py OUT

OUT holds, per configuration LABEL (e.g. `lovt paper bf16`, spaces as `_`), what the runs printed:
    LABEL.txt       the method's `--bench N` output, whose `bench:` line gives images/s, data wait and peak memory
    LABEL.enc.txt   tests/bench_encoders.py at the same encoders, image size, batch and precision (optional)
The ratio is the method's step time over the bare encoders' forward + backward: 1.0 = the method costs nothing
beyond its encoders. A run that printed no `bench:` line (out of memory, a crash) is a row that says so.
"""
import argparse
import os
import re
import sys

BENCH = re.compile(r"bench: ([\d.]+) images/s \(([\d.]+) s per step of (\d+) images\), data wait (\d+) %, "
                   r"peak memory (\d+) MB \(([^)]*)\)")


def parse(path: str):
    """(images/s, s per step, images per step, data wait %, peak MB, device text) of the last bench: line, or
    None when the file is missing or has none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = BENCH.findall(f.read())
    if not found:
        return None
    speed, step, images, wait, peak, device = found[-1]
    return float(speed), float(step), int(images), int(wait), int(peak), device


def table(folder: str) -> str:
    labels = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt") and not f.endswith(".enc.txt"))
    lines = ["| configuration | images/s | s per step (images) | data wait | peak memory | bare encoders s per step "
             "| ratio |", "|---|---|---|---|---|---|---|"]
    for label in labels:
        run, enc = parse(os.path.join(folder, label + ".txt")), parse(os.path.join(folder, label + ".enc.txt"))
        name = label.replace("_", " ")
        if run is None:
            lines.append(f"| {name} | no result (see {label}.txt) | | | | | |")
            continue
        speed, step, images, wait, peak, _ = run
        enc_step = "–" if enc is None else f"{enc[1]:.3f}"
        ratio = "–" if enc is None or enc[2] != images else f"{step / enc[1]:.2f}"
        lines.append(f"| {name} | {speed:.1f} | {step:.3f} ({images}) | {wait} % | {peak / 1024:.1f} GB | {enc_step} "
                     f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the output folder of tests/gpu_bench.sh")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.folder):
        sys.exit(f"{args.folder}: no such folder (tests/gpu_bench.sh writes it)")
    text = table(args.folder)
    print(text)
    return text


if __name__ == "__main__":
    main()

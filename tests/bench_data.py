"""Throughput of data.py, in CPU time (robust to other processes on the machine): the synthetic generator,
BatchAugment, collate, prepare-mimic's decode and cache read path, and CsvPairs' up-front check of every row.

    python tests/bench_data.py            the full run (about a minute of CPU)
    python tests/bench_data.py --quick    a few seconds: only shows that everything runs

Not a test (pytest collects test_*.py only); run it from the repository root or from anywhere.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the flat modules, as conftest.py

import data  # noqa: E402


def cpu_rate(fn, n_items, min_seconds=1.0):
    """Items per second of CPU time for fn() (CPU time, not wall time: robust to a busy machine)."""
    fn()
    calls, start = 0, time.process_time()
    while time.process_time() - start < min_seconds:
        fn()
        calls += 1
    return calls * n_items / (time.process_time() - start)


def fake_radiograph(rng, h=3056, w=2544):
    """MIMIC-sized 8-bit 'radiograph': two lung-like blobs, rib-like stripes, sigma-2 noise (~1.5 MB at q95)."""
    y = np.arange(h, dtype=np.float32)[:, None] / max(h, w)  # h x 1, broadcast against
    x = np.arange(w, dtype=np.float32)[None, :] / max(h, w)  # 1 x w
    img = np.full((h, w), 90, np.float32)
    for cx in rng.uniform(0.2, 0.35), rng.uniform(0.6, 0.75):
        img += 70 * np.exp(-((x - cx) / 0.12) ** 2 - ((y - 0.6) / 0.3) ** 2)
    img += 20 * np.sin(y * rng.uniform(60, 90)) * (np.abs(x - 0.42) > 0.06)
    img += rng.normal(0, 2, (h, w)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def bench_pipeline(min_seconds):
    """Generator, BatchAugment and collate on one CPU thread (images/s of CPU time)."""
    torch.set_num_threads(1)
    ds = data.SyntheticCXR("train", num_samples=10_000, image_size=128)
    counter = iter(range(10**9))
    rate = lambda fn, n: cpu_rate(fn, n, min_seconds)  # noqa: E731
    print(f"synthetic render 128 px        {rate(lambda: ds.render(next(counter)), 1):8.0f} images/s")
    print(f"synthetic __getitem__ 128 px   {rate(lambda: ds[next(counter) % len(ds)], 1):8.0f} images/s")
    images = torch.randn(64, 1, data.train_native_size(224), data.train_native_size(224))
    aug = data.BatchAugment(224, 0.5, 0.25)
    with torch.no_grad():
        print(f"BatchAugment 256 -> 224 px     {rate(lambda: aug(images), len(images)):8.0f} images/s")

    def random_crop():  # MGCA's RandomCrop(224) from the 256-px cache, per sample: the cheapest baseline
        top, left = torch.randint(0, 33, (2, len(images))).tolist()
        return torch.stack([im[:, t:t + 224, l:l + 224] for im, t, l in zip(images, top, left)])
    print(f"random crop only 256 -> 224    {rate(random_crop, len(images)):8.0f} images/s")
    samples = [ds[i] for i in range(64)]
    tokenizer = data.build_tokenizer([" ".join(ds.render(i)["sentences"]) for i in range(200)])
    print(f"collate + tokenize (batch 64)  {rate(lambda: data.collate(samples, tokenizer), len(samples)):8.0f} "
          "samples/s")


def write_mimic_tree(root, sources, copies):
    """A MIMIC-CXR-JPG tree of len(sources) x copies one-image studies (hard links to `sources`)."""
    ids = [(f"{k:08x}", f"5{k:07d}", f"1{k:07d}") for k in range(len(sources) * copies)]
    for k, (dicom, study, subject) in enumerate(ids):
        folder = root / f"files/p{subject[:2]}/p{subject}"
        (folder / f"s{study}").mkdir(parents=True)
        os.link(sources[k % len(sources)], folder / f"s{study}" / f"{dicom}.jpg")
        (folder / f"s{study}.txt").write_text("FINAL REPORT\n FINDINGS: \n \n Heart size is normal.  Lungs are"
                                              " clear.\n \n IMPRESSION: \n \n No acute process.\n")
    for name, column, value in (("split", "split", "train"), ("metadata", "ViewPosition", "PA")):
        lines = [f"dicom_id,study_id,subject_id,{column}"] + [f"{d},{st},{su},{value}" for d, st, su in ids]
        (root / f"mimic-cxr-2.0.0-{name}.csv").write_text("\n".join(lines) + "\n")  # read by column name
    (root / "mimic-cxr-2.0.0-chexpert.csv").write_text("subject_id,study_id," + ",".join(data.CHEXPERT_LABELS) + "\n")
    return len(ids)


def bench_mimic(n_files=8, copies=4, image_size=256, crop=224, reads=3000):
    """prepare-mimic decode cost and cache read speed, on generated MIMIC-sized JPEGs."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, rng = Path(tmp), np.random.default_rng(0)
        sources = [tmp / f"{i}.jpg" for i in range(n_files)]
        for path in sources:
            fake_radiograph(rng).save(path, quality=95)
        mb = np.mean([p.stat().st_size for p in sources]) / 1e6
        # (b1) full-size decode + BOX resize vs DCT-scaled (draft) decode + BOX resize; best of two rounds, in CPU
        # time (images per second of one core, robust to other processes on the machine)
        rates = {False: 0, True: 0}
        for draft in (False, True, False, True):
            t = time.process_time()
            for path in sources:
                data.load_cxr(path, image_size, draft=draft)
            rates[draft] = max(rates[draft], n_files / (time.process_time() - t))
        print(f"bench mimic decode ({mb:.2f} MB JPEGs -> {image_size}px, 1 core): full {rates[False]:.1f} img/s, "
              f"draft {rates[True]:.1f} img/s, speed-up x{rates[True] / rates[False]:.2f}")
        # (b2) prepare-mimic end to end; wall clock shows the scaling, CPU seconds (own + workers') the cost per core
        n_images = write_mimic_tree(tmp / "mimic", sources, copies)
        for workers in (1, 2):
            t, cpu = time.perf_counter(), sum(os.times()[:4])
            data.prepare_mimic(tmp / "mimic", tmp / f"cache{workers}", image_size=image_size, workers=workers,
                               chunk_size=4)
            t, cpu = time.perf_counter() - t, sum(os.times()[:4]) - cpu
            print(f"bench mimic prepare workers={workers}: {n_images / t:.1f} img/s wall, "
                  f"{n_images / cpu:.1f} img/s per CPU-second")
        # (a) the training read path: a MimicCXR sample + a random crop (BatchAugment crops on the device; here on
        # the CPU), one thread as in a DataLoader worker
        ds, threads = data.MimicCXR(tmp / "cache1", image_size=crop, train=True), torch.get_num_threads()
        torch.set_num_threads(1)
        t = time.process_time()
        for i in range(reads):
            top, left = torch.randint(image_size - crop + 1, (2,)).tolist()
            ds[i % len(ds)]["image"][:, top:top + crop, left:left + crop].contiguous()
        print(f"bench mimic cache read + random crop (1 core): {reads / (time.process_time() - t):.0f} img/s")
        torch.set_num_threads(threads)


def bench_csv_check(n_rows=1000, image_size=512, n_files=8):
    """CPU time of CsvPairs' up-front check (parse, file exists, header + verify, PNG CRCs / JPEG end marker,
    report, labels) per 1,000 rows, for PNG and JPEG films of image_size px (hard links to n_files sources)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp, rng = Path(tmp), np.random.default_rng(0)
        for ext, options in (("png", {}), ("jpg", dict(quality=95))):
            sources = [tmp / f"source{i}.{ext}" for i in range(n_files)]
            for path in sources:
                fake_radiograph(rng, image_size, image_size).save(path, **options)
            for k in range(n_rows):
                os.link(sources[k % n_files], tmp / f"{k}.{ext}")
            csv_path = tmp / f"pairs_{ext}.csv"
            report = "Heart size is normal. Lungs are clear. No pleural effusion."
            csv_path.write_text("image,report,split,Cardiomegaly\n"
                                + "".join(f"{k}.{ext},{report},train,0\n" for k in range(n_rows)))
            data._checked_pairs.cache_clear()
            t = time.process_time()
            data.CsvPairs(str(csv_path), mean=0.5, std=0.25)  # given statistics: only the check is timed
            cpu = time.process_time() - t
            kb = np.mean([p.stat().st_size for p in sources]) / 1e3
            print(f"bench csv check ({ext.upper()}, {image_size} x {image_size} px, {kb:.0f} kB per file): "
                  f"{1000 * cpu / n_rows:.2f} s CPU per 1,000 rows")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: shows that every benchmark runs")
    args = parser.parse_args(argv)
    if args.quick:
        bench_pipeline(min_seconds=0.05)
        bench_mimic(n_files=2, copies=2, reads=20)
        bench_csv_check(n_rows=20, image_size=128, n_files=2)
    else:
        bench_pipeline(min_seconds=1.0)
        bench_mimic()
        bench_csv_check()


if __name__ == "__main__":
    main()

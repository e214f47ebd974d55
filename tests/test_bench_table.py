"""The benchmark table of tests/bench_table.py on a fake output folder (bench: lines in, Markdown out)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_table as B  # noqa: E402


def _line(speed, step, images, wait=3, peak=2048, device="cuda:0, torch.bfloat16"):
    return (f"step 1 ...\nbench: {speed} images/s ({step} s per step of {images} images), data wait {wait} %, "
            f"peak memory {peak} MB ({device})\n")


def test_rows_ratio_and_failures(tmp_path):
    (tmp_path / "lovt_paper_bf16.txt").write_text(_line(640.0, 0.05, 32))
    (tmp_path / "lovt_paper_bf16.enc.txt").write_text(_line(800.0, 0.04, 32, 0, 1024, "cuda:0, torch.bfloat16; bare"))
    (tmp_path / "place_paper_fp32.txt").write_text("torch.OutOfMemoryError: CUDA out of memory\n")
    (tmp_path / "reclf_paper_fp32.txt").write_text(_line(100.0, 0.48, 48))
    (tmp_path / "reclf_paper_fp32.enc.txt").write_text(_line(200.0, 0.12, 24))  # another batch: no ratio
    lines = B.table(str(tmp_path)).splitlines()
    assert lines[0].startswith("| configuration | images/s")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    assert list(rows) == ["lovt paper bf16", "place paper fp32", "reclf paper fp32"]
    assert rows["lovt paper bf16"][1:] == ["640.0", "0.050 (32)", "3 %", "2.0 GB", "0.040", "1.25 |"]
    assert "no result" in rows["place paper fp32"][1]
    assert rows["reclf paper fp32"][-1] == "– |" and rows["reclf paper fp32"][-2] == "0.120"


def test_parse_takes_the_last_bench_line_and_main_refuses_a_missing_folder(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(_line(1.0, 2.0, 2) + _line(3.5, 0.5, 2, 7, 100, "cpu, torch.float32"))
    assert B.parse(str(path)) == (3.5, 0.5, 2, 7, 100, "cpu, torch.float32")
    assert B.parse(str(tmp_path / "missing.txt")) is None
    with pytest.raises(SystemExit, match="no such folder"):
        B.main([str(tmp_path / "missing")])

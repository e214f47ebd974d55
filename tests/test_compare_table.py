"""The comparison table of tests/compare_table.py on a fake results folder (JSON in, Markdown out)."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_table as T  # noqa: E402


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _seg_rows(dice):
    return [dict(encoder="x", head="unet", mode="frozen", dice={"values": [0.99], "mean": 0.99, "ci95": None}),
            dict(encoder="x", head="linear", mode="frozen", dice={"values": [dice], "mean": dice, "ci95": None})]


def _fake_results(root):
    for seed, (r1, auc, dice, ap, seconds) in enumerate([(0.1, 0.7, 0.30, 0.20, 100), (0.2, 0.8, 0.40, 0.30, 110),
                                                         (0.3, 0.9, 0.50, 0.40, 120)]):
        run = os.path.join(root, "lovt", f"seed{seed}")
        _write(os.path.join(run, "eval.json"), {"untrained": {"i2t_R@1": 0.0}, "trained": {"i2t_R@1": r1,
                                                                                              "auc_mean": auc}})
        _write(os.path.join(run, "seg.json"), _seg_rows(dice))
        _write(os.path.join(run, "det.json"), [dict(encoder="x", mode="frozen", map={"values": [ap], "mean": ap})])
        _write(os.path.join(run, "seconds"), f"{seconds}\n")
    _write(os.path.join(root, "random", "seed0", "seg.json"), _seg_rows(0.25))


def test_interval_is_student_t():
    mean, half = T.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert T.interval([5.0])[0] == 5.0 and math.isnan(T.interval([5.0])[1])
    assert math.isnan(T.interval([None, float("nan")])[0])


def test_table_from_a_fake_results_folder(tmp_path):
    _fake_results(str(tmp_path))
    table = T.collect(str(tmp_path))
    assert list(table) == ["lovt", "random"]
    assert table["lovt"]["i2t R@1"] == [0.1, 0.2, 0.3] and table["lovt"]["seg Dice"] == [0.3, 0.4, 0.5]
    assert table["lovt"]["t2i R@1"] == [None, None, None]  # not in eval.json: no data, not a zero
    assert table["random"]["zero-shot AUC"] == [None] and table["random"]["seg Dice"] == [0.25]
    lines = T.markdown(table).splitlines()
    assert lines[0].startswith("| encoder | seeds | pre-training s | i2t R@1")
    half = 4.303 * 0.1 / math.sqrt(3)
    lovt = lines[2].split(" | ")
    assert lovt[:3] == ["| lovt", "3", "110"]
    assert lovt[3] == f"0.200 ± {half:.3f}" and lovt[4] == "–"
    assert lovt[-2] == f"40.0 ± {100 * half:.1f}" and lovt[-1] == f"30.0 ± {100 * half:.1f} |"
    random_row = lines[3].split(" | ")
    assert random_row[:3] == ["| random", "1", "–"] and random_row[-2] == "25.0" and random_row[-1] == "– |"


def test_main_writes_the_table_and_refuses_a_missing_folder(tmp_path, capsys):
    _fake_results(str(tmp_path))
    out = tmp_path / "table.md"
    text = T.main([str(tmp_path), "--out", str(out)])
    assert out.read_text() == text + "\n" and "| lovt |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such results folder"):
        T.main([str(tmp_path / "missing")])

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


def _harness_rows(encoder, dice=None, ap=None):
    """eval_seg / eval_det rows as they write them: a linear row that must be ignored, then the hypercolumn frozen
    row (compare.sh's head)."""
    if ap is not None:
        return [dict(encoder=encoder, mode="frozen", map={"values": ap, "mean": sum(ap) / len(ap)})]
    return [dict(encoder=encoder, head="linear", mode="frozen", dice={"values": [0.99], "mean": 0.99}),
            dict(encoder=encoder, head="hypercolumn", mode="frozen",
                 dice={"values": dice, "mean": sum(dice) / len(dice)})]


def _results(r1, zero_shot_mean=None):
    """One model's entry of eval.json (common.save_results): retrieval, zero_shot, checks."""
    return dict(retrieval={} if r1 is None else {"i2t_R@1": r1},
                zero_shot={} if zero_shot_mean is None else {"effusion": zero_shot_mean, "mean": zero_shot_mean},
                checks={})


def _fake_results(root):
    """3 seeds of LoVT, JoImTeRNet, an LRCLR base + stage (its base column next to "trained") and a LoVT ablation;
    a random encoder over 3 harness seeds."""
    for seed, (r1, auc, dice, ap, cpu) in enumerate([(0.1, 0.7, 0.30, 0.20, 100), (0.2, 0.8, 0.40, 0.30, 110),
                                                     (0.3, 0.9, 0.50, 0.40, 120)], start=1):
        folder = os.path.join(root, f"seed{seed}")
        _write(os.path.join(folder, "lovt", "eval.json"), {"untrained": _results(0.0),
                                                          "trained": _results(r1, [auc, auc - 0.1, auc + 0.1])})
        _write(os.path.join(folder, "lovt", "metrics.csv"), f"step,perf/cpu_s\n1,{cpu / 2}\n2,{cpu}\n")
        _write(os.path.join(folder, "joimternet", "eval.json"), {"trained": _results(r1 / 2)})
        _write(os.path.join(folder, "lrclr-base", "eval.json"),
               {"untrained": _results(None), "trained": _results(None, [0.6, 0.5, 0.7])})
        _write(os.path.join(folder, "lrclr-base", "metrics.csv"), "step,perf/cpu_s\n1,50\n")
        _write(os.path.join(folder, "lrclr", "eval.json"),
               {"base": _results(None, [0.6, 0.5, 0.7]), "trained": _results(None, [auc - 0.05, 0, 1])})
        _write(os.path.join(folder, "lrclr", "metrics.csv"), "step,perf/cpu_s\n1,20\n")
        _write(os.path.join(folder, "lrclr", "args.json"), {"init": os.path.join(folder, "lrclr-base")})
        _write(os.path.join(folder, "lovt-no-local", "eval.json"), {"trained": _results(r1)})
        _write(os.path.join(folder, "lovt", "seg.json"), _harness_rows("lovt", [dice]))
        _write(os.path.join(folder, "lrclr", "seg.json"), _harness_rows("lrclr", [0.1]))
        _write(os.path.join(folder, "lovt-no-local", "seg.json"), _harness_rows("lovt-no-local", [dice - 0.1]))
        _write(os.path.join(folder, "lovt", "det.json"), _harness_rows("lovt", ap=[ap]))
    _write(os.path.join(root, "random", "seg.json"), _harness_rows("random-resnet18", [0.24, 0.25, 0.26]))
    _write(os.path.join(root, "seed3", "lovt-no-smoothing", "metrics.csv"), "step,perf/cpu_s\n1,5\n")  # training


def test_interval_is_student_t():
    mean, half = T.interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert T.interval([5.0])[0] == 5.0 and math.isnan(T.interval([5.0])[1])
    assert math.isnan(T.interval([None, float("nan")])[0])


def test_table_from_a_fake_results_folder(tmp_path):
    _fake_results(str(tmp_path))
    table = T.collect(str(tmp_path))
    assert sorted(table) == ["joimternet", "lovt", "lovt-no-local", "lrclr", "lrclr-base", "random-resnet18"]
    lovt = table["lovt"]
    assert lovt["i2t R@1"] == [0.1, 0.2, 0.3] and lovt["seg Dice"] == [0.3, 0.4, 0.5] and lovt["seeds"] == 3
    assert lovt["t2i R@1"] == [None, None, None]  # not in eval.json: no data, not a zero
    assert table["joimternet"]["i2t R@1"] == [0.05, 0.1, 0.15]
    assert table["lrclr"]["zero-shot AUC"] == pytest.approx([0.65, 0.75, 0.85])  # its global + local score
    assert table["lrclr"]["seconds"] == [70.0] * 3  # its own 20 CPU s + its base's 50
    assert table["lrclr-base"]["zero-shot AUC"] == [0.6] * 3
    assert table["lovt-no-local"]["seg Dice"] == pytest.approx([0.2, 0.3, 0.4])
    assert table["lrclr"]["seg Dice"] == [0.1] * 3
    random = table["random-resnet18"]
    assert random["seg Dice"] == [0.24, 0.25, 0.26] and random["seeds"] == 3 and random["det mAP"] == []
    main, claims = T.tables(table).split("Claims")
    lines = main.strip().splitlines()
    assert lines[0].startswith("| encoder | seeds | pre-training CPU s | i2t R@1")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| random-resnet18", "| lovt", "| joimternet",
                                                           "| lrclr-base", "| lrclr"]  # MAIN's order
    half = 4.303 * 0.1 / math.sqrt(3)
    row = lines[3].split(" | ")
    assert row[:3] == ["| lovt", "3", "110"]
    assert row[3] == f"0.200 ± {half:.3f}" and row[4] == "–"
    assert row[-2] == f"40.0 ± {100 * half:.1f}" and row[-1] == f"30.0 ± {100 * half:.1f} |"
    random_row = lines[2].split(" | ")
    assert random_row[:3] == ["| random-resnet18", "3", "–"] and random_row[-1] == "– |"
    assert random_row[-2] == f"25.0 ± {100 * 4.303 * 0.01 / math.sqrt(3):.1f}"
    claims, paired = claims.split("The papers' claims, paired by seed:")
    claim_lines = claims.strip().splitlines()
    assert [line.split(" | ")[0] for line in claim_lines[4:]] == ["| lovt", "| lovt-no-local"]
    assert "| lovt > lovt-no-local | seg Dice | 30.0 / 20.0, 40.0 / 30.0, 50.0 / 40.0 | +10.0 ± 0.0 | holds |" \
        in paired
    assert claim_lines[2] == ("| encoder | seeds | pre-training CPU s | i2t R@1 | i2t R@10 | t2i R@10 | zero-shot AUC | "
                              "i2t P@1 | i2t P@5 | i2t P@10 | seg Dice |")  # no detection: ablations skip it
    assert claim_lines[5].endswith(f" | 30.0 ± {100 * half:.1f} |")  # lovt-no-local's Dice, 0.1 below lovt's
    assert "P@" not in lines[0]


def test_controls_per_class_dice_and_calibration(tmp_path):
    """CONTROLS=1's runs (seg.json only) get a per-class table after the claims; the calibration line says, per
    class, whether the positive control leads the untrained one by more than 3 seed standard deviations."""
    _fake_results(str(tmp_path))
    for seed, (pos_nodule, neg_nodule) in enumerate([(0.10, 0.00), (0.30, 0.01), (0.20, 0.02)], start=1):
        for kind, nodule, big in (("positive", pos_nodule, 0.80), ("untrained", neg_nodule, 0.20 + 0.01 * seed)):
            row = _harness_rows(f"{kind}-lovt", [big])[1]
            row.update({f"dice/{c}": {"values": [big]} for c in T.CLASSES}, **{"dice/nodule": {"values": [nodule]}})
            _write(os.path.join(tmp_path, f"seed{seed}", f"{kind}-lovt", "seg.json"), [row])
    table = T.collect(str(tmp_path))
    assert table["positive-lovt"]["nodule"] == [0.1, 0.3, 0.2] and table["untrained-lovt"]["seeds"] == 3
    main, controls = T.tables(table).split("Controls and per-class Dice")
    assert "positive-lovt" not in main and "untrained" not in main  # neither a method nor an ablation
    controls, own = controls.split("Each method against its own untrained architecture")
    assert "| lovt > untrained-lovt | seg Dice |" in own and "| nodule |" not in own  # lovt: no per-class Dice
    lines = controls.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines[4:6]] == ["| positive-lovt", "| untrained-lovt"]
    verdict = lines[-1]
    assert verdict.startswith("lovt's architecture, positive - untrained Dice: seg Dice +58.0")
    # nodule: lead 19.0 points, sd 10.0 (the positive's): 3 sd = 30.0 > 19.0
    assert "nodule +19.0 (3 sd 30.0) FAIL" in verdict and "cardiomegaly +58.0 (3 sd 3.0) PASS" in verdict


def test_main_writes_the_table_and_refuses_a_missing_folder(tmp_path, capsys):
    _fake_results(str(tmp_path))
    out = tmp_path / "table.md"
    text = T.main([str(tmp_path), "--out", str(out)])
    assert out.read_text() == text + "\n" and "| lovt |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such results folder"):
        T.main([str(tmp_path / "missing")])


def test_paired_claims_and_own_architecture():
    """A claim is paired by seed: per-seed values, the mean gain ± its Student-t half-width, and the verdict."""
    empty = {h: [] for h, _, _ in T.COLUMNS}
    table = {"lovt": {**empty, "seg Dice": [0.40, 0.42, 0.44], "nodule": [0.10, 0.20, 0.30]},
             "lovt-no-local": {**empty, "seg Dice": [0.30, 0.33, 0.36]},
             "untrained-lovt": {**empty, "seg Dice": [0.41, 0.40, 0.45], "nodule": [0.0, 0.0, None]},
             "lrclr": {**empty, "zero-shot AUC": [0.80, 0.81, 0.79]},
             "lrclr-base": {**empty, "zero-shot AUC": [0.79, 0.80, 0.78]}}
    half = 4.303 * 1.0 / math.sqrt(3)  # gains 10, 9, 8 Dice points: sd 1
    assert T.paired(table, "lovt", "lovt-no-local", "seg Dice") == (
        f"| lovt > lovt-no-local | seg Dice | 40.0 / 30.0, 42.0 / 33.0, 44.0 / 36.0 | +9.0 ± {half:.1f} | holds |")
    # +0.010 on every seed, zero spread: the interval is 0 wide, so it holds
    assert T.paired(table, "lrclr", "lrclr-base", "zero-shot AUC").endswith("| +0.010 ± 0.000 | holds |")
    row = T.paired(table, "lovt", "untrained-lovt", "seg Dice")  # -1, +2, -1: not shown
    assert row.endswith("not shown |") and "| +0.0 ± " in row
    # the seeds with both values: +10, +20, both ahead, but 2 seeds' interval (12.706 * 7.07 / 1.41) spans 0
    assert T.paired(table, "lovt", "untrained-lovt", "nodule") == (
        "| lovt > untrained-lovt | nodule | 10.0 / 0.0, 20.0 / 0.0 | +15.0 ± 63.5 | every seed |")
    assert T.paired(table, "lovt", "lovt-no-local", "zero-shot AUC") is None  # no paired seeds
    text = T.paired_tables(table)
    own, claims = text.split("The papers' claims")
    assert own.count("| lovt > untrained-lovt |") == 2  # seg Dice and nodule: the classes with two paired seeds
    assert "| lovt > lovt-no-local | seg Dice |" in claims and "| lrclr > lrclr-base |" in claims

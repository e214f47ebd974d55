#!/bin/sh
# RECLF's ablation ladder on the demo preset: GLoRIA pooling -> +SRM -> +IRM -> +both, the same seed and budget for
# every rung; each export is judged by eval_seg.py (synthetic, linear head, 1 seed). Prints one markdown table.
# Usage: sh tests/reclf_ladder.sh [OUT_ROOT]   (about 4 x (demo + eval_seg) of CPU time)
set -e
ROOT=${1:-runs/reclf-ladder}
for rung in "gloria:--srm none --irm off" "srm:--srm graph --irm off" "irm:--srm none --irm on" \
            "both:--srm graph --irm on"; do
  name=${rung%%:*}; flags=${rung#*:}
  python reclf.py $flags --viz 0 --out-dir "$ROOT/$name"
  python eval_seg.py --encoder "$ROOT/$name/image_encoder.pt" --head linear --seeds 1 --out "$ROOT/$name/seg"
done
python - "$ROOT" <<'PY'
import json, sys
root = sys.argv[1]
print("| rung | zero-shot AUC, both (95 % CI) | local | global | i2t P@1 / P@5 / P@10 | linear micro Dice |")
print("|---|---|---|---|---|---|")
for name in ("gloria", "srm", "irm", "both"):
    r = json.load(open(f"{root}/{name}/eval.json"))["trained"]
    dice = json.load(open(f"{root}/{name}/seg.json"))[0]["dice"]["mean"]
    print(f"| {name} | {r['auc_both_mean']:.3f} ({r['auc_both_low']:.3f}-{r['auc_both_high']:.3f}) | "
          f"{r['auc_local_mean']:.3f} | {r['auc_global_mean']:.3f} | "
          f"{r['i2t_P@1']:.3f} / {r['i2t_P@5']:.3f} / {r['i2t_P@10']:.3f} | {100 * dice:.1f} |")
PY

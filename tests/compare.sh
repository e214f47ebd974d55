#!/bin/sh
# The five methods side by side under one budget, and each paper's claim on the same seeds and budget.
#
#   sh tests/compare.sh [RESULTS]          # the table: 5 methods + LRCLR's base, 3 seeds, seg + det, about 45 min
#   CONTROLS=1 CLAIMS=1 DET=0 sh tests/compare.sh [RESULTS]   # the README's: controls and ablations, about 95 min
#   METHODS="lovt place" SEEDS=1 ...       # a part (the table is built from whatever RESULTS holds)
#   DATA=synthetic-faint sh tests/compare.sh runs/compare-faint   # the harder setting: the findings at 0.4 contrast
#   JOBS=1 ...                             # one job at a time on all cores (the default runs JOBS=2 at once)
#   CONTROLS=1 ...                         # also each exported architecture's untrained and positive controls
#   CLAIMS=1 ...                           # also each paper's ablations (LoVT's and PLACE's judged by eval_seg)
#   SEG_HEAD=linear DET=0 ...              # another segmentation head (frozen); no detection
#   EXTRA="--epochs 5" METHODS=joimternet CONTROLS=1 ...   # another budget (the controls train as many passes)
#
# Every method trains its demo preset on the same synthetic training set (the first $PAIRS generated pairs, seed 0),
# at 128 px, for one pass over it (PAIRS images seen; LRCLR's second stage adds its 20 fine-tuning steps of 32), and
# is evaluated on the same 300 test pairs; --seed 1, 2, 3. Each export is judged by eval_seg.py (hypercolumn head:
# linear on conv3-conv5, frozen, 40 epochs; conv5's 4x4 grid alone cannot show a nodule) and eval_det.py (FCOS,
# frozen, 15 epochs), each with a 2-value --lr-grid (one harness seed per pre-training seed), and so are random-init
# ResNet-18 and tiny-ViT encoders (3 harness seeds).
# The work is cut into independent jobs (one pre-training and its judging; the random encoders' seg; their det), run
# JOBS at a time with cores/JOBS threads each, longest first: the small models of the demo presets use one core
# much better than two (two one-thread jobs finish in about 0.7 of the time of one two-thread job after another).
# A finished step is skipped and a killed pre-training resumes from its checkpoint, so a killed run continues where
# it stopped. Prints the table (tests/compare_table.py) and writes RESULTS/table.md.
# Smoke test of the script itself: PAIRS=64 SEEDS=1 EXTRA="--max-steps 2 --eval-samples 100"
#   HARNESS="--synthetic-samples 40 --epochs 1" sh tests/compare.sh /tmp/compare-smoke
set -e
ROOT=${1:-runs/compare}
SEEDS=${SEEDS:-"1 2 3"}
PAIRS=${PAIRS:-2000}
DATA=${DATA:-synthetic}
SEG_LRS=${SEG_LRS:-"1e-2 3e-3"}
SEG_EPOCHS=${SEG_EPOCHS:-40}  # eval_seg's default is 100 (with early stopping): 40 fits the hour with CLAIMS=1
DET_LRS=${DET_LRS:-"3e-3 1e-3"}
SEG_HEAD=${SEG_HEAD:-hypercolumn}
DET=${DET:-1}
BUDGET="--preset demo --data $DATA --train-samples $PAIRS --eval-samples 300 --image-size 128 --epochs 1 --viz 0 ${EXTRA:-}"
HARNESS="--dataset $DATA ${HARNESS:-}"
METHODS=${METHODS:-"lovt joimternet lrclr reclf place"}
JOBS=${JOBS:-2}

# pretrain NAME SEED METHOD FLAGS...: one pre-training into RESULTS/seedS/NAME (time.txt: the whole process's
# user, system and wall seconds; the table's CPU seconds are the training loop's, from metrics.csv)
pretrain() {
  name=$1 seed=$2 method=$3; shift 3
  dir=$ROOT/seed$seed/$name
  [ -f "$dir/image_encoder.pt" ] && [ -f "$dir/eval.json" ] && return 0
  mkdir -p "$dir"
  resume=""
  [ -f "$dir/ckpt.pt" ] && resume=--resume  # killed in training: the method continues from its checkpoint
  /usr/bin/time -f "%U %S %e" -o "$dir/time.txt" \
    python "$method.py" $BUDGET --seed "$seed" --out-dir "$dir" $resume "$@" \
    > "$dir/log.txt" 2>&1 || { tail -20 "$dir/log.txt"; exit 1; }
  echo "seed $seed $name: $(awk '{ printf "%.0f CPU s, %.0f s wall", $1 + $2, $3 }' "$dir/time.txt") (whole process)"
}

# judge NAME SEED [det]: eval_seg (and eval_det) of the run's export, results next to it
judge() {
  dir=$ROOT/seed$2/$1
  if [ ! -f "$dir/seg.json" ]; then
    python eval_seg.py --encoder "$dir/image_encoder.pt" $HARNESS --head $SEG_HEAD --epochs $SEG_EPOCHS --seeds 1 \
      --lr-grid $SEG_LRS --out "$dir/seg" > "$dir/seg.log" 2>&1 || { tail -20 "$dir/seg.log"; exit 1; }
  fi
  if [ -n "${3:-}" ] && [ "$DET" = 1 ] && [ ! -f "$dir/det.json" ]; then
    python eval_det.py --encoder "$dir/image_encoder.pt" $HARNESS --seeds 1 --lr-grid $DET_LRS --out "$dir/det" \
      > "$dir/det.log" 2>&1 || { tail -20 "$dir/det.log"; exit 1; }
  fi
}

# controls SEED METHOD: METHOD's exported architecture untrained (its --seed's initialisation) and trained on the
# findings' masks for the same images and passes (tests/positive_control.py), each judged like the methods (seg)
controls() {
  passes=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['epochs'])" "$ROOT/seed$1/$2/args.json")
  for kind in untrained positive; do
    dir=$ROOT/seed$1/$kind-$2
    if [ ! -f "$dir/image_encoder.pt" ]; then
      mkdir -p "$dir"
      python tests/positive_control.py --like "$ROOT/seed$1/$2/image_encoder.pt" --data "$DATA" --seed "$1" \
        --train-samples "$PAIRS" --epochs "$([ $kind = untrained ] && echo 0 || echo "$passes")" --out-dir "$dir" \
        > "$dir/log.txt" 2>&1 || { tail -20 "$dir/log.txt"; exit 1; }
    fi
    judge "$kind-$2" "$1"
  done
}

# The jobs, one per line (sh tests/compare.sh RESULTS --job ... runs one):
# run SEED NAME METHOD FLAGS...: pre-train, then judge segmentation and detection
run() { seed=$1 name=$2; shift 2; pretrain "$name" "$seed" "$@"; judge "$name" "$seed" det; }
# with_controls SEED METHOD: run, then the controls of its architecture (LoVT: ResNet-18, JoImTeRNet's, PLACE's ViT)
with_controls() { run "$1" "$2" "$2"; controls "$1" "$2"; }
# ablation SEED NAME METHOD FLAGS...: pre-train, then judge segmentation only (LoVT's and PLACE's claims)
ablation() { seed=$1 name=$2; shift 2; pretrain "$name" "$seed" "$@"; judge "$name" "$seed"; }
# LRCLR is a second stage on a CLIP-style base: the base is a row of its own (its zero-shot claim)
lrclr() {
  run "$1" lrclr-base lrclr --stage base
  run "$1" lrclr lrclr --stage lrclr --init "$ROOT/seed$1/lrclr-base"
}
random() {  # random seg|det: the random-init encoders, 3 harness seeds
  [ -f "$ROOT/random/$1.json" ] && return 0
  mkdir -p "$ROOT/random"
  if [ "$1" = seg ]; then
    vit="--encoder random:vit_tiny"
    [ "$SEG_HEAD" = unet ] && vit=""  # the U-Net reads c1 .. c5: a ResNet's
    case " $HARNESS " in *" --image-size "*) vit="" ;; esac  # the ViT's position grid is its pre-training size
    python eval_seg.py --encoder random:resnet18 $vit $HARNESS --head $SEG_HEAD --seeds 3 \
      --epochs $SEG_EPOCHS --lr-grid $SEG_LRS --out "$ROOT/random/seg" > "$ROOT/random/seg.log" 2>&1
  else
    python eval_det.py --encoder random:resnet18 --encoder random:vit_tiny $HARNESS --seeds 3 --lr-grid $DET_LRS \
      --out "$ROOT/random/det" > "$ROOT/random/det.log" 2>&1
  fi || { tail -20 "$ROOT/random/$1.log"; exit 1; }
  echo "random-init encoders: $1 judged"
}
if [ "${2:-}" = --job ]; then
  shift 2
  "$@"
  exit
fi

# longest first (random det, then the slowest pre-trainings), so that the last jobs to start are short
jobs() {
  [ "$DET" = 1 ] && echo random det
  echo random seg
  for seed in $SEEDS; do
    for method in reclf lovt lrclr place joimternet; do
      case " $METHODS " in *" $method "*) ;; *) continue ;; esac
      case $method in
        lrclr) echo lrclr "$seed" ;;
        lovt|joimternet|place) [ -n "${CONTROLS:-}" ] && echo with_controls "$seed" "$method" \
                                 || echo run "$seed" "$method" "$method" ;;
        *) echo run "$seed" "$method" "$method" ;;
      esac
    done
  done
  [ -z "${CLAIMS:-}" ] && return 0
  for seed in $SEEDS; do
    for method in $METHODS; do
      case $method in
        lovt) echo ablation "$seed" lovt-no-local lovt --no-local
              echo ablation "$seed" lovt-no-smoothing lovt --no-spatial-smoothing
              echo ablation "$seed" lovt-uniform-weights lovt --uniform-weights ;;
        # JoImTeRNet's and RECLF's claims are about retrieval and zero-shot scores: their ablations are not judged
        joimternet) echo pretrain joimternet-no-local "$seed" joimternet --no-local ;;
        reclf) echo pretrain reclf-gloria "$seed" reclf --srm none --irm off
               echo pretrain reclf-srm "$seed" reclf --srm graph --irm off
               echo pretrain reclf-irm "$seed" reclf --srm none --irm on ;;
        place) echo ablation "$seed" place-ita-tca place --no-pcma --no-cce
               echo ablation "$seed" place-no-cce place --no-cce
               echo ablation "$seed" place-no-pcma place --no-pcma ;;
      esac
    done
  done
}
cores=$(nproc)
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / JOBS > 1 ? cores / JOBS : 1 ))}
export OMP_NUM_THREADS
start=$(date +%s)
jobs | xargs -P "$JOBS" -L 1 sh "$0" "$ROOT" --job
echo "all jobs done in $(( $(date +%s) - start )) s wall ($JOBS at a time, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
python tests/compare_table.py "$ROOT" --head "$SEG_HEAD" --out "$ROOT/table.md"

#!/bin/sh
# Throughput of every method's paper preset on one CUDA GPU (random-init encoders of the paper's sizes, synthetic
# data): --bench in fp32 and bf16 (and NCHW for the ResNets whose default is channels-last), a 2-process torchrun on
# the same GPU, and the bare encoders (tests/bench_encoders.py) at the same batch for the overhead ratio. Prints one
# table (tests/bench_table.py).
#
#   sh tests/gpu_bench.sh [OUT]          # on a GPU machine: about 15-25 min
#   CPU=1 sh tests/gpu_bench.sh [OUT]    # the CPU half: the demo presets, fp32, no torchrun (about 10 min, 2 cores)
set -uf  # -f: the JSON configs below hold brackets, not file patterns
OUT=${1:-runs/gpu-bench}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
BERT_BASE="--text-hidden 768 --text-layers 12 --text-heads 12"
TINY_BERT="--text-hidden 128 --text-layers 2 --text-heads 4"
JOIM_DEMO='--image-arch joimternet-resnet --image-config {"dim":128,"widths":[4,8,16,32,64,128],"stem_stride":1}'
RANDOM_INIT="--data synthetic --image-weights none --text-model bert-base"
KIND=paper PRECISIONS="fp32 bf16"
[ -n "${CPU:-}" ] && KIND=demo PRECISIONS=fp32

# bench LABEL "METHOD FLAGS" "ENCODER FLAGS": the method's --bench and the bare encoders, output kept in OUT
bench() {
  echo "$1"
  python $2 --bench "$STEPS" > "$OUT/$1.txt" 2>&1 || echo "  failed: see $OUT/$1.txt"
  python tests/bench_encoders.py $3 --steps "$STEPS" > "$OUT/$1.enc.txt" 2>&1 ||
    echo "  encoders failed: see $OUT/$1.enc.txt"
}

# config NAME "METHOD AND PRESET FLAGS" "BARE-ENCODER FLAGS AT THE SAME ENCODERS, SIZE AND BATCH"
config() {
  name=$1 method=$2 encoders=$3
  for precision in $PRECISIONS; do
    bench "${name}_${KIND}_$precision" "$method --precision $precision" "$encoders --precision $precision"
  done
  case "$encoders" in *--channels-last*)  # the default memory format of these ResNets; NCHW for comparison
    bench "${name}_${KIND}_${precision}_NCHW" "$method --precision $precision --no-channels-last" \
      "$(echo "$encoders" | sed 's/ --channels-last//') --precision $precision" ;;
  esac
  if [ -z "${CPU:-}" ]; then  # two processes on the one GPU, half the batch each: DDP's own cost
    batch=${encoders##*--batch-size }
    label="${name}_${KIND}_bf16_torchrun-2"
    echo "$label"
    torchrun --standalone --nproc_per_node=2 $method --precision bf16 --batch-size $((batch / 2)) \
      --bench "$STEPS" > "$OUT/$label.txt" 2>&1 || echo "  failed (out of memory?): see $OUT/$label.txt"
  fi
}

if [ -n "${CPU:-}" ]; then
  config lovt "lovt.py --preset demo" "--image-arch resnet18 --image-size 128 --channels-last $TINY_BERT --batch-size 32"
  config joimternet "joimternet.py --preset demo" \
    "$JOIM_DEMO --image-size 128 --text-hidden 128 --text-layers 2 --text-heads 2 --batch-size 32"
  config lrclr-base "lrclr.py --preset demo --stage base" \
    "--image-arch resnet18 --image-size 128 --channels-last $TINY_BERT --batch-size 32"
  config reclf "reclf.py --preset demo" "--image-arch resnet18 --image-size 128 $TINY_BERT --batch-size 16"
  config place "place.py --preset demo" "--image-arch vit_tiny --image-size 128 $TINY_BERT --batch-size 32"
else
  config lovt "lovt.py --preset paper $RANDOM_INIT" \
    "--image-arch resnet50 --image-size 224 --channels-last $BERT_BASE --batch-size 32"
  config joimternet "joimternet.py --preset paper --data synthetic" \
    '--image-arch joimternet-resnet --image-config {"stem_stride":1} --image-size 512 --text-hidden 512 --text-layers 3
     --text-heads 8 --batch-size 128'
  config lrclr-base "lrclr.py --preset paper --stage base $RANDOM_INIT" \
    "--image-arch resnet50 --image-size 224 --channels-last $BERT_BASE --batch-size 144"
  config lrclr "lrclr.py --preset paper --stage lrclr $RANDOM_INIT" \
    "--image-arch resnet50 --image-size 224 --channels-last $BERT_BASE --batch-size 64"
  config reclf "reclf.py --preset paper $RANDOM_INIT" \
    "--image-arch resnet50 --image-size 299 $BERT_BASE --batch-size 48"
  config place "place.py --preset paper $RANDOM_INIT" \
    "--image-arch vit_b16 --image-size 224 $BERT_BASE --batch-size 144"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
python tests/bench_table.py "$OUT"

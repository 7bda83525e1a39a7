#!/usr/bin/env bash
# The GPU check: the code path users run, on one H100 / H200, in about 10 minutes (--stages
# splits it over calls; RESULTS_DIR keeps what earlier stages wrote).
#
#   benchmarks/gpu_check.sh RESULTS_DIR [CIFAR10_ARCHIVE] [--device cuda] [--seconds 120]
#       [--budget 540] [--stages smoke,env,...] [--shrink]
#
# Installs nothing and reaches no network: it runs the checkout's src/ with the machine's
# own python3 (or $PYTHON), which needs torch, torchvision, timm, PyYAML, safetensors,
# tensorboard, matplotlib, scikit-learn and tqdm (a GPU node's usual stack).
#
# Stages, each with its own time limit and its own files in RESULTS_DIR, so one that fails
# or runs out of time leaves the others (benchmarks/gpu_check/ says what each does), in
# the order that secures the most important figures first:
#   smoke           every dsmae command once, quickstart-sized: eager fp32, then pretrain and
#                   finetune in bf16 compiled; a pass/fail table naming each error
#   env             GPU, versions, a bf16 8192^3 matmul (the MFU denominator)
#   rates           dsmae bench, ViT-Tiny 32/2 b1024, dsmae and mae, bf16 compiled: img/s,
#                   MFU, peak memory, data share, compile time, host syncs; a profile
#   pretrain-dsmae  pre-training on CIFAR-10 (50k): dsmae and mae for the same epochs,
#   pretrain-mae    --seconds each on average at their measured rates (never assumed ones)
#   equal-time      mae for the wall time dsmae took (--time-budget): k-NN at equal time
#   eval            avg-pooled linear probe and k-NN of both and of random init
#   speed           the rest of the MFU table (Tiny eager, ViT-Small 96/6 b256 eager and
#                   compiled), then regional compilation and each speed switch (Tiny)
#   summary         summary.json, summary.md (printed last)
# --budget (seconds, default 540) bounds the whole run: the speed stage gets what is
# left. --stages runs only those named (comma-separated labels above; "pretrain" for both).
# --shrink runs the same flow at toy sizes (the CPU test: --device cpu --shrink).
set -uo pipefail
usage="usage: benchmarks/gpu_check.sh RESULTS_DIR [CIFAR10_ARCHIVE] [--device D] [--seconds S] [--budget S] [--stages LIST] [--shrink]"
results=${1:?$usage}
shift
archive=""
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then archive=$1; shift; fi
device=cuda seconds=120 budget=540 shrink=() stages=smoke,env,rates,pretrain,equal-time,eval,speed,summary
while [ $# -gt 0 ]; do
  case $1 in
    --device) device=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --stages) stages=$2; shift 2 ;;
    --shrink) shrink=(--shrink); shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
mkdir -p "$results" && results=$(cd "$results" && pwd)
[ -z "$archive" ] || archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
cd "$(dirname "$0")/.."
exec > >(tee -a "$results/gpu_check.log") 2>&1

python=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1  # belt and braces: nothing here may reach for a package registry
start=$(date +%s)
common=(--device "$device" "${shrink[@]}")
elapsed() { echo $(( $(date +%s) - start )); }
wanted() { [[ ",$stages," == *",$1,"* ]]; }

# stage LABEL LIMIT_SECONDS STAGE ARGS...: run one stage of benchmarks/gpu_check under its own
# time limit; its exit status goes to RESULTS_DIR/LABEL.rc (124: out of time)
stage() {
  local label=$1 limit=$2
  shift 2
  echo "== $label (at most ${limit} s; $(elapsed) s so far)"
  timeout -k 10 "$limit" "$python" benchmarks/gpu_check "$1" "$results" "${@:2}"
  local rc=$?
  echo "$rc" > "$results/$label.rc"
  [ "$rc" = 0 ] || echo "== $label ended with status $rc"
}

command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader | tee "$results/nvidia-smi.txt"
wanted smoke && stage smoke 150 smoke "${common[@]}"
wanted env && stage env 60 env "${common[@]}"
wanted rates && stage rates 180 bench "${common[@]}" --rows rates --budget 150
if [ -n "$archive" ] && { wanted pretrain || wanted equal-time || wanted eval; }; then
  data=$results/data
  mkdir -p "$data" && tar xzf "$archive" -C "$data"
  folder=$(dirname "$(find "$data" -maxdepth 3 -type d -name train | head -1)")
  # the slower method takes longer than --seconds (equal epochs), and a missing rate is
  # benchmarked first
  for method in dsmae mae; do
    wanted pretrain && stage "pretrain-$method" $(( 2 * ${seconds%.*} + 150 )) \
      "pretrain-$method" "${common[@]}" --data "$folder" --seconds "$seconds"
  done
  wanted equal-time && stage equal-time $(( 2 * ${seconds%.*} + 150 )) equal-time \
    "${common[@]}" --data "$folder"
  wanted eval && stage eval 150 eval "${common[@]}"
  rm -rf "$data"
fi
left=$(( budget - $(elapsed) - 20 ))
if wanted speed && [ "$left" -gt 20 ]; then
  stage speed $(( left + 15 )) bench "${common[@]}" --rows speed --budget "$left"
elif wanted speed; then
  echo "== speed skipped: $left s left of --budget $budget"
fi
wanted summary && stage summary 60 summary
echo "gpu_check took $(elapsed) s; results in $results"

#!/usr/bin/env bash
# "Which one should I use?": DSMAE and MAE tuned alike on a validation split at two scales,
# then DSMAE's settings at its chosen learning rate (benchmarks/RESULTS.md has the tables).
# Every stage is a `dsmae experiment grid`: resumable cell by cell, its cells shared with
# the other stages of the same scale. Run it again after an interruption to continue.
#
#   bash benchmarks/which_one/run.sh [STAGE ...]       (default: every stage, in order)
#
# STAGE: digits-methods, cifar-methods, digits-dsmae, digits-equal-time,
# digits-gradient-share, cifar-dsmae, cifar-gradient-share, cifar-equal-time,
# cifar-dsmae-long.
# Environment: DSMAE (the command; dsmae), RESULTS (runs/which_one), CIFAR (a CIFAR-10 image
# folder with train/ and test/, such as ../shared/data/cifar10-jpeg.tar.gz extracted),
# WORKERS (cells side by side; 2).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
SETTINGS=$(cd "$HERE/../settings" && pwd)  # the settings every benchmark shares (benchmarks/runs.py)
DSMAE=${DSMAE:-dsmae}
RESULTS=${RESULTS:-runs/which_one}
CIFAR=${CIFAR:-$HOME/.cache/dsmae/cifar10-jpeg/cifar10}
WORKERS=${WORKERS:-2}
PICK="python3 $HERE/pick.py"
# the settings the paper fixes and the ones ours, at their defaults (SPEC section 3)
# (the quickstart's teacher moves every step: the other rhythm is "epoch")
DEFAULTS='{"model.noise_ratio": 0.9, "model.lam": 0.6, "model.noise_std": 1.0,
  "model.target_layers": 1, "model.teacher_input": "clean", "train.ema_every": "step"}'

digits() {  # the quickstart's model and data, 20 epochs
  $DSMAE experiment grid --preset quickstart --results "$RESULTS/digits" --workers "$WORKERS" \
    --plot "$@"
}
cifar() {  # the CPU setting, 40 epochs on 1,024 images; k-NN bank and probe on 10k images
  $DSMAE experiment grid --config "$SETTINGS/cifar-cpu.yaml" --config "$HERE/cifar-study.yaml" \
    --data "$CIFAR" --bank 10000 --results "$RESULTS/cifar" --workers "$WORKERS" --plot "$@"
}
methods() {  # each method's base lr chosen on the validation split, then every seed
  "$1" --name methods --vary model.method=mae,dsmae-ly,dsmae --vary "train.base_lr=$2" \
    --select train.base_lr --seeds "$3"
}
equal_time() {  # mae pre-trained as long as dsmae took, at mae's chosen lr
  local json="$RESULTS/$2/methods.json"
  "$1" --name mae-equal-time --set model.method=mae --set "train.base_lr=$($PICK lr "$json" mae)" \
    --vary "train.epochs=$($PICK epochs "$json" mae dsmae)" --seeds "$3"
}

stage_digits_methods() { methods digits 2e-3,4e-3,8e-3,1.6e-2,3.2e-2 5; }
stage_cifar_methods() { methods cifar 7.5e-4,1.5e-3,3e-3,6e-3,1.2e-2 3; }  # 7.5e-4, 1.2e-2: RESULTS
stage_digits_dsmae() {  # noise ratio, lambda, sigma, targets, teacher input and rhythm
  local lr sweep key
  lr=$($PICK lr "$RESULTS/digits/methods.json" dsmae)
  for sweep in model.noise_ratio=0.75,0.9,0.95 model.lam=0.2,0.4,0.6,0.8 \
    model.noise_std=0.5,1.0,2.0 model.target_layers=1,2,4 model.teacher_input=clean,noisy \
    train.ema_every=epoch,step; do
    key=${sweep%%=*}
    digits --name "dsmae-${key##*.}" --set model.method=dsmae --set "train.base_lr=$lr" \
      --vary "$sweep" --seeds 5
  done
}
stage_digits_equal_time() { equal_time digits digits 5; }
stage_cifar_dsmae() {  # the two settings of DSMAE with the best validation k-NN on digits
  local lr variant key
  lr=$($PICK lr "$RESULTS/cifar/methods.json" dsmae)
  for variant in $($PICK variants 2 "$DEFAULTS" "$RESULTS"/digits/dsmae-*.json); do
    key=${variant%%=*}  # model.noise_std=0.5 -> dsmae-noise_std-0.5
    cifar --name "dsmae-${key##*.}-${variant#*=}" --set model.method=dsmae \
      --set "train.base_lr=$lr" --vary "$variant" --seeds 3
  done
}
stage_cifar_equal_time() { equal_time cifar cifar 3; }
stage_cifar_dsmae_long() {  # dsmae for as many epochs as mae had at equal time
  local json="$RESULTS/cifar/methods.json"
  cifar --name dsmae-long --set model.method=dsmae --set "train.base_lr=$($PICK lr "$json" dsmae)" \
    --vary "train.epochs=$($PICK epochs "$json" mae dsmae)" --seeds 3
}
stage_digits_gradient_share() {  # dsmae at its chosen lr, the gradient share every epoch
  local lr
  lr=$($PICK lr "$RESULTS/digits/methods.json" dsmae)
  $DSMAE pretrain --preset quickstart --set "train.base_lr=$lr" --set monitor.every=1 \
    --set probe.after_pretrain=false --out "$RESULTS/digits-gradient-share" --resume auto
}
stage_cifar_gradient_share() {  # dsmae at its chosen lr, the gradient share every 2 epochs
  local lr
  lr=$($PICK lr "$RESULTS/cifar/methods.json" dsmae)
  $DSMAE pretrain --config "$SETTINGS/cifar-cpu.yaml" --config "$HERE/cifar-study.yaml" \
    --data "$CIFAR" --set "train.base_lr=$lr" --set monitor.every=2 \
    --out "$RESULTS/cifar-gradient-share" --resume auto
}

STAGES=(digits-methods cifar-methods digits-dsmae digits-equal-time digits-gradient-share
  cifar-dsmae cifar-gradient-share cifar-equal-time cifar-dsmae-long)
for stage in "${@:-${STAGES[@]}}"; do
  echo "== $stage"
  "stage_${stage//-/_}"
done

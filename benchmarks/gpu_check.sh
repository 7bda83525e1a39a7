#!/usr/bin/env bash
# The GPU check: the code path users run, on one H100 / H200, in under 8 minutes.
#
#   benchmarks/gpu_check.sh RESULTS_DIR [CIFAR10_ARCHIVE]
#
# 1. `dsmae bench` (full training step, bf16): images/s, peak memory, model FLOPs and MFU
#    against a bf16 matmul measured in the same process, for dsmae and mae at ViT-Tiny
#    (32/2) and ViT-Small (96/6).
# 2. With the CIFAR-10 archive (../shared/data/cifar10-jpeg.tar.gz): a short real
#    pre-training of the cifar10-vit-tiny preset (GPU-resident data, k-NN monitor), then a
#    linear probe of its encoder and of the same encoder at random init.
# Everything measured lands in RESULTS_DIR: bench-*.json, pretrain/ (metrics.jsonl,
# config.yaml, last.linprobe*.json), summary.json and gpu_check.log.
set -euo pipefail
results=${1:?usage: benchmarks/gpu_check.sh RESULTS_DIR [CIFAR10_ARCHIVE]}
archive=${2:-}
mkdir -p "$results"
results=$(cd "$results" && pwd)
[ -z "$archive" ] || archive=$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")
cd "$(dirname "$0")/.."
exec > >(tee -a "$results/gpu_check.log") 2>&1

if [ ! -x .venv/bin/dsmae ]; then
  python3 -m venv .venv && .venv/bin/pip install -q -e .
fi
dsmae=.venv/bin/dsmae
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$results/gpu.txt"
start=$(date +%s)

# 1. speed, memory and MFU of the training step (synthetic batches: no data needed)
while read -r method arch img patch batch; do
  echo "== bench $method $arch $img/$patch batch $batch"
  timeout 150 "$dsmae" bench --method "$method" --arch "$arch" --img-size "$img" \
    --patch-size "$patch" --batch-size "$batch" --steps 20 --device cuda --json \
    > "$results/bench-$method-$arch.json" || echo "bench $method $arch failed (rc $?)"
  cat "$results/bench-$method-$arch.json"; echo
done <<'CONFIGS'
dsmae vit_tiny 32 2 512
mae vit_tiny 32 2 512
dsmae vit_small 96 6 256
mae vit_small 96 6 256
CONFIGS

# 2. a short real pre-training and probe on CIFAR-10
if [ -n "$archive" ]; then
  data="$results/data"
  mkdir -p "$data" && tar xzf "$archive" -C "$data"
  echo "== pre-training cifar10-vit-tiny for 20 epochs on $(nproc) CPUs + GPU"
  timeout 330 "$dsmae" pretrain --preset cifar10-vit-tiny --data "$data/cifar10" --epochs 20 \
    --set train.warmup_epochs=2 --micro-batch 1024 --set monitor.knn_every=5 \
    --set monitor.images_every=5 --set train.checkpoint_minutes=0 --out "$results/pretrain" \
    || echo "pre-training failed or ran out of time (rc $?)"
  if [ -f "$results/pretrain/last.pt" ]; then
    timeout 90 "$dsmae" linprobe --checkpoint "$results/pretrain/last.pt" --epochs 30 || true
    timeout 90 "$dsmae" linprobe --checkpoint "$results/pretrain/last.pt" --epochs 30 \
      --random-init || true
  fi
  rm -rf "$data"
fi

.venv/bin/python - "$results" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
summary = {"gpu": (results / "gpu.txt").read_text().strip(), "bench": {}}
for path in sorted(results.glob("bench-*.json")):
    try:
        summary["bench"][path.stem[len("bench-"):]] = json.loads(path.read_text())
    except json.JSONDecodeError:
        summary["bench"][path.stem[len("bench-"):]] = None
run = results / "pretrain"
if (run / "metrics.jsonl").is_file():
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    summary["pretrain"] = {
        "last": steps[-1] if steps else None,
        "knn": [r for r in records if "knn_top1" in r],
        "median_img_per_s": sorted(r["img_per_s"] for r in steps)[len(steps) // 2] if steps else None,
    }
    for name in ("last.linprobe.json", "last.linprobe-random-init.json"):
        if (run / name).is_file():
            summary["pretrain"][name] = json.loads((run / name).read_text())
(results / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
echo "gpu_check took $(( $(date +%s) - start )) s"

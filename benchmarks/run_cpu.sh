#!/usr/bin/env bash
# The CPU benchmark table of benchmarks/RESULTS.md, from one command:
#
#   benchmarks/run_cpu.sh [OUT_DIR]        (default runs/bench-cpu; about 20 min on 2 cores)
#
# Every row is one `dsmae bench --json` (full training step: forward, backward, AdamW,
# teacher EMA; fp32; median of the timed steps; MFU against a 4096^3 fp32 matmul timed in
# the same process), with each part also timed alone (--parts). Rows:
#   1. every method at ViT-Tiny 32/2 (batch 32) and ViT-Small 96/6 (batch 16);
#   2. tokens: dsmae ViT-Tiny on 32x32 images with patch 4, 2, 1 (64, 256, 1024 tokens);
#   3. batch: dsmae ViT-Tiny 32/2 at batch 8, 16, 32, 64;
#   4. reference: ViT-Tiny at 224/16, whose student part is a plain timm ViT forward and
#      backward (196 tokens);
#   5. the allocator: dsmae ViT-Tiny 32/2 at batch 32 and 64 through the Python API, which
#      leaves glibc malloc at its defaults (the dsmae command calls keep_freed_memory()).
# JSON lines go to OUT_DIR/bench.jsonl; the markdown table is printed and written to
# OUT_DIR/table.md. Run it on an otherwise idle machine.
set -euo pipefail
out=${1:-runs/bench-cpu}
cd "$(dirname "$0")/.."
mkdir -p "$out"
jsonl="$out/bench.jsonl"
: > "$jsonl"
dsmae=${DSMAE:-.venv/bin/dsmae}
python=${PYTHON:-.venv/bin/python}
steps=(--steps 5 --warmup 2 --device cpu --parts --json)

bench() {  # bench GROUP ARGS...: one row
  local group=$1; shift
  echo "[$(date +%T)] $group: dsmae bench $*" >&2
  "$dsmae" bench "$@" "${steps[@]}" | "$python" -c \
    'import json, sys; r = json.load(sys.stdin); r["group"] = sys.argv[1]; print(json.dumps(r))' \
    "$group" >> "$jsonl"
}

for method in dsmae dsmae-ly dsmae-lz mae; do
  bench methods --method "$method" --arch vit_tiny --img-size 32 --patch-size 2 --batch-size 32
done
for method in dsmae dsmae-ly dsmae-lz mae; do
  bench methods --method "$method" --arch vit_small --img-size 96 --patch-size 6 --batch-size 16
done
for patch in 4 2 1; do
  bench tokens --method dsmae --arch vit_tiny --img-size 32 --patch-size "$patch" --batch-size 8
done
for batch in 8 16 32 64; do
  bench batch --method dsmae --arch vit_tiny --img-size 32 --patch-size 2 --batch-size "$batch"
done
bench reference --method dsmae --arch vit_tiny --img-size 224 --patch-size 16 --batch-size 32
for batch in 32 64; do
  echo "[$(date +%T)] malloc-default: batch $batch through the Python API" >&2
  "$python" - "$batch" >> "$jsonl" <<'PY'
import json, sys
from dsmae.bench import run_bench
r = run_bench("dsmae", "vit_tiny", 32, 2, int(sys.argv[1]), steps=5, warmup=2, device="cpu",
              parts_time=True)
r["group"] = "malloc-default"
print(json.dumps(r))
PY
done
"$python" benchmarks/bench_table.py "$jsonl" | tee "$out/table.md"

"""The markdown table of ``dsmae bench --json`` lines (as ``benchmarks/run_cpu.sh`` writes).

python benchmarks/bench_table.py bench.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = (
    "group | method | arch | img/patch | tokens | batch | img/s | step ms | sum of parts ms | "
    "step over parts | GFLOP/img | achieved GFLOP/s | matmul peak GFLOP/s | MFU | "
    "student part MFU | peak RSS MB | machine"
)


def row(r: dict) -> str:
    tokens = (r["img_size"] // r["patch_size"]) ** 2
    parts = r.get("parts_mfu", {})
    cells = [
        r.get("group", ""),
        r["method"],
        r["arch"],
        f"{r['img_size']}/{r['patch_size']}",
        str(tokens),
        str(r["batch_size"]),
        f"{r['img_per_s']:.1f}",
        f"{r['step_ms']:.0f}",
        f"{r['sum_parts_ms']:.0f}" if "sum_parts_ms" in r else "",
        f"{100 * r['overhead_vs_parts']:+.1f}%" if "overhead_vs_parts" in r else "",
        f"{r['gflop_per_img']:.2f}",
        f"{r['achieved_gflops']:.0f}",
        f"{r['matmul_peak_gflops']:.0f}",
        f"{100 * r['mfu']:.1f}%",
        f"{100 * parts['student_fwd_bwd']:.1f}%" if parts else "",
        f"{r['peak_mem_mb']:.0f}",
        f"{r['device']}, {r['dtype']}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    lines = Path(sys.argv[1]).read_text().splitlines()
    print("| " + COLUMNS + " |")
    print("|" + " --- |" * len(COLUMNS.split(" | ")))
    for line in lines:
        if line.strip():
            print(row(json.loads(line)))


if __name__ == "__main__":
    main()

"""What the next stage of the study reads from the grids before it (run.sh calls it):

    python pick.py lr GRID.json METHOD            the base lr the grid chose for METHOD
    python pick.py epochs GRID.json FAST SLOW     FAST's epochs for SLOW's wall time
    python pick.py variants N DEFAULTS GRID.json...   the N best non-default settings

``variants`` ranks the rows of the one-key grids by their mean VALIDATION k-NN over the
seeds (the test split chooses nothing) and prints each as ``KEY=VALUE``; DEFAULTS is the
JSON of the defaults (``{"model.noise_ratio": 0.9, ...}``) whose rows are the baseline.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def rows(path: str) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["rows"]


def row_of(path: str, method: str) -> dict[str, Any]:
    return next(r for r in rows(path) if r["values"]["model.method"] == method)


def lr(path: str, method: str) -> float:
    return row_of(path, method)["selected"]["train.base_lr"]


def epochs(path: str, fast: str, slow: str) -> int:
    """The epochs at which ``fast`` takes ``slow``'s pre-training time: its own epochs
    times the ratio of their mean wall times."""
    data = json.loads(Path(path).read_text())
    own = {c["values"]["model.method"]: c["epochs"] for c in data["cells"]}
    ratio = row_of(path, slow)["pretrain_s"]["mean"] / row_of(path, fast)["pretrain_s"]["mean"]
    return round(own[fast] * ratio)


def variants(count: int, defaults: dict[str, Any], paths: list[str]) -> list[str]:
    ranked = []
    for path in paths:
        for row in rows(path):
            (key, value), *_ = ((k, v) for k, v in row["values"].items() if k in defaults)
            if value != defaults[key]:
                ranked.append((row["val_knn"]["mean"], f"{key}={value}"))
    return [setting for _, setting in sorted(ranked, reverse=True)[:count]]


if __name__ == "__main__":
    action, *args = sys.argv[1:]
    if action == "lr":
        print(lr(*args))
    elif action == "epochs":
        print(epochs(*args))
    elif action == "variants":
        print(" ".join(variants(int(args[0]), json.loads(args[1]), args[2:])))
    else:
        raise SystemExit(__doc__)

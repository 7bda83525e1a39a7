"""Reading the results an evaluation saved beside a checkpoint, where results of other
settings are kept side by side (``dsmae.evaluation.results.result_file``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def latest_result(folder: Path, stem: str) -> dict[str, Any]:
    """The newest result saved as ``<stem>.json`` or beside it as
    ``<stem>.<digest>.json`` (``stem``: e.g. ``last.knn`` or ``last.linprobe-cls``)."""
    candidates = [folder / f"{stem}.json", *folder.glob(f"{stem}.??????????.json")]
    newest = max((p for p in candidates if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(newest.read_text())

"""The checkpoints a snapshot kept, resumed with other code: they must end as the
uninterrupted runs did."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .commands import Step
from .comparison import MISSING, Difference, _shown, differences
from .record import dsmae_location, load_snapshot, places_of, run_step, write_json

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)\.pt$")


def resumed_differences(
    before: Mapping[str, Any], after: Mapping[str, Any], step: int
) -> list[Difference]:
    """The differences between the run folder record of the uninterrupted run
    (``before``) and that of the run resumed at ``step`` (``after``): the metrics after
    ``step`` and every file, but the periodic checkpoints up to ``step``."""
    found = []
    for name, record in before.items():
        written = CHECKPOINT_NAME.search(name)
        if written and int(written.group(1)) <= step:
            continue
        if name not in after:
            found.append(Difference(name, record, MISSING))
        elif record["kind"] == "metrics":
            later = [[r for r in rec["data"] if r["step"] > step] for rec in (record, after[name])]
            if not later[0]:
                found.append(Difference(name, "no metrics after the resumed step", later[1]))
            found += differences(later[0], later[1], name)
        else:
            found += differences(record, after[name], name)
    return found


def resume(src: Path, old: Path, out: Path) -> int:
    """Continue each checkpoint kept by the snapshot ``old`` with the code at ``src`` in
    the new folder ``out``; 0 when every resumed run ends as the uninterrupted one."""
    src, old, out = src.resolve(), old.resolve(), out.resolve()
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} is not empty")
    dsmae_location(src)
    before = load_snapshot(old)
    places = places_of(out, src)
    report: dict[str, Any] = {}
    for method, kept in sorted(before["resume_from"].items()):
        target = out / kept["checkpoint"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(old / kept["checkpoint"], target)
        step = Step(f"{method}/resume", (*kept["command"], "--resume", kept["checkpoint"]),
                    (kept["run"],))  # fmt: skip
        done = run_step(step, out, src, places)
        uninterrupted = before["steps"][kept["pretrain_step"]]["files"][kept["run"]]["data"]
        resumed = done["files"].get(kept["run"], {"data": {}})["data"]
        found = resumed_differences(uninterrupted, resumed, kept["step"])
        if done["returncode"] != 0:
            found.insert(0, Difference("returncode", 0, done["returncode"]))
        passed = not found
        report[method] = {"step": kept["step"], "passed": passed,
                          "differences": [d.__dict__ for d in found]}  # fmt: skip
        print(f"{method}: resumed at step {kept['step']}: {'PASS' if passed else 'FAIL'} "
              f"({len(uninterrupted)} files compared)")  # fmt: skip
        for difference in found:
            print(f"  {difference.path}\n    before: {_shown(difference.before)}\n"
                  f"    after:  {_shown(difference.after)}")  # fmt: skip
    write_json(out / "resume.json", report)
    return 0 if report and all(r["passed"] for r in report.values()) else 1

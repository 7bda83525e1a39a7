"""Every difference of two snapshots, and what a comparison counted."""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .record import load_snapshot

MISSING = "<missing>"


@dataclass(frozen=True)
class Difference:
    """One difference of two snapshots: where (``a/b/[3]``), and the two values."""

    path: str
    before: Any
    after: Any


def _is_lines(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def differences(before: Any, after: Any, path: str = "") -> list[Difference]:
    """Every difference between two JSON values, by key path (keys joined by ``/``, list
    items as ``[i]``); lists of lines compared as a diff (``[i:j]``), values as canonical
    JSON (so NaN equals NaN)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(before.keys() | after.keys()):
            where = f"{path}/{key}" if path else key
            if key not in after:
                found.append(Difference(where, before[key], MISSING))
            elif key not in before:
                found.append(Difference(where, MISSING, after[key]))
            else:
                found += differences(before[key], after[key], where)
        return found
    if _is_lines(before) and _is_lines(after) and (before or after):
        matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
        return [
            Difference(f"{path}[{i1}:{i2}]", before[i1:i2], after[j1:j2])
            for tag, i1, i2, j1, j2 in matcher.get_opcodes()
            if tag != "equal"
        ]
    if isinstance(before, list) and isinstance(after, list):
        found = []
        for index in range(max(len(before), len(after))):
            b = before[index] if index < len(before) else MISSING
            a = after[index] if index < len(after) else MISSING
            found += differences(b, a, f"{path}[{index}]")
        return found
    if json.dumps(before, sort_keys=True) != json.dumps(after, sort_keys=True):
        return [Difference(path, before, after)]
    return []


def item_kind(key: str, value: Any, kind: str) -> str:
    """The kind of the items under ``key`` (inside ``kind``), for the counts of
    :func:`count_items`."""
    if isinstance(value, Mapping) and "kind" in value and "data" in value:
        return str(value["kind"])
    if key in ("stdout", "stderr"):
        return "print-config lines" if kind == "print-config" else "printed lines"
    if key.startswith("print-config/"):
        return "print-config"
    if key in ("returncode", "command"):
        return key
    return kind


def count_items(value: Any, kind: str = "other") -> Counter[str]:
    """How many values (lines, numbers, hashes) a snapshot holds, per kind."""
    counts: Counter[str] = Counter()
    if isinstance(value, Mapping):
        for key, child in value.items():
            if key == "kind" and "data" in value:
                continue  # a record's label, not an item
            counts += count_items(child, item_kind(str(key), child, kind))
    elif isinstance(value, list):
        for child in value:
            counts += count_items(child, kind)
    else:
        counts[kind] += 1
    return counts


def allowed(difference: Difference, prefixes: Sequence[str]) -> bool:
    """Whether a difference lies under one of the ``--allow`` key-path prefixes."""
    return any(difference.path.startswith(prefix) for prefix in prefixes)


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 400 else text[:400] + "..."


def compare(before: Path, after: Path, allow: Sequence[str]) -> int:
    """Print every difference between two snapshots; 1 if any is not allowed, else 0."""
    old, new = load_snapshot(before), load_snapshot(after)
    found = differences(old, new)
    refused = [d for d in found if not allowed(d, allow)]
    for difference in found:
        mark = "allowed " if allowed(difference, allow) else ""
        print(f"{mark}{difference.path}\n  before: {_shown(difference.before)}\n"
              f"  after:  {_shown(difference.after)}")  # fmt: skip
    counts = count_items(old)
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    if refused:
        print(f"{len(refused)} difference(s) ({len(found) - len(refused)} allowed); "
              f"compared {summary}")  # fmt: skip
        return 1
    print(f"no difference ({len(found)} allowed); compared {summary}")
    return 0

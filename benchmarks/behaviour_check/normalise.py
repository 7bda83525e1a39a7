"""What varies from run to run goes, what a change of behaviour shows stays: printed lines
and JSON without clocks, durations, rates and the snapshot's paths."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .commands import RUN_ID_MARK

TIMING_KEYS = frozenset({
    "wall_s", "img_per_s", "setup_s", "compile_s", "peak_mem_mb", "step_ms", "data_ms",
    "data_share", "parts_ms", "sum_parts_ms", "mfu", "parts_mfu", "achieved_gflops",
    "matmul_peak_gflops", "matmul_size", "matmul_dtype", "matmul_peaks",
    "self_cpu_time_total", "self_device_time_total", "time", "timestamp", "elapsed", "eta",
})  # fmt: skip


TIMING_SUFFIXES = ("_s", "_ms", "_mb", "_seconds", "_per_s")


CLOCK = re.compile(r"^\d{2}:\d{2}:\d{2}(?:[.,]\d+)? ")


LOGGER = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?(?:img/s|it/s|s/it|ms|s|min|h)\b")


PROGRESS_BAR = re.compile(r"\d+%\|")


WARNING_PLACE = re.compile(r"^\S+\.py:\d+: (?=\w*Warning)")


def is_timing_key(key: str) -> bool:
    """Whether a metrics or result key holds a duration, a rate, a memory peak or a
    hardware-speed reading (which vary from run to run), e.g. ``wall_s``, ``img_per_s``."""
    return key in TIMING_KEYS or key.endswith(TIMING_SUFFIXES)


def replace_paths(text: str, places: Mapping[str, str]) -> str:
    """``text`` with every path of ``places`` (path -> mark, longest first) by its mark."""
    for path in sorted(places, key=len, reverse=True):
        text = text.replace(path, places[path])
    return text


def normalise_json(value: Any, places: Mapping[str, str]) -> Any:
    """A JSON value without timing keys (at any depth), ``run_id`` as ``<run_id>`` and
    the paths of ``places`` as their marks in every string."""
    if isinstance(value, Mapping):
        return {
            str(k): RUN_ID_MARK if k == "run_id" else normalise_json(v, places)
            for k, v in value.items()
            if not is_timing_key(str(k))
        }
    if isinstance(value, list | tuple):
        return [normalise_json(v, places) for v in value]
    if isinstance(value, str):
        return replace_paths(value, places)
    return value


def freeze_timings(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records whose timing values (:func:`is_timing_key`) are fixed numbers,
    ``1000 + step``: what a figure drawn from them shows no longer varies."""
    return [
        {k: 1000.0 + r["step"] if is_timing_key(k) and isinstance(v, int | float) else v
         for k, v in r.items()}
        for r in records
    ]  # fmt: skip


def normalise_line(line: str, places: Mapping[str, str]) -> str | None:
    """One printed line without what varies from run to run, or None for a progress bar.

    ``12:01:02 INFO dsmae.engine: epoch 1/3: loss 0.7, 1506 img/s, 1 s elapsed, ETA 3 s``
    -> ``INFO: epoch 1/3: loss 0.7, <t>, <t> elapsed, ETA <t>``; a line holding a JSON
    object -> that object without timing keys, keys sorted."""
    line = replace_paths(line.split("\r")[-1].rstrip(), places)
    if PROGRESS_BAR.search(line):
        return None
    stripped = line.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return json.dumps(normalise_json(parsed, places), sort_keys=True)
    line = LOGGER.sub(r"\1: ", CLOCK.sub("", line))
    line = WARNING_PLACE.sub("<file>: ", line)
    return DURATION.sub("<t>", line)


def normalise_lines(text: str, places: Mapping[str, str]) -> list[str]:
    """The printed ``text`` as normalised lines (:func:`normalise_line`), bars left out."""
    printed = text.split("\n")  # not splitlines(): a bar's carriage returns end no line
    if printed[-1] == "":
        printed.pop()
    lines = (normalise_line(line, places) for line in printed)
    return [line for line in lines if line is not None]

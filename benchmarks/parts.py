"""What the benchmark packages (``gpu_check``, ``behaviour_check``, ``gap_curves``) share:
a package whose names are those of its parts, each part a module of one stage."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any


def names_of_parts(package: str, parts: Sequence[str]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package`` (PEP 562): a part (``gpu_check.cli``), or a name
    of one, the first part that has it (``gpu_check.main`` is ``gpu_check.cli.main``)."""

    def lookup(name: str) -> Any:
        if name in parts:
            return importlib.import_module(f"{package}.{name}")
        for part in parts:
            module = importlib.import_module(f"{package}.{part}")
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return lookup

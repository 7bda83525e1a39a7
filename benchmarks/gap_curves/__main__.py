"""``python benchmarks/gap_curves ...``: the command line of :mod:`gap_curves`."""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/, not the package itself

from gap_curves.cli import main  # noqa: E402 (after the path is set)

sys.exit(main())

"""``python benchmarks/behaviour_check ...``: the command line of :mod:`behaviour_check`."""

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # benchmarks/, not the package itself

from behaviour_check.cli import main  # noqa: E402 (after the path is set)

sys.exit(main())

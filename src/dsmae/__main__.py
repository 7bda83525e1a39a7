"""``python -m dsmae`` is the ``dsmae`` command."""

import sys

from dsmae.cli import main

sys.exit(main())

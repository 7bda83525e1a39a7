"""Experiments: the paper's grids (:mod:`~dsmae.experiments.paper`: Table 2, Table 3,
Fig. 3, Fig. 4) and a user's own grid of any config keys, every setting chosen on a
validation split (:mod:`~dsmae.experiments.grid`, its cells run side by side by
:mod:`~dsmae.experiments.workers`, its table and figure by
:mod:`~dsmae.experiments.grid_report`).

Nothing here imports torch or matplotlib at import time: ``dsmae --help`` reads the
names of the grids from here.
"""

from dsmae.experiments.grid import GridSpec, parse_vary, run_spec
from dsmae.experiments.paper import (
    BACKBONES,
    DATASETS,
    GRIDS,
    NOISE_RATIOS,
    Cell,
    GridSettings,
    cell_config,
    draw_curve,
    grid_cells,
    paper_value,
    run_cell,
    run_grid,
    run_tuned_sweep,
    table_markdown,
)

__all__ = [
    "BACKBONES",
    "DATASETS",
    "GRIDS",
    "NOISE_RATIOS",
    "Cell",
    "GridSettings",
    "GridSpec",
    "cell_config",
    "draw_curve",
    "grid_cells",
    "paper_value",
    "parse_vary",
    "run_cell",
    "run_grid",
    "run_spec",
    "run_tuned_sweep",
    "table_markdown",
]

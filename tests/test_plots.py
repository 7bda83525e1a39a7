"""``dsmae.plots``: curves of a run folder."""

import numpy as np
import pytest
from PIL import Image

from dsmae.data.images import DataError
from dsmae.plots import plot_run


def test_curves_of_a_run(digits_run, tmp_path):
    out = plot_run(digits_run, tmp_path / "c.png")
    with Image.open(out) as image:
        assert image.size == (1100, 700)
        assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn, not blank


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"no metrics\.jsonl"):
        plot_run(tmp_path)

"""``dsmae.plots``: curves of a run folder."""

import numpy as np
import pytest
from PIL import Image

from dsmae.data.images import DataError
from dsmae.plots import plot_run


def test_curves_of_a_run(digits_run, tmp_path):
    out = plot_run(digits_run, tmp_path / "c.png")
    with Image.open(out) as image:
        assert image.size == (1500, 700)  # six panels: the gradient share among them
        assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn, not blank


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"no metrics\.jsonl"):
        plot_run(tmp_path)


def test_the_gradient_share_panel_draws_both_terms_and_their_cosine():
    from matplotlib.figure import Figure

    from dsmae.plots import _draw_gradient_share

    lines = [{"epoch": e, "health_grad_norm_y": 4.0 / e, "health_grad_norm_z": 0.5 / e,
              "health_grad_cosine_y_z": 0.01 * e} for e in (1, 2, 3)]  # fmt: skip
    ax = Figure().subplots()
    _draw_gradient_share(ax, lines)
    assert [line.get_label() for line in ax.get_lines()] == ["lam L_y", "(1-lam) L_z"]
    assert list(ax.get_lines()[1].get_ydata()) == [0.5, 0.25, 0.5 / 3]
    twin = next(other for other in ax.figure.axes if other is not ax)
    assert twin.get_ylabel() == "cosine of the two gradients"
    empty = Figure().subplots()
    _draw_gradient_share(empty, [])
    assert not empty.axison  # no monitor lines: a note, no axes

"""``dsmae.budget``: how many epochs fit a wall-clock budget (hand computations). The
loop's use of it is in ``pretrain/test_time_budget.py``."""

import pytest

from dsmae.budget import MARGIN, epochs_in_budget
from dsmae.config import ConfigError


def test_the_epochs_that_fit_by_hand():
    # 100 s: 10 s gone, 2 s for the end, so (100 - 10 - 2) * 0.97 = 85.36 s for epochs of
    # 4 s: 21 of them
    assert MARGIN == 0.03
    assert epochs_in_budget(100, 10, 4.0, 2.0, most=500) == 21
    assert epochs_in_budget(100, 10, 4.0, 2.0, most=15) == 15  # the smaller of the two wins
    assert epochs_in_budget(100, 10, 80.0, 2.0, most=500) == 1  # just one
    assert epochs_in_budget(100, 0, 0.0, 0.0, most=7) == 7  # free epochs: all of them


def test_a_budget_that_fits_no_epoch_is_refused_with_the_figures():
    with pytest.raises(ConfigError, match=r"100 s fits no epoch: the set-up took 10 s and one "
                       r"epoch takes about 90\.0 s; give at least 105 s"):  # fmt: skip
        epochs_in_budget(100, 10, 90.0, 2.0, most=500)

"""``dsmae.budget``: durations as written on the command line, and how many epochs fit a
wall-clock budget (hand computations). The loop's use of it is in ``pretrain/test_loop.py``."""

import pytest

from dsmae.budget import MARGIN, epochs_in_budget, parse_duration
from dsmae.config import ConfigError, build_config


@pytest.mark.parametrize(
    "text,seconds",
    [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400), (" 45 S", 45)],
)
def test_durations_are_read_as_written(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "10x", "m", "-5m", "1h-30m", "", "0s", "0h0m"])
def test_what_is_no_duration_is_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"^train\.time_budget: ") as refused:
        parse_duration(text)
    assert refused.value.key == "train.time_budget"


def test_the_config_refuses_a_budget_that_is_no_duration():
    assert build_config(overrides={"train.time_budget": "2h"}).train.time_budget == "2h"
    with pytest.raises(ConfigError, match=r"train\.time_budget: write a duration such as 90s"):
        build_config(overrides={"train.time_budget": "two hours"})


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

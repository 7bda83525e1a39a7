"""The checks every config section is made of: durations as written on the command line,
and what a message quotes of a value."""

import pytest

from dsmae.config import ConfigError, build_config
from dsmae.config.checks import parse_duration


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

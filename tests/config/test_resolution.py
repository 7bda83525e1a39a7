"""Resolution and the checks across sections, made before any folder is claimed."""

import pytest

from dsmae.config import (
    ConfigError,
    build_config,
)


def test_only_empty_output_folders_are_refused_outside_the_sections():
    with pytest.raises(ConfigError, match="out: must name a folder"):
        build_config(overrides={"out": "  "})


def test_a_probe_after_pretraining_on_shards_is_refused_before_any_work():
    shards = {"data.source": "shards/train-{000000..000009}.tar", "data.samples_per_epoch": 64}
    with pytest.raises(ConfigError, match=r"probe\.after_pretrain: .* stream of WebDataset shards"):
        build_config(overrides={**shards, "probe.after_pretrain": True})
    assert not build_config(overrides=shards).probe.after_pretrain  # the default is fine

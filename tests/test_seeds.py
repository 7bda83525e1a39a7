"""The seed formulas: every run's random streams depend on them, so they are pinned."""

from dsmae.seeds import (
    epoch_order_seed,
    finetune_epoch_seed,
    pretrain_step_seed,
    probe_step_seed,
    process_seed,
)


def test_step_seeds_by_hand():
    assert pretrain_step_seed(0, 0) == 7 * 1_000_000_007
    assert pretrain_step_seed(2, 5) == (2 * 1_000_003 + 7) * 1_000_000_007 % 2**62 + 5
    assert probe_step_seed(1, 3) == (1_000_003 + 11) * 1_000_000_007 % 2**62 + 3
    assert pretrain_step_seed(1, 3) != probe_step_seed(1, 3)


def test_order_and_process_seeds_by_hand():
    assert epoch_order_seed(3, 4) == 3 * 100_003 + 4
    assert finetune_epoch_seed(3, 4) == 7
    assert process_seed(3, 2) == 5


def test_seeds_stay_below_the_generator_limit():
    assert pretrain_step_seed(2**40, 10**6) < 2**63

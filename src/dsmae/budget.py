"""A pre-training that fits a wall-clock budget (``dsmae pretrain --time-budget 2h``).

After its set-up, a budgeted run times a few real training steps (after warm-up steps,
which include ``torch.compile``'s compilation), undoes them, and then fixes ``train.epochs``
to the most epochs whose steps, checkpoints and monitors end within the budget
(:func:`epochs_in_budget`), never more than the configured ``train.epochs``. The learning
rate's warm-up and cosine and the teacher's momentum schedule are then those of a run of
that many epochs, which end on time; the choice is recorded in the run's config (and so in
its checkpoints), and a resumed run keeps it. The pure arithmetic lives here; the timing,
in :mod:`dsmae.pretrain.time_budget`; the budget's duration is read by
:func:`dsmae.config.checks.parse_duration`.
"""

from __future__ import annotations

import math

from dsmae.config import ConfigError

MARGIN = 0.03  # the share of the time left that is kept free, for the rate's drift


def epochs_in_budget(
    budget_s: float, elapsed_s: float, epoch_s: float, end_s: float, most: int
) -> int:
    """The most epochs, at most ``most``, that end within ``budget_s`` seconds.

    ``elapsed_s`` have passed (set-up and the timed steps); each epoch takes ``epoch_s``
    (its steps, and its share of checkpoints and monitors), and the end of the run
    (``last.pt``, the figure) ``end_s``. :data:`MARGIN` of the time left is kept free.

    Raises:
        ConfigError: not even one epoch fits, with the figures.
    """
    left = (budget_s - elapsed_s - end_s) * (1 - MARGIN)
    fit = math.floor(left / epoch_s) if epoch_s > 0 else most
    if fit < 1:
        raise ConfigError(
            f"train.time_budget: {budget_s:g} s fits no epoch: the set-up took "
            f"{elapsed_s:.0f} s and one epoch takes about {epoch_s:.1f} s; give at least "
            f"{math.ceil(elapsed_s + end_s + epoch_s / (1 - MARGIN))} s",
            "train.time_budget",
        )
    return min(most, fit)

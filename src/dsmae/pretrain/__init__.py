"""Pre-training (SPEC section 5): AdamW, warm-up + cosine learning rate, the teacher's
momentum schedule, gradient accumulation, bf16 autocast on GPU, metrics, monitoring,
checkpoints and exact resume, on one process or many under ``torchrun``.

Read it in this order:

- :mod:`~dsmae.pretrain.loop`: ``pretrain()`` and the training loop;
- :mod:`~dsmae.pretrain.setup`: folder lock, data or stream, model, optimizer, DDP, compile;
- :mod:`~dsmae.pretrain.step`: one step (gather, draw, augment, forward/backward/optimizer,
  teacher), the same for the loop and ``dsmae bench``;
- :mod:`~dsmae.pretrain.schedule`: per step, the learning rate, the momentum and whether
  the teacher moves;
- :mod:`~dsmae.pretrain.state`: the run's state;
- :mod:`~dsmae.pretrain.saving`: when a save is due, checkpoint names, pruning, stopping
  on a signal; :mod:`~dsmae.pretrain.resume` and :mod:`~dsmae.pretrain.run_folder`: where a
  run continues from, and one run per folder;
- :mod:`~dsmae.pretrain.report` and :mod:`~dsmae.pretrain.monitor`: log lines, metrics,
  the k-NN / health / image monitors; :mod:`~dsmae.pretrain.divergence`: skipped steps;
- :mod:`~dsmae.pretrain.time_budget`: ``train.time_budget``.

``dsmae.pretrain(cfg)`` is :func:`~dsmae.pretrain.loop.pretrain`: this package is callable.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from dsmae.pretrain.divergence import DivergedError
from dsmae.pretrain.loop import pretrain
from dsmae.pretrain.state import PretrainResult

__all__ = ["DivergedError", "PretrainResult", "pretrain"]


class _CallablePackage(types.ModuleType):
    """``dsmae.pretrain`` is both this package and the function that pre-trains."""

    def __call__(self, *args: Any, **kwargs: Any) -> PretrainResult:
        return pretrain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage

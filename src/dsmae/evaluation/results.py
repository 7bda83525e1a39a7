"""What every evaluation protocol (linear probe, k-NN, fine-tuning) shares.

Every protocol is one call of the same shape::

    result = protocol(checkpoint, cfg, random_init=False)  # -> an EvalResult

``checkpoint`` is a :class:`~dsmae.checkpoint.Checkpoint` (read once), ``cfg`` the
checkpoint's config with the evaluation's changes (:func:`~dsmae.config.build_config`,
the checkpoint's as its ``base``; None: the checkpoint's own), from which each protocol
reads its section (``probe``, ``monitor``'s k-NN values or ``finetune``), ``data`` (the
labelled data set, :func:`labelled_splits`) and ``train.device``/``train.seed``. The
result is an :class:`EvalResult`, written beside the checkpoint as
``<stem>.<protocol>[-cls][-random-init].json`` (:meth:`EvalResult.save`); a result of
other settings already there is kept, the new one going beside it under a name that ends
in a digest of its settings (:func:`result_file`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from dsmae.checkpoint import Checkpoint
from dsmae.config import DataConfig, ModelConfig
from dsmae.data.images import DataError, ImageTensors
from dsmae.data.pipeline import load_split
from dsmae.writes import WriteError, atomic_write_text, unwritable_reason

log = logging.getLogger(__name__)

# the fields every result takes from what it was measured on (LabelledSplits.measured_on)
MEASURED_ON = ("num_train", "num_test", "num_classes", "data", "random_init", "checkpoint")


@dataclass
class EvalResult:
    """What every protocol returns: the test top-1 (%) and what it was measured on.

    Each protocol's result adds its own fields; ``keys`` lists them all in the order of
    the JSON object that :meth:`save` writes to :attr:`path`.
    """

    protocol: ClassVar[str]  # "linprobe", "knn" or "finetune": the middle of the file name
    keys: ClassVar[tuple[str, ...]]  # every field, in the order of the JSON object
    # the fields that make two results of a checkpoint the same evaluation (the rest is
    # what it measured): one of other settings never replaces it
    identity_keys: ClassVar[tuple[str, ...]] = ("pool", "data", "random_init")

    top1: float  # test top-1 in % (of the last epoch, where the protocol trains)
    pool: str  # the features: "avg" (mean of the patch tokens) or "cls" ([CLS] token)
    num_train: int
    num_test: int
    num_classes: int
    data: str  # the data set or folder evaluated on
    random_init: bool  # the checkpoint's architecture at random initialisation (a baseline)
    checkpoint: str  # the checkpoint file, as given
    # where :meth:`keep` wrote it; None: not (yet) written
    saved: Path | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The result as the JSON object it is saved as (``keys`` in their order)."""
        fields = dataclasses.asdict(self)
        return {key: fields[key] for key in self.keys}

    def identity(self) -> dict[str, Any]:
        """What makes this result the evaluation it is (:attr:`identity_keys`)."""
        values = self.to_dict()
        return {key: values[key] for key in self.identity_keys}

    @property
    def path(self) -> Path:
        """Where it is saved: :func:`result_path` of its checkpoint, protocol and variant,
        or beside a result of other settings there (:func:`result_file`)."""
        plain = result_path(self.checkpoint, self.protocol, self.random_init, self.pool)
        return result_file(plain, self.identity())

    def save(self) -> Path:
        """Write :meth:`to_dict` as JSON to :attr:`path` (atomically); returns the path.

        Raises:
            WriteError: it could not be written.
        """
        atomic_write_text(self.path, json.dumps(self.to_dict(), indent=2) + "\n", "result")
        self.saved = self.path
        return self.path

    def keep(self) -> Path | None:
        """:meth:`save`, or where the file cannot be written a warning: the result is
        then only in memory, for the caller to print (``saved`` stays None)."""
        try:
            return self.save()
        except WriteError as err:
            log.warning("%s; the result is printed instead", err)
            return None

    def to_json(self) -> str:
        """:meth:`to_dict` on one line, as printed where the file could not be written."""
        return json.dumps(self.to_dict())


@dataclass
class TrainedResult(EvalResult):
    """The result of a protocol that trains for ``epochs`` (linear probe, fine-tuning):
    ``top1`` is the LAST epoch's, the best epoch's is recorded beside it, labelled as such
    (SPEC section 6); ``settings`` (:func:`evaluation_settings`) is what a result on disk
    is compared against before it is reused."""

    identity_keys = (*EvalResult.identity_keys, "settings")

    best_top1: float
    best_epoch: int  # 1-based
    epochs: int
    settings: dict[str, Any]

    @staticmethod
    def trained_fields(history: Sequence[float], section: Any, data: str) -> dict[str, Any]:
        """The fields a per-epoch top-1 ``history`` gives (``top1``: the last epoch's,
        ``best_top1``, ``best_epoch``), with ``epochs`` and ``settings`` of the config
        ``section`` it was trained with (a ``ProbeConfig`` or ``FinetuneConfig``) on
        ``data``."""
        best_top1, best = best_epoch(history)
        settings = evaluation_settings(section, data)
        fields = (history[-1], best_top1, best, section.epochs, settings)
        return dict(
            zip(("top1", "best_top1", "best_epoch", "epochs", "settings"), fields, strict=True)
        )


def warn_if_unwritable(path: Path) -> bool:
    """Whether the result file ``path`` can be written into its folder, found out before
    any work: when not, a warning says so now, and that the result will be printed."""
    why = unwritable_reason(path.parent)
    if why is not None:
        log.warning("the result cannot be written to %s (%s): it will be printed", path, why)
    return why is None


def best_epoch(history: Sequence[float]) -> tuple[float, int]:
    """The best top-1 of a per-epoch history and its 1-based epoch (the first on ties),
    shown beside the last epoch's, labelled as such (SPEC section 6)."""
    best = max(range(len(history)), key=history.__getitem__)
    return history[best], best + 1


def result_path(
    checkpoint: str | Path, protocol: str, random_init: bool = False, pool: str = "avg"
) -> Path:
    """Where an evaluation of ``checkpoint`` is written: beside it, as
    ``<stem>.<protocol>[-cls][-random-init].json`` (protocol: linprobe, knn, finetune;
    ``-cls`` for the [CLS] features, so that both poolings can be kept)."""
    path = Path(checkpoint)
    variant = ("-cls" if pool == "cls" else "") + ("-random-init" if random_init else "")
    return path.with_name(f"{path.stem}.{protocol}{variant}.json")


def _saved_identity(path: Path, keys: Iterable[str]) -> dict[str, Any] | None:
    """The identity fields of the result saved at ``path``; None where it cannot be read."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return {key: saved.get(key) for key in keys} if isinstance(saved, dict) else None


def result_file(plain: Path, identity: dict[str, Any]) -> Path:
    """Where a result of ``identity`` (its :meth:`EvalResult.identity`) goes: ``plain``
    where that is free or holds a result of the same identity (an evaluation made again);
    else ``<plain stem>.<digest of identity>.json`` beside it, so that results of other
    settings never replace each other."""
    if not plain.exists() or _saved_identity(plain, identity) == identity:
        return plain
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return plain.with_name(f"{plain.stem}.{digest}.json")


def find_result(plain: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The result of ``identity`` saved at ``plain`` or beside it (:func:`result_file`);
    None where there is none."""
    path = result_file(plain, identity)
    if path.is_file() and _saved_identity(path, identity) == identity:
        return json.loads(path.read_text())
    return None


# Config keys that say how an evaluation runs or when, not what it computes.
_NOT_SETTINGS = ("workers", "after_pretrain", "random_baseline")


def evaluation_settings(section: Any, data: str) -> dict[str, Any]:
    """What an evaluation result depends on: its config section (a ``ProbeConfig`` or
    ``FinetuneConfig``) without the keys that change only how it runs (``workers``) or
    when (``after_pretrain``, ``random_baseline``), and the data it ran on. Saved in every
    result as ``settings``; a cached result is reused only for equal settings."""
    fields = dataclasses.asdict(section)
    return {**{k: v for k, v in fields.items() if k not in _NOT_SETTINGS}, "data": data}


@dataclass
class LabelledSplits:
    """The splits an evaluation runs on: "train" and "test" images (N, C, H, W) and
    (M, C, H, W) uint8 on the CPU, each with its class labels, and ``data``, the data set
    or folder they came from."""

    train: ImageTensors
    test: ImageTensors
    data: str

    def measured_on(self, checkpoint: Checkpoint, random_init: bool) -> dict[str, Any]:
        """The :data:`MEASURED_ON` fields of a result of ``checkpoint`` on these splits."""
        counts = (len(self.train), len(self.test), len(self.train.classes))
        values = (*counts, self.data, random_init, str(checkpoint.path))
        return dict(zip(MEASURED_ON, values, strict=True))


def labelled_splits(data: DataConfig, model: ModelConfig, purpose: str) -> LabelledSplits:
    """The "train" and "test" splits of ``data``, refused unless every image has a class.

    Args:
        purpose: what needs the labels, for the message (e.g. "a linear probe").

    Raises:
        DataError: a split without class labels (a folder without class sub-folders).
    """
    splits = {split: load_split(data, model, split) for split in ("train", "test")}
    for split, tensors in splits.items():
        if not tensors.classes or bool((tensors.labels < 0).any()):
            raise DataError(
                f"the {split} split of {data.source} has unlabelled images; {purpose} "
                "needs class labels (for a folder: one sub-folder per class)"
            )
    return LabelledSplits(splits["train"], splits["test"], data.source)

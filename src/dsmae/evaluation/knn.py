"""Weighted k-nearest-neighbour classification on frozen features.

This is the monitoring protocol of self-supervised pre-training introduced with
instance discrimination (Wu et al., 2018, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination") and popularised by DINO's ``knn_classifier``
(Caron et al., 2021), later adopted by solo-learn and lightly:

1. Train and test features are L2-normalised, so the dot product of two of them is
   their cosine similarity; the magnitude of a feature has no effect.
2. For each test feature the ``k`` training features with the highest similarity
   ``s_i`` are found (``k = 20`` by default).
3. Each of those neighbours votes for its own label with weight ``exp(s_i / T)``
   (``T = 0.07`` by default); the predicted class is the one with the largest sum of
   votes.

The test set is processed in chunks of ``chunk_size`` rows, so only a
``(chunk_size, N)`` similarity matrix exists at any time. Everything runs on the
device the feature tensors are on (CPU or CUDA), without gradients.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch
import torch.nn.functional as F

from dsmae.checkpoint import Checkpoint
from dsmae.config import Config
from dsmae.evaluation.frozen import frozen_features
from dsmae.evaluation.results import EvalResult, labelled_splits, result_path, warn_if_unwritable
from dsmae.runtime import resolve_device

__all__ = ["KnnResult", "knn_accuracy", "knn_eval", "knn_predict"]

log = logging.getLogger(__name__)


def _as_float(features: torch.Tensor) -> torch.Tensor:
    """Return ``features`` (any shape) in a float dtype at least as precise as float32."""
    if features.dtype == torch.float64:
        return features
    return features.to(torch.float32)


def _validate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
) -> None:
    """Raise ``ValueError`` unless the arguments of :func:`knn_predict` are consistent.

    Expected shapes: ``train_features`` (N, D), ``train_labels`` (N,), ``test_features``
    (M, D), with N >= 1 and labels integers in ``[0, num_classes)``.
    """
    _check_shapes(train_features, train_labels, test_features)
    _check_labels(train_features, train_labels, test_features, num_classes)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_shapes(
    train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor
) -> None:
    """``ValueError`` unless the features are (N, D) and (M, D) with N >= 1 and the labels
    (N,)."""
    if train_features.dim() != 2:
        raise ValueError(
            f"train_features must have shape (N, D), got {tuple(train_features.shape)}"
        )
    if test_features.dim() != 2:
        raise ValueError(f"test_features must have shape (M, D), got {tuple(test_features.shape)}")
    n, d = train_features.shape
    if n < 1:
        raise ValueError("train_features is empty: at least one training feature is required")
    if test_features.shape[1] != d:
        raise ValueError(
            f"feature dimensions differ: train_features has D={d}, "
            f"test_features has D={test_features.shape[1]}"
        )
    if train_labels.shape != (n,):
        raise ValueError(
            f"train_labels must have shape (N,) = ({n},) to match train_features, "
            f"got {tuple(train_labels.shape)}"
        )


def _check_labels(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
) -> None:
    """``ValueError`` unless the labels are integers in ``[0, num_classes)`` and all three
    tensors are on one device."""
    if train_labels.dtype.is_floating_point or train_labels.dtype.is_complex:
        raise ValueError(f"train_labels must be an integer tensor, got dtype {train_labels.dtype}")
    if train_labels.dtype == torch.bool:
        raise ValueError("train_labels must be an integer tensor, got dtype torch.bool")
    for name, tensor in (("test_features", test_features), ("train_labels", train_labels)):
        if tensor.device != train_features.device:
            raise ValueError(
                f"train_features are on {train_features.device} but {name} are on "
                f"{tensor.device}; put both on the same device"
            )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    low, high = int(train_labels.min()), int(train_labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, num_classes) = [0, {num_classes}), "
            f"found values in [{low}, {high}]"
        )


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict a label for every test feature by a similarity-weighted k-NN vote.

    Args:
        train_features: (N, D) training features (any float dtype; not modified).
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        test_features: (M, D) features to classify, on the same device.
        num_classes: number of classes C.
        k: number of neighbours that vote; ``k > N`` is clipped to ``N``.
        temperature: T in the vote weight ``exp(cosine_similarity / T)``; must be > 0.
        chunk_size: number of test rows whose (chunk_size, N) similarities are computed
            at once.

    Returns:
        (M,) int64 tensor of predicted labels, on the device of ``test_features``.
        A tie between classes goes to the smallest class index.

    Raises:
        ValueError: if shapes, devices, label range, ``k``, ``temperature``,
            ``num_classes`` or ``chunk_size`` are invalid.
    """
    _validate(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)
    k = min(k, train_features.shape[0])
    train = F.normalize(_as_float(train_features), dim=1)  # (N, D)
    test = F.normalize(_as_float(test_features), dim=1)  # (M, D)
    if test.dtype != train.dtype:
        common = torch.promote_types(test.dtype, train.dtype)
        train, test = train.to(common), test.to(common)
    labels = train_labels.to(torch.int64)  # (N,)
    predictions = torch.empty(test.shape[0], dtype=torch.int64, device=test.device)  # (M,)
    for start in range(0, test.shape[0], chunk_size):
        chunk = test[start : start + chunk_size]  # (B, D)
        votes = _votes(chunk, train, labels, num_classes, k, temperature)  # (B, C)
        predictions[start : start + chunk_size] = votes.argmax(dim=1)
    return predictions


def _votes(
    queries: torch.Tensor,
    train: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
) -> torch.Tensor:
    """(B, D) unit ``queries`` against (N, D) unit ``train`` features with (N,) int64
    ``labels`` -> (B, C) class votes: each of the ``k`` most similar training features
    votes for its label with weight ``exp((s - s_max) / T)``, scaled per row by
    ``exp(-s_max / T)`` so that the argmax is unchanged and small temperatures cannot
    overflow to inf."""
    similarity = queries @ train.T  # (B, N)
    top_sim, top_idx = similarity.topk(k, dim=1)  # (B, k), sorted descending
    weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (B, k)
    votes = torch.zeros(len(queries), num_classes, dtype=weights.dtype, device=queries.device)
    return votes.scatter_add_(1, labels[top_idx], weights)  # (B, C)


class VoteOptions(TypedDict, total=False):
    """The keyword arguments of :func:`knn_predict` that :func:`knn_accuracy` passes on."""

    k: int
    temperature: float
    chunk_size: int


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **vote: Unpack[VoteOptions],
) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict` on a labelled test set.

    Args:
        train_features: (N, D) training features.
        train_labels: (N,) integer labels in ``[0, num_classes)``.
        test_features: (M, D) test features, M >= 1.
        test_labels: (M,) integer ground-truth labels of the test features.
        num_classes: number of classes C.
        vote: ``k``, ``temperature``, ``chunk_size``: as in :func:`knn_predict`.

    Returns:
        Percentage (0 to 100) of test features whose predicted label equals the true one.

    Raises:
        ValueError: for the invalid arguments listed in :func:`knn_predict`, an empty
            test set, or ``test_labels`` whose shape is not (M,).
    """
    if test_features.dim() == 2 and test_features.shape[0] == 0:
        raise ValueError("test_features is empty: accuracy is undefined for M = 0")
    if test_features.dim() == 2 and test_labels.shape != (test_features.shape[0],):
        raise ValueError(
            f"test_labels must have shape (M,) = ({test_features.shape[0]},) to match "
            f"test_features, got {tuple(test_labels.shape)}"
        )
    predictions = knn_predict(train_features, train_labels, test_features, num_classes, **vote)
    correct = int((predictions == test_labels.to(predictions.device)).sum())
    return 100.0 * correct / predictions.shape[0]


@dataclass
class KnnResult(EvalResult):
    """Outcome of :func:`knn_eval`: the k-NN top-1 (%) on the test split, with the vote's
    ``k`` and ``temperature``."""

    protocol = "knn"
    identity_keys = (*EvalResult.identity_keys, "k", "temperature")
    keys = ("top1", "k", "temperature", "pool", "num_train", "num_test", "num_classes", "data",
            "random_init", "checkpoint")  # fmt: skip

    k: int
    temperature: float


def knn_eval(
    checkpoint: Checkpoint, cfg: Config | None = None, *, random_init: bool = False
) -> KnnResult:
    """k-NN classification of the test split of ``cfg.data`` by the frozen encoder of
    ``checkpoint`` (with ``random_init``: its architecture at random initialisation,
    seeded by ``cfg.train.seed``), the train split as the memory bank.

    ``cfg`` is the checkpoint's config with the evaluation's changes (default: the
    checkpoint's own); the features are pooled by ``probe.pool``, the vote takes
    ``monitor.knn_k`` neighbours at ``monitor.knn_temperature`` (what the k-NN monitor of
    pre-training uses too), on ``train.device``. Writes
    ``<checkpoint stem>.knn[-cls][-random-init].json`` beside the checkpoint.

    Raises:
        DataError: a split without class labels.
    """
    cfg = checkpoint.config if cfg is None else cfg
    pool, k, temperature = cfg.probe.pool, cfg.monitor.knn_k, cfg.monitor.knn_temperature
    warn_if_unwritable(result_path(checkpoint.path, "knn", random_init, pool))
    encoder = checkpoint.encoder(random_init=random_init, seed=cfg.train.seed)
    splits = labelled_splits(cfg.data, cfg.model, "k-NN classification")
    if k > len(splits.train):
        log.warning(
            "k=%d exceeds the %d training images: all of them vote (k=%d is recorded)",
            k,
            len(splits.train),
            len(splits.train),
        )
        k = len(splits.train)
    f = frozen_features(encoder, splits, cfg, pool, resolve_device(cfg.train.device))
    vote = VoteOptions(k=k, temperature=temperature)
    top1 = knn_accuracy(f.train, f.train_labels, f.test, f.test_labels, len(f.classes), **vote)
    measured = splits.measured_on(checkpoint, random_init)
    result = KnnResult(top1=top1, pool=pool, k=k, temperature=temperature, **measured)
    out = result.keep() or "not saved"
    log.info("k-NN top-1 %.2f%% (k=%d, T=%g, %s) -> %s", top1, k, temperature, pool, out)
    return result

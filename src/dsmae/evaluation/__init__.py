"""Evaluation of pre-trained encoders: linear probe and k-NN on frozen features (and
fine-tuning, in :mod:`dsmae.evaluation.finetune`), each returning an
:class:`~dsmae.evaluation.results.EvalResult`."""

from dsmae.evaluation.frozen import FrozenFeatures, extract_features, frozen_features
from dsmae.evaluation.knn import KnnResult, knn_accuracy, knn_eval, knn_predict
from dsmae.evaluation.linprobe import ProbeResult, linprobe
from dsmae.evaluation.results import EvalResult

__all__ = [
    "EvalResult",
    "FrozenFeatures",
    "KnnResult",
    "ProbeResult",
    "extract_features",
    "frozen_features",
    "knn_accuracy",
    "knn_eval",
    "knn_predict",
    "linprobe",
]

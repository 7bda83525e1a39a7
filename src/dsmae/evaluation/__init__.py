"""Evaluation of pre-trained encoders on frozen features: linear probe and k-NN."""

from dsmae.evaluation.frozen import FrozenFeatures, extract_features, frozen_features
from dsmae.evaluation.knn import KnnResult, knn_accuracy, knn_eval, knn_predict
from dsmae.evaluation.linprobe import ProbeResult, linprobe

__all__ = [
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

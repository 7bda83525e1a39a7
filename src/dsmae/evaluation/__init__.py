"""Evaluation of pre-trained encoders."""

from dsmae.evaluation.knn import knn_accuracy, knn_predict
from dsmae.evaluation.linprobe import ProbeResult, extract_features, linprobe, load_encoder

__all__ = [
    "ProbeResult",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linprobe",
    "load_encoder",
]

"""Evaluation of pre-trained encoders."""

from dsmae.evaluation.linprobe import ProbeResult, extract_features, linprobe, load_encoder

__all__ = ["ProbeResult", "extract_features", "linprobe", "load_encoder"]

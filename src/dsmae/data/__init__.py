"""Data loading for dsmae."""

from dsmae.data.images import DataError, ImageTensors
from dsmae.data.sources import DATASETS, SPLITS, open_source

__all__ = ["DATASETS", "SPLITS", "DataError", "ImageTensors", "open_source"]

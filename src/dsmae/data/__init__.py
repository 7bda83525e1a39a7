"""Data loading for dsmae."""

from dsmae.data.sources import DATASETS, SPLITS, DataError, ImageTensors, load_images

__all__ = ["DATASETS", "SPLITS", "DataError", "ImageTensors", "load_images"]

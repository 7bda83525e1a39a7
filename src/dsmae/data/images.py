"""A split held whole in memory (:class:`ImageTensors`), and the error every data source
raises when it cannot give one (:class:`DataError`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DataError", "ImageTensors"]


class DataError(Exception):
    """A data set cannot be loaded; the message says what to do (no traceback shown to users)."""


@dataclass(frozen=True)
class ImageTensors:
    """A whole split in memory.

    Attributes:
        images: (N, C, H, W) ``uint8``, contiguous.
        labels: (N,) ``int64``; -1 where an image has no label.
        classes: class names, index = label; ``()`` when unlabelled.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be (N, C, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be ({self.images.shape[0]},) int64, got "
                f"{tuple(self.labels.shape)} {self.labels.dtype}"
            )

    def __len__(self) -> int:
        """Number of images N."""
        return int(self.images.shape[0])

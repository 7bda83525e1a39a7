"""What every pre-training model shares: its outputs, its interface and its corruption.

A pre-training model (:class:`~dsmae.models.DSMAE`, :class:`~dsmae.models.MAE`) is built
from a resolved :class:`~dsmae.config.ModelConfig`. Its ``forward`` draws the corruption
(or takes it as given) and calls the model's ``losses``, which reads as its named stages
in order; ``dsmae bench`` times and counts the same stages one by one:

==================== ==================================================================
stage                what it does
==================== ==================================================================
``corrupt``          images -> the student's input (noisy; for MAE masked, display only)
``encode_student``   the student's tokens at :meth:`PretrainModel.student_positions`
``decode_pixels``    tokens -> predicted pixels (where ``decoder``)
``encode_teacher``   the EMA teacher's tokens of the clean images (where ``teacher``)
``regress_features`` student tokens -> predicted teacher tokens (where ``regressor``)
``pixel_loss``       ``L_y`` on the corrupted patches; ``feature_loss``: ``L_z``
==================== ==================================================================

The training pass returns the losses only (:class:`PretrainOutput`); the images for
display come from :meth:`PretrainModel.reconstruct` (the model's ``display``), which runs
only when asked.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import NamedTuple

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dsmae.config import ModelConfig
from dsmae.losses import pixel_loss
from dsmae.masking import num_selected, random_patch_mask
from dsmae.models.decoder import PixelDecoder
from dsmae.models.regressor import FeatureRegressor
from dsmae.models.vit import create_encoder
from dsmae.patches import gather_tokens, patchify


@dataclass
class PretrainOutput:
    """What one training forward pass of a pre-training model returns.

    Attributes:
        loss: scalar, the training objective.
        loss_y: scalar pixel loss, or None for dsmae-lz.
        loss_z: scalar feature loss, or None for dsmae-ly and mae.
        mask: (B, N) bool, True on the corrupted (noisy, or for mae masked) patches.
    """

    loss: torch.Tensor
    loss_y: torch.Tensor | None
    loss_z: torch.Tensor | None
    mask: torch.Tensor


class DisplayOutput(NamedTuple):
    """What :meth:`PretrainModel.reconstruct` returns, for display.

    Attributes:
        student_input: (B, C, H, W) what the student sees (noisy; for mae the masked
            patches zeroed).
        pred: (B, N, p*p*C) predicted pixels in the loss's target space, rows where
            ``mask`` is False unspecified; None for a model without a decoder (dsmae-lz).
        mask: (B, N) bool, True on the corrupted patches.
    """

    student_input: torch.Tensor
    pred: torch.Tensor | None
    mask: torch.Tensor


class PretrainModel(nn.Module, abc.ABC):
    """A pre-training model: a timm ViT student ``encoder`` (built first, so that every
    method draws its weights in the same order) and the parts its subclass adds.

    Args:
        cfg: a resolved :class:`~dsmae.config.ModelConfig` (see :func:`dsmae.build`).

    Attributes:
        config: the config.
        method: its ``method``.
        patch_size: p.
        num_patches: N.
        num_corrupted: K = round(noise_ratio * N).
        encoder: the student.
        teacher: the EMA teacher, or None.
        decoder: the pixel decoder, or None.
        regressor: the feature regressor, or None.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.method = cfg.method
        self.patch_size = cfg.patch_size
        self.num_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.num_corrupted = num_selected(self.num_patches, cfg.noise_ratio)
        self.encoder: VisionTransformer = create_encoder(cfg)
        self.teacher: VisionTransformer | None = None
        self.decoder: PixelDecoder | None = None
        self.regressor: FeatureRegressor | None = None

    def sample_corruption(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw what corrupts a batch: the patch mask, then the noise
        (:meth:`sample_noise`; None for a model that adds none).

        Drawing these for a whole global batch and slicing it lets several processes
        (or micro-batches) reproduce a single process's step exactly.

        Returns:
            mask (B, N) bool and eps (B, C, H, W) float32 or None.
        """
        mask = random_patch_mask(
            batch_size,
            self.num_patches,
            self.config.noise_ratio,
            generator=generator,
            device=device,
        )
        return mask, self.sample_noise(batch_size, generator, device)

    def sample_noise(
        self, batch_size: int, generator: torch.Generator | None, device: torch.device | str | None
    ) -> torch.Tensor | None:
        """The standard-normal noise of a batch, (B, C, H, W) on ``device``, drawn where
        ``generator`` is; None here: this model adds no noise."""
        return None

    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        mask: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """One training forward pass: the corruption, then :meth:`losses`.

        Args:
            images: (B, C, H, W) normalised images.
            generator: source of the mask and noise (None: the global RNG).
            mask: the (B, N) bool mask of a corruption drawn beforehand by
                :meth:`sample_corruption`; drawn here when not given.
            eps: its (B, C, H, W) noise; drawn here when not given.
        """
        b = images.shape[0]
        if mask is None:
            mask, eps = self.sample_corruption(b, generator, images.device)
        elif eps is None:
            eps = self.sample_noise(b, generator, images.device)
        return self.losses(images, mask, eps)

    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> DisplayOutput:
        """The student's input and its full-size prediction, for display (:meth:`display`),
        the corruption of (B, C, H, W) ``images`` drawn from ``generator`` as
        :meth:`forward` draws it."""
        return self.display(
            images, *self.sample_corruption(images.shape[0], generator, images.device)
        )

    @abc.abstractmethod
    def losses(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> PretrainOutput:
        """The training pass on (B, C, H, W) ``images`` corrupted by ``mask`` (B, N) and
        ``eps`` (B, C, H, W) or None: encode, decode, compare."""

    @abc.abstractmethod
    def display(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> DisplayOutput:
        """What :meth:`losses` would predict from the same corruption, for display."""

    @abc.abstractmethod
    def student_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool mask -> (B, K') int64: the patches whose tokens the student's
        stages carry (:meth:`encode_student`, :meth:`decode_pixels`)."""

    @abc.abstractmethod
    def corrupt(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, C, H, W) images -> (B, C, H, W) the student's input, corrupted on ``mask``
        (B, N) with the noise ``eps`` (B, C, H, W) where the model adds noise."""

    @abc.abstractmethod
    def encode_student(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The student encoder on (B, C, H, W) images, its tokens at ``positions``
        (:meth:`student_positions`) -> (B, T, D)."""

    @abc.abstractmethod
    def decode_pixels(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder on :meth:`encode_student`'s tokens -> (B, T', p*p*C) pixels."""

    def pixel_loss(
        self, pred: torch.Tensor, images: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """``L_y``: ``pred`` (B, K, p*p*C) against the clean pixels of the (B, K) patches
        ``positions`` of ``images`` (B, C, H, W), normalised per patch where the config
        says so. Returns a scalar."""
        target = gather_tokens(patchify(images, self.patch_size), positions)
        return pixel_loss(pred, target, norm_pix=self.config.norm_pix_loss)

    def update_teacher(self, momentum: float, apply: torch.Tensor | None = None) -> None:
        """The teacher's EMA update: nothing to do for a model without a teacher."""

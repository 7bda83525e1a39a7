"""MAE (He et al. 2022), the baseline: the student encodes only the visible patches, the
decoder fills the masked ones with a learned mask token, ``L = L_y`` on the masked patches.

``noise_ratio`` is MAE's mask ratio; nothing is drawn beyond the mask.
"""

from __future__ import annotations

import torch

from dsmae.config import ModelConfig
from dsmae.masking import split_indices
from dsmae.models.decoder import MaskedPixelDecoder
from dsmae.models.pretrain import DisplayOutput, PretrainModel, PretrainOutput
from dsmae.models.vit import encode_visible
from dsmae.noise import zero_patches
from dsmae.patches import gather_tokens


class MAE(PretrainModel):
    """Student encoder and a decoder with a mask token; no teacher, no regressor.

    Args:
        cfg: a resolved :class:`~dsmae.config.ModelConfig` with ``method="mae"``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.decoder: MaskedPixelDecoder = MaskedPixelDecoder.from_config(cfg)

    def losses(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> PretrainOutput:
        """Encode the visible patches of (B, C, H, W) ``images``, decode every patch,
        ``L = L_y`` on the K masked ones (``mask`` (B, N)); ``eps`` is None (no noise)."""
        masked, visible = split_indices(mask, self.num_corrupted)  # (B, K), (B, V)
        pred = self.decode_pixels(self.encode_student(images, visible), visible)  # (B, N, P)
        loss_y = self.pixel_loss(gather_tokens(pred, masked), images, masked)
        return PretrainOutput(loss=loss_y, loss_y=loss_y, loss_z=None, mask=mask)

    def student_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) bool -> (B, V) int64 indices of the visible patches, ascending: the
        tokens the encoder sees."""
        return split_indices(mask, self.num_corrupted)[1]

    def corrupt(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> torch.Tensor:
        """The student's view of (B, C, H, W) ``images``, for display: the patches of
        ``mask`` (B, N) zeroed (the encoder drops them instead); ``eps`` is None."""
        return zero_patches(images, mask, self.patch_size)

    def encode_student(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The encoder on the (B, V) visible ``positions`` of (B, C, H, W) images only:
        (B, 1 + V, D), [CLS] first."""
        return encode_visible(self.encoder, images, positions)

    def decode_pixels(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, 1 + V, D) encoder tokens of the (B, V) visible ``positions`` -> (B, N, p*p*C)
        pixels of every patch."""
        return self.decoder(tokens, positions)

    def display(
        self, images: torch.Tensor, mask: torch.Tensor, eps: torch.Tensor | None
    ) -> DisplayOutput:
        """The masked images (masked patches zeroed) and the (B, N, p*p*C) prediction of
        every patch."""
        visible = self.student_positions(mask)
        pred = self.decode_pixels(self.encode_student(images, visible), visible)
        return DisplayOutput(self.corrupt(images, mask, eps), pred, mask)
